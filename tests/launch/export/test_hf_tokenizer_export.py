"""Export of a run whose data was encoded with a Hugging Face tokenizer: the export holds the
same tokenizer files, byte for byte, `AutoTokenizer` on it encodes like `AutoTokenizer` on
the source folder, and a tokenizer that encodes differently is refused before publishing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmforge.launch.export import ExportError
from lmforge.launch.export.hf_folder import MARKER, write_hf_folder
from lmforge.launch.export.hf_tokenizer import DEFAULT_VERIFY_TEXTS, check_tokenizer_source
from lmforge.pipeline.config import CleanConfig, DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.dataset_tokenizer import DatasetTokenizer
from lmforge.pipeline.prepare.driver import prepare

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An "open model" tokenizer folder: byte-level BPE whose post-processor prepends bos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS.read_text()[:100_000].split("\n\n"), trainers.BpeTrainer(
        vocab_size=500, special_tokens=[BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    folder = tmp_path_factory.mktemp("src") / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                            chat_template="{{ messages }}").save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def manifest(source: Path, tmp_path_factory: pytest.TempPathFactory) -> DatasetManifest:
    root = tmp_path_factory.mktemp("data")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in DEFAULT_VERIFY_TEXTS))
    data = DataConfig(datasets=[DatasetSpec(name="c", paths=[str(corpus)])],
                      output_dir=str(root / "out"), seq_len=32, val_fraction=0.0, dedup=False,
                      clean=CleanConfig(steps=[]))
    return DatasetManifest.read(prepare(data, TokenizerConfig(model_path=str(source)),
                                        progress=False, executor="local"))


def tiny_llama(info) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=info.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=info.bos_id, eos_token_id=info.eos_id, pad_token_id=None)).eval()


def test_the_export_holds_the_source_tokenizer_files(manifest: DatasetManifest, source: Path,
                                                     tmp_path: Path) -> None:
    model = tiny_llama(manifest.tokenizer)
    out = write_hf_folder(tmp_path / "hf", model.config.to_dict(), model.state_dict(),
                          manifest.tokenizer_model)
    copied = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert copied <= set(json.loads((out / MARKER).read_text())["files"])
    assert not (out / "tokenizer.model").exists()
    for name in copied:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    exported, original = AutoTokenizer.from_pretrained(str(out)), \
        AutoTokenizer.from_pretrained(str(source))
    texts = DEFAULT_VERIFY_TEXTS + ["Привет 😀\n\n\nend"]
    assert [exported.encode(t) for t in texts] == [original.encode(t) for t in texts]
    assert exported.encode("hello")[0] == original.bos_token_id


def test_a_tokenizer_that_differs_from_the_data_is_refused(manifest: DatasetManifest,
                                                           tmp_path: Path) -> None:
    wrong = dataclasses.replace(manifest.tokenizer, eos_id=manifest.tokenizer.bos_id)
    model = tiny_llama(wrong)  # a model config that agrees with the wrong manifest
    handle = DatasetTokenizer(wrong, manifest.tokenizer_path)
    with pytest.raises(ExportError, match="eos id 1 with AutoTokenizer but 0 in lmforge"):
        write_hf_folder(tmp_path / "hf", model.config.to_dict(), model.state_dict(), handle)
    assert not (tmp_path / "hf").exists()


def test_prepare_refuses_a_tokenizer_class_that_encodes_otherwise(source: Path,
                                                                 tmp_path: Path) -> None:
    check_tokenizer_source(source)  # the generic class reads tokenizer.json as it is
    check_tokenizer_source(source / "tokenizer.json")  # a bare tokenizer.json too
    # Qwen2Tokenizer rebuilds its pre-tokenizer (Qwen's split and NFC) around the vocabulary,
    # so AutoTokenizer on this folder no longer encodes as its tokenizer.json says.
    folder = tmp_path / "qwen-class"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    with pytest.raises(ValueError, match=rf"tokenizer.model_path: {folder}: lmforge's reading "
                       r"of tokenizer.json does not encode as AutoTokenizer \(Qwen2Tokenizer\)"):
        check_tokenizer_source(folder)
