"""Sentencepiece -> Hugging Face tokenizer export: ids, decoding and special tokens match."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from lmforge.launch.export import ExportError
from lmforge.launch.export.hf_tokenizer import (
    DEFAULT_VERIFY_TEXTS,
    export_tokenizer,
    verify_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoTokenizer  # noqa: E402  (after the offline switch)

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"
USER_SYMBOLS = ["<mask>", "<sep>"]


def train_spm(
    prefix: Path, model_type: str, user_symbols: list[str], **overrides: object
) -> Path:
    """Trains a small sentencepiece model with lmforge's trainer options."""
    options = dict(
        input=str(CORPUS),
        model_prefix=str(prefix),
        vocab_size=1000,
        model_type=model_type,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=user_symbols,
        input_sentence_size=10000,
        shuffle_input_sentence=True,
        num_threads=1,
        minloglevel=2,
    )
    options.update(overrides)
    spm.SentencePieceTrainer.train(**options)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def exported(request, tmp_path_factory) -> tuple[spm.SentencePieceProcessor, object, Path]:
    """(sentencepiece processor, loaded HF tokenizer, spm model path) per model type."""
    root = tmp_path_factory.mktemp(request.param)
    model = train_spm(root / "spm", request.param, USER_SYMBOLS)
    export_tokenizer(model, root / "hf")
    return spm.SentencePieceProcessor(model_file=str(model)), AutoTokenizer.from_pretrained(
        str(root / "hf")
    ), model


EXTRA_TEXTS = [
    "a <mask> b",
    "<mask>hello",
    "x<sep>y",
    "before <sep> after  <mask>  end ",
    " <mask> leading space then mask",
    "multi\n<sep>\nline",
]


def corpus_lines(count: int, seed: int = 0) -> list[str]:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    return random.Random(seed).sample(lines, count)


def test_ids_and_decode_match_sentencepiece_on_varied_texts(exported) -> None:
    sp, hf, _ = exported
    texts = DEFAULT_VERIFY_TEXTS + EXTRA_TEXTS
    assert len(texts) >= 30
    for text in texts:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert hf.decode(ids) == text
    # Byte fallback really is exercised: emoji and CJK become <0x..> pieces.
    assert any(sp.is_byte(i) for i in sp.encode("emoji 😀🎉 中文字符"))


def test_ids_and_decode_match_on_200_corpus_lines(exported) -> None:
    sp, hf, _ = exported
    lines = corpus_lines(200)
    assert hf(lines, add_special_tokens=False).input_ids == sp.encode(lines)
    for line in lines:
        assert hf.decode(hf.encode(line, add_special_tokens=False)) == line


def test_ids_match_on_random_strings_of_tricky_characters(exported) -> None:
    sp, hf, _ = exported
    alphabet = list(" \t\n\r abcXYZ019.,'<>\u2581\x00\u200bé中😀") + [
        "<mask>",
        "<sep>",
        "<0x",
        "0x41>",
        "   ",
    ]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
        if text in USER_SYMBOLS:
            continue  # the documented exception: no dummy prefix before a lone special token
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert hf.decode(ids) == sp.decode(ids)


def test_lone_special_token_text_is_the_documented_exception(exported) -> None:
    sp, hf, _ = exported
    assert sp.encode("<mask>") == [sp.piece_to_id("\u2581"), 4]
    assert hf.encode("<mask>", add_special_tokens=False) == [4]


def test_bpe_matches_on_a_long_multiline_document(tmp_path: Path) -> None:
    model = train_spm(tmp_path / "spm", "bpe", USER_SYMBOLS)
    export_tokenizer(model, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    document = CORPUS.read_text(encoding="utf-8")[:20000]
    ids = spm.SentencePieceProcessor(model_file=str(model)).encode(document)
    assert hf.encode(document, add_special_tokens=False) == ids
    assert hf.decode(ids) == document


def test_special_tokens_keep_their_ids(exported) -> None:
    sp, hf, _ = exported
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    assert (hf.pad_token, hf.unk_token, hf.bos_token, hf.eos_token) == (
        "<pad>",
        "<unk>",
        "<s>",
        "</s>",
    )
    assert hf.mask_token_id == sp.piece_to_id("<mask>") == 4
    assert hf.sep_token_id == sp.piece_to_id("<sep>") == 5
    assert set(hf.all_special_ids) == {0, 1, 2, 3, 4, 5}
    assert len(hf) == sp.get_piece_size()
    # Every piece maps to its sentencepiece id, byte pieces included.
    vocab = hf.get_vocab()
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(sp.get_piece_size()))


def test_default_call_adds_no_bos_or_eos_and_options_add_them(exported, tmp_path: Path) -> None:
    sp, hf, model = exported
    assert hf("The king").input_ids == sp.encode("The king")
    export_tokenizer(model, tmp_path, add_bos_token=True, add_eos_token=True)
    with_specials = AutoTokenizer.from_pretrained(str(tmp_path))
    assert with_specials("The king").input_ids == [2] + sp.encode("The king") + [3]


def test_export_writes_save_pretrained_files(exported, tmp_path: Path) -> None:
    _, _, model = exported
    export_tokenizer(model, tmp_path / "tok")
    names = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert names == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    roles = (config["bos_token"], config["eos_token"], config["pad_token"])
    assert roles == ("<s>", "</s>", "<pad>")


def test_model_without_user_symbols(tmp_path: Path) -> None:
    model = train_spm(tmp_path / "spm", "bpe", [])
    export_tokenizer(model, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert set(hf.all_special_ids) == {0, 1, 2, 3}
    for text in DEFAULT_VERIFY_TEXTS + ["<mask> is plain text here"]:
        assert hf.encode(text, add_special_tokens=False) == sp.encode(text), text


def test_verify_names_the_first_differing_text(tmp_path: Path) -> None:
    bpe = train_spm(tmp_path / "bpe", "bpe", USER_SYMBOLS)
    unigram = train_spm(tmp_path / "uni", "unigram", USER_SYMBOLS)
    export_tokenizer(bpe, tmp_path / "hf")
    texts = ["", "supercalifragilisticexpialidocious and more"]  # "" is [] for both
    want = spm.SentencePieceProcessor(model_file=str(unigram)).encode(texts[1])
    with pytest.raises(ExportError, match="text #1 'supercalifragilistic") as err:
        verify_tokenizer(unigram, tmp_path / "hf", texts)
    assert str(want) in str(err.value)


def test_verify_explains_control_token_strings_in_text(exported, tmp_path: Path) -> None:
    _, _, model = exported
    export_tokenizer(model, tmp_path)
    with pytest.raises(ExportError, match=r"special-token strings \['<s>'\]"):
        verify_tokenizer(model, tmp_path, ["<s>hello"])


def test_unsupported_normalization_is_refused(tmp_path: Path) -> None:
    model = train_spm(tmp_path / "nfkc", "bpe", [], normalization_rule_name="nmt_nfkc")
    with pytest.raises(ExportError, match="normalization_rule_name='nmt_nfkc'"):
        export_tokenizer(model, tmp_path / "hf")


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="missing.model: sentencepiece model not found"):
        export_tokenizer(tmp_path / "missing.model", tmp_path / "hf")
