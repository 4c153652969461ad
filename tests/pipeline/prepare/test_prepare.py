"""End-to-end `prepare` on a slice of the demo corpus with a real local Ray.

One Ray and one prepare run are shared by the module (Ray start costs ~3 s and 770 MB).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import webdataset as wds

from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.stats import PrepareStats
from lmforge.pipeline.folder_lock import LOCK_FILE
from lmforge.pipeline.prepare.driver import prepare

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"
SEQ_LEN = 64


def source_paragraphs(text: str) -> list[str]:
    """The documents a `txt_unit: paragraph` reader must produce, in order."""
    return [p for p in re.split(r"\n\n+", text.strip("\n")) if p]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = CORPUS.read_text()[:120_000]
    text = text[: text.rindex("\n\n")] + "\n"
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text)
    return path


def make_configs(corpus: Path, out: Path) -> tuple[DataConfig, TokenizerConfig]:
    data = DataConfig(
        datasets=[DatasetSpec(name="shakespeare", paths=[str(corpus)], txt_unit="paragraph")],
        output_dir=str(out),
        seq_len=SEQ_LEN,
        val_fraction=0.1,
        num_workers=2,
        read_chunk_bytes=30_000,  # several read chunks, one file cut at paragraph boundaries
        shard_target_bytes=40_000,  # several shards
    )
    return data, TokenizerConfig(vocab_size=512, train_text_bytes=1_000_000)


@pytest.fixture(scope="module")
def prepared(ray_cluster, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, tok = make_configs(corpus, tmp_path_factory.mktemp("out"))
    return prepare(data, tok, progress=False)


def read_split(manifest_path: Path, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    manifest = json.loads(manifest_path.read_text())
    shards = manifest["datasets"]["shakespeare"]["splits"][split]["shards"]
    urls = [str(manifest_path.parent / s["path"]) for s in shards]
    if not urls:
        return []
    dataset = wds.WebDataset(urls, shardshuffle=False).decode()
    return [(s["__key__"], s["tokens.npy"], s["doc_starts.npy"]) for s in dataset]


def test_samples_have_seq_len_plus_one_tokens_and_valid_doc_starts(prepared: Path) -> None:
    manifest = json.loads(prepared.read_text())
    assert manifest["token_dtype"] == "uint16"
    eos, pad = manifest["tokenizer"]["eos_id"], manifest["tokenizer"]["pad_id"]
    for split in ("train", "val"):
        samples = read_split(prepared, split)
        assert samples, split
        for key, tokens, starts in samples:
            assert tokens.dtype == np.uint16 and tokens.shape == (SEQ_LEN + 1,)
            assert starts.dtype == np.int32 and starts[0] == 0
            assert np.all(np.diff(starts) > 0) and starts[-1] <= SEQ_LEN
            # A document starts exactly after each EOS inside the window (not in padding).
            after_eos = np.flatnonzero(tokens[:-1] == eos) + 1
            after_eos = after_eos[tokens[after_eos] != pad]
            assert set(starts[1:].tolist()) == set(after_eos.tolist())
            assert re.fullmatch(rf"shakespeare-{split}-\d{{6}}-\d{{8}}", key)
        keys = [k for k, _, _ in samples]
        assert len(set(keys)) == len(keys)


def test_manifest_matches_disk(prepared: Path) -> None:
    manifest = json.loads(prepared.read_text())
    pad = manifest["tokenizer"]["pad_id"]
    assert manifest["seq_len"] == SEQ_LEN
    tok_sha = hashlib.sha256((prepared.parent / "tokenizer.model").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == tok_sha
    for split, entry in manifest["datasets"]["shakespeare"]["splits"].items():
        assert len(entry["shards"]) >= (2 if split == "train" else 1)
        samples = read_split(prepared, split)
        real = sum(int((t != pad).sum()) for _, t, _ in samples)
        assert entry["samples"] == len(samples) == sum(s["samples"] for s in entry["shards"])
        assert entry["tokens"] == real == sum(s["tokens"] for s in entry["shards"])
        assert entry["padding_tokens"] == len(samples) * (SEQ_LEN + 1) - real
        assert entry["padding_tokens"] <= SEQ_LEN  # only the final window is padded
        for shard in entry["shards"]:
            data = (prepared.parent / shard["path"]).read_bytes()
            assert shard["bytes"] == len(data)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert (prepared.parent / "stats.json").exists()


def decode_split(prepared: Path, split: str) -> list[str]:
    manifest = json.loads(prepared.read_text())
    sp = spm.SentencePieceProcessor(model_file=str(prepared.parent / "tokenizer.model"))
    stream = np.concatenate([t for _, t, _ in read_split(prepared, split)])
    stream = stream[stream != manifest["tokenizer"]["pad_id"]]
    ends = np.flatnonzero(stream == manifest["tokenizer"]["eos_id"])
    assert len(ends) and ends[-1] == len(stream) - 1  # every document ends in EOS
    docs = np.split(stream, ends + 1)[:-1]
    return [sp.decode(d[:-1].tolist()) for d in docs]


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(any(doc == w for w in it) for doc in part)


def test_decoded_tokens_give_back_the_source_documents(prepared: Path, corpus: Path) -> None:
    source = source_paragraphs(corpus.read_text())
    unique = list(dict.fromkeys(source))  # exact dedup keeps the first occurrence
    train, val = decode_split(prepared, "train"), decode_split(prepared, "val")
    assert val and train
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(unique)
    assert is_subsequence(train, unique) and is_subsequence(val, unique)
    stats = json.loads((prepared.parent / "stats.json").read_text())
    assert stats["dedup"]["removed_docs"] == len(source) - len(unique)
    typed = PrepareStats.read(prepared.parent)
    assert typed.dedup_removed_docs == len(source) - len(unique)
    assert typed.datasets["shakespeare"].read_docs == len(source)
    assert typed.datasets["shakespeare"].clean_docs == len(source)  # no cleaning rule drops one
    shards = DatasetManifest.read(prepared).datasets["shakespeare"].splits
    assert typed.tokens == {"shakespeare": {split: s.tokens for split, s in shards.items()}}
    assert typed.throughput["tokens_per_s"] > 0 and typed.bad_input == {}
    assert len(typed.plot_paths) == 5 and all(p.is_file() for p in typed.plot_paths)


def test_rerun_is_skipped_and_a_fresh_run_is_byte_identical(
    prepared: Path, corpus: Path, tmp_path: Path
) -> None:
    # Everything but the folder's lock file, which each prepare rewrites with its PID.
    before = {p: p.stat().st_mtime_ns for p in prepared.parent.rglob("*")
              if p.is_file() and p.name != LOCK_FILE}
    data, tok = make_configs(corpus, prepared.parent)
    assert prepare(data, tok, progress=False) == prepared
    after = {p: p.stat().st_mtime_ns for p in prepared.parent.rglob("*")
             if p.is_file() and p.name != LOCK_FILE}
    assert before == after  # nothing rewritten

    data, tok = make_configs(corpus, tmp_path / "again")
    data.num_workers = 1  # the worker count must not change the bytes
    again = prepare(data, tok, progress=False)
    first, second = json.loads(prepared.read_text()), json.loads(again.read_text())
    assert first["datasets"] == second["datasets"]
    assert first["tokenizer"] == second["tokenizer"]
    for split in first["datasets"]["shakespeare"]["splits"].values():
        for shard in split["shards"]:
            a = (prepared.parent / shard["path"]).read_bytes()
            assert a == (again.parent / shard["path"]).read_bytes()
