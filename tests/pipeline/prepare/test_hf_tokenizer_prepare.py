"""`prepare` with a Hugging Face tokenizer (`tokenizer.model_path` = an HF folder or a bare
tokenizer.json): the shards hold, document for document, the ids
`transformers.AutoTokenizer.from_pretrained(folder)` gives (then EOS), on text with non-ASCII
characters, long documents and empty lines; a vocabulary over 65,535 gives uint32 shards; the
manifest records the kind and every file's sha256, and training refuses another tokenizer.

The tokenizers are trained here with `tokenizers` on the demo corpus and saved with
transformers' `PreTrainedTokenizerFast.save_pretrained`, as a user's HF folder would be.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lmforge.pipeline.config import CleanConfig, DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.dataset_tokenizer import tokenizer_mismatches, tokenizer_source
from lmforge.pipeline.prepare.driver import prepare
from lmforge.pipeline.prepare.tokenizer import DocumentEncoder

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"
SEQ_LEN = 64
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def byte_level_bpe(vocab_size: int = 700) -> Tokenizer:
    """A byte-level BPE like Llama 3's / GPT-2's, trained on the demo corpus; its
    post-processor prepends bos (as Llama 3's tokenizer.json does)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.read_text()[:200_000].split("\n\n"), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def documents() -> list[str]:
    """Non-ASCII text, empty lines inside and around documents, whitespace runs, and long
    documents that span many windows."""
    paragraphs = [p for p in CORPUS.read_text()[:60_000].split("\n\n") if p.strip()]
    long_docs = ["\n\n".join(paragraphs[i : i + 40]) for i in range(0, 120, 40)]
    return [
        "naïve café résumé — Größe straße Ærø",
        "Привет, мир! Γειά σου Κόσμε. 中文字符和标点。日本語のテキスト 한국어",
        "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 end",
        "first paragraph\n\n\nafter two empty lines\n\n",
        "\n\nstarts with empty lines",
        "\n\n",  # only empty lines: a document of bos + its ids + eos
        "   leading spaces, a tab\tand trailing   ",
        long_docs[0],
        "مرحبا بالعالم",
        long_docs[1],
        "line\n \n\t\nwhitespace-only lines between",
        long_docs[2],
        "a",
    ] + paragraphs[120:200]


def write_corpus(folder: Path) -> Path:
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                            for t in documents()), encoding="utf-8")
    return path


def data_config(corpus: Path, out: Path, **kw) -> DataConfig:
    # No cleaning and no dedup: every document reaches the encoder as written (one pass).
    return DataConfig(datasets=[DatasetSpec(name="docs", paths=[str(corpus)])],
                      output_dir=str(out), seq_len=SEQ_LEN, val_fraction=0.0, dedup=False,
                      clean=CleanConfig(steps=[]), read_chunk_bytes=8192,
                      shard_target_bytes=20_000, **kw)


