"""The dataset's tokenizer as one handle: opened once per manifest, checked against its sha256."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from lmforge.pipeline.config import TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest, TokenizerInfo
from lmforge.pipeline.contract.dataset_tokenizer import DatasetTokenizer
from lmforge.pipeline.prepare.tokenizer import describe_tokenizer, train_tokenizer

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder with a real tokenizer and a manifest that records it (no shards)."""
    folder = tmp_path_factory.mktemp("data")
    sample = folder / "sample.txt"
    sample.write_text(CORPUS.read_text()[:50_000])
    config = TokenizerConfig(vocab_size=600)
    model = train_tokenizer(sample, config, folder / "tokenizer.model")
    tokenizer = {**describe_tokenizer(model, config), "file": "tokenizer.model"}
    manifest = {"version": 1, "seq_len": 64, "token_dtype": "uint16", "tokenizer": tokenizer,
                "datasets": {}, "fingerprint": "f" * 64, "stats": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_manifest_opens_its_tokenizer_once(dataset: Path) -> None:
    manifest = DatasetManifest.read(dataset)
    handle = manifest.tokenizer_model
    assert handle is manifest.tokenizer_model and handle.info is manifest.tokenizer
    processor = handle.processor
    assert processor is manifest.tokenizer_model.processor  # shared, not opened again
    reference = spm.SentencePieceProcessor(model_file=str(dataset / "tokenizer.model"))
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert processor.encode(text) == reference.encode(text)
    assert processor.get_piece_size() == manifest.tokenizer.vocab_size == 600


def test_a_replaced_tokenizer_file_is_refused_by_name(dataset: Path, tmp_path: Path) -> None:
    info = DatasetManifest.read(dataset).tokenizer
    other = tmp_path / "tokenizer.model"
    other.write_bytes((dataset / "tokenizer.model").read_bytes() + b"\0")
    with pytest.raises(ValueError, match=f"{other}: sha256 .* is not the .* the manifest records"):
        _ = DatasetTokenizer(info, str(other)).processor
    with pytest.raises(ValueError, match="cannot read the dataset's tokenizer"):
        _ = DatasetTokenizer(info, str(tmp_path / "missing.model")).processor


def test_bytes_that_are_not_a_model_are_named(tmp_path: Path) -> None:
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"not a model")
    import hashlib

    info = TokenizerInfo.from_dict({
        "file": "tokenizer.model", "sha256": hashlib.sha256(b"not a model").hexdigest(),
        "vocab_size": 300, "type": "bpe", "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
        "special_tokens": {"extra": []}, "byte_fallback": True})
    with pytest.raises(ValueError, match=f"{junk}: not a sentencepiece model"):
        _ = DatasetTokenizer(info, str(junk)).processor