def read_stream(manifest_path: Path) -> tuple[np.ndarray, set[int], set[int]]:
    """The train split's token stream (padding removed), every position a sample marks as a
    document start, and every sample start."""
    manifest = DatasetManifest.read(manifest_path)
    shards = manifest.datasets["docs"].splits["train"].shards
    urls = [str(manifest_path.parent / s.path) for s in shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    window = SEQ_LEN + 1
    stream = np.concatenate([s["tokens.npy"] for s in samples])
    assert stream.dtype == np.dtype(manifest.token_dtype)
    pad = manifest.tokenizer.padding_id
    real = len(stream) - manifest.datasets["docs"].splits["train"].padding_tokens
    assert np.all(stream[real:] == pad)
    marked = {k * window + int(s) for k, sample in enumerate(samples)
              for s in sample["doc_starts.npy"]}
    return stream[:real], marked, {k * window for k in range(len(samples))}


def expected_ids(folder: Path | str, texts: list[str]) -> list[list[int]]:
    """What AutoTokenizer gives each text, plus the EOS lmforge appends."""
    hf = AutoTokenizer.from_pretrained(str(folder))
    return [hf(t)["input_ids"] + [hf.eos_token_id] for t in texts]


def assert_shards_hold(manifest_path: Path, want: list[list[int]]) -> None:
    stream, marked, sample_starts = read_stream(manifest_path)
    assert len(stream) == sum(map(len, want))
    starts = set(np.cumsum([0] + [len(d) for d in want[:-1]]).tolist())
    offset = 0
    for index, ids in enumerate(want):  # document for document, naming the first that differs
        got = stream[offset : offset + len(ids)].tolist()
        assert got == ids, f"document #{index}: shards {got[:20]}…, AutoTokenizer {ids[:20]}…"
        offset += len(ids)
    assert starts <= marked and marked - starts <= sample_starts


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "open-model"
    PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(), bos_token=BOS,
                            eos_token=EOS).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def prepared(ray_cluster, hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hfdata")
    data = data_config(write_corpus(root), root / "out", num_workers=2)
    return prepare(data, TokenizerConfig(model_path=str(hf_folder)), progress=False)


def test_shards_hold_autotokenizer_ids_document_for_document(prepared: Path,
                                                             hf_folder: Path) -> None:
    want = expected_ids(hf_folder, documents())
    assert want[0][0] == AutoTokenizer.from_pretrained(str(hf_folder)).bos_token_id  # bos first
    assert_shards_hold(prepared, want)


def test_manifest_records_the_kind_files_and_ids(prepared: Path, hf_folder: Path) -> None:
    manifest = DatasetManifest.read(prepared)
    tok, hf = manifest.tokenizer, AutoTokenizer.from_pretrained(str(hf_folder))
    sha = {n: hashlib.sha256((hf_folder / n).read_bytes()).hexdigest()
           for n in ("tokenizer.json", "tokenizer_config.json")}
    assert tok.kind == "hf" and tok.file == "tokenizer.json" and tok.file_sha256s() == sha
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, -1)
    assert tok.vocab_size == len(hf) == 700 and manifest.token_dtype == "uint16"
    assert tok.padding_id == 700  # no pad token: one past the vocabulary
    for name in sha:  # the dataset folder holds the same files
        assert (prepared.parent / name).read_bytes() == (hf_folder / name).read_bytes()
    manifest.check_tokenizer_file()
    handle = manifest.tokenizer_model
    text = "Привет 😀\n\nworld"
    assert handle.encode(text) == hf.encode(text)
    assert handle.decode(hf.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    assert tokenizer_mismatches(hf_folder, tok) == []
    assert manifest.to_dict() == json.loads(prepared.read_text())  # read and written alike


def test_a_model_path_that_is_no_tokenizer_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"tokenizer.model_path: {tmp_path} is a folder "
                                         "without tokenizer.json; name a sentencepiece"):
        tokenizer_source(tmp_path)
    with pytest.raises(ValueError, match=f"tokenizer.model_path: {tmp_path / 'x.json'} does "
                                         "not exist"):
        tokenizer_source(tmp_path / "x.json")


def test_a_changed_tokenizer_file_is_named(prepared: Path, hf_folder: Path,
                                           tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": True}))
    problems = tokenizer_mismatches(other, DatasetManifest.read(prepared).tokenizer)
    assert len(problems) == 1 and problems[0].startswith(
        f"tokenizer.model_path: tokenizer_config.json of {other} (sha256 ")


@pytest.mark.parametrize("template,config", [
    (None, {}),  # tokenizer.json's post-processor (bos) as it is
    # transformers 5 drops these flags when there is a tokenizer.json
    (None, {"add_bos_token": False, "add_eos_token": True}),
    (f"$A {EOS}", {}),  # the tokenizer ends each text with eos: lmforge adds no second one
    ("$A", {"pad_token": "<pad>", "mask_token": "<mask>"}),  # added by AutoTokenizer: new ids
], ids=["post-processor", "config-flags", "eos-template", "new-specials"])
def test_the_encoder_follows_the_tokenizer_config(hf_folder: Path, tmp_path: Path,
                                                  template: str | None, config: dict) -> None:
    folder = tmp_path / "variant"
    folder.mkdir()
    tok = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(EOS, tok.token_to_id(EOS))])
    tok.save(str(folder / "tokenizer.json"))
    base = json.loads((hf_folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
    hf = AutoTokenizer.from_pretrained(str(folder))
    texts = documents()[:12]
    want = [hf(t)["input_ids"] for t in texts]
    # lmforge appends EOS unless the tokenizer ended the text with it already.
    want = [ids if ids[-1:] == [hf.eos_token_id] else ids + [hf.eos_token_id] for ids in want]
    encoder = DocumentEncoder(folder)
    tokens, lengths = encoder.encode(texts)
    assert lengths.tolist() == [len(ids) for ids in want]
    assert tokens.tolist() == [i for ids in want for i in ids]
    assert encoder.text.adds_eos == (template == f"$A {EOS}")
    assert encoder.text.vocab_size == len(hf) and encoder.text.pad_id == (hf.pad_token_id or -1)


def test_a_vocabulary_over_65535_gives_uint32_shards(tmp_path: Path) -> None:
    # A word-level vocabulary of 70,000 words (ids up to 69,999) plus specials after them.
    words = [f"w{i}" for i in range(70_000)]
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": 70_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "big"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                            eos_token="</s>").save_pretrained(str(folder))  # eos added: 70,001
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(60_000, 70_000, size=n))
             for n in (5, 300, 1, 80)] + ["w69999 unknown w0"]
    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest_path = prepare(data_config(corpus, tmp_path / "out"),
                            TokenizerConfig(model_path=str(folder / "tokenizer.json")),
                            progress=False, executor="local")
    manifest = DatasetManifest.read(manifest_path)
    assert manifest.token_dtype == "uint32" and manifest.tokenizer.vocab_size == 70_002
    assert manifest.tokenizer.file_sha256s().keys() == {"tokenizer.json"}  # the bare file
    # The bare tokenizer.json has no config: eos comes from nowhere, documents are only
    # marked by doc_starts; AutoTokenizer on a folder holding just that file agrees.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    hf = AutoTokenizer.from_pretrained(str(bare))
    assert hf.eos_token_id is None and manifest.tokenizer.eos_id == -1
    want = [hf(t)["input_ids"] for t in texts]
    assert max(max(ids) for ids in want) == 70_000  # [UNK]: ids above 65,535
    assert_shards_hold(manifest_path, want)
    # The loader reads uint32 shards (one unshuffled pass, the checksums verified).
    from lmforge.pipeline.config import LoaderConfig
    from lmforge.pipeline.loader.shard_loader import ShardLoader

    loader = ShardLoader(manifest_path, "train", 2, infinite=False,
                         config=LoaderConfig(shuffle=False))
    first = next(iter(loader))["input_ids"][0].tolist()
    assert first == [i for ids in want for i in ids][:SEQ_LEN]


def test_training_refuses_another_tokenizer_naming_the_file(prepared: Path, hf_folder: Path,
                                                            tmp_path: Path) -> None:
    from lmforge.launch.config import load_config
    from lmforge.launch.config.dataset_check import DatasetMismatchError, config_for_dataset

    tiny = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    out = prepared.parent
    manifest = DatasetManifest.read(prepared)

    def check(model_path: Path) -> None:
        cfg = load_config(tiny, [f"--data.output_dir={out}", f"--data.seq_len={SEQ_LEN}",
                                 f"--tokenizer.model_path={model_path}",
                                 "--model.vocab_size=null"])
        config_for_dataset(cfg, manifest)

    check(hf_folder)  # the source folder itself
    check(out)  # the dataset folder holds the same files
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": BOS}))
    with pytest.raises(DatasetMismatchError) as err:
        check(other)
    assert str(err.value).startswith(f"tokenizer.model_path: tokenizer_config.json of {other} ")
    assert f"or set tokenizer.model_path={out}" in str(err.value)
    spm_file = tmp_path / "tokenizer.model"
    spm_file.write_bytes(b"a sentencepiece model")
    with pytest.raises(DatasetMismatchError, match="is a sentencepiece tokenizer, the data was "
                                                   "encoded with a hf one"):
        check(spm_file)
