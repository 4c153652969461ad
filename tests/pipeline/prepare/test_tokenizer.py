"""sentencepiece training options: exact round trips, determinism, special tokens."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from lmforge.pipeline.config import TokenizerConfig
from lmforge.pipeline.prepare.tokenizer import (
    DocumentEncoder,
    describe_tokenizer,
    token_dtype,
    train_tokenizer,
)

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"
TRICKY = [
    "  two  leading spaces and   three inside",
    "line one\nline two\n\n\nafter blank lines\n",
    "tabs\tand\r\nwindows newlines",
    "digits 1234567890 and 3.14159",
    "Unicode: café, naïve, 日本語, emoji 🙂, Ελληνικά",
    " x",
    "trailing space ",
    "\n",
    "<mask> and <sep> inside text",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenizerConfig]:
    folder = tmp_path_factory.mktemp("tok")
    sample = folder / "sample.txt"
    sample.write_text(CORPUS.read_text()[:200_000])
    config = TokenizerConfig(vocab_size=600, extra_special_tokens=["<tool>"])
    return train_tokenizer(sample, config, folder / "a.model"), config


def test_decode_of_encode_is_exact(model: tuple[Path, TokenizerConfig]) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model[0]))
    for text in TRICKY:
        assert sp.decode(sp.encode(text)) == text


def test_training_is_deterministic_and_path_independent(
    model: tuple[Path, TokenizerConfig], tmp_path: Path
) -> None:
    sample = tmp_path / "other_name.txt"
    sample.write_text(CORPUS.read_text()[:200_000])
    again = train_tokenizer(sample, model[1], tmp_path / "b.model")
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (model[0], again)]
    assert digest[0] == digest[1]


def test_describe_lists_ids_and_special_tokens(model: tuple[Path, TokenizerConfig]) -> None:
    info = describe_tokenizer(model[0], model[1])
    assert (info["pad_id"], info["unk_id"], info["bos_id"], info["eos_id"]) == (0, 1, 2, 3)
    assert info["vocab_size"] == 600 and info["type"] == "bpe" and info["byte_fallback"]
    special = info["special_tokens"]
    assert special["eos"] == {"piece": "</s>", "id": 3}
    assert special["mask"] == {"piece": "<mask>", "id": 4}
    assert special["sep"] == {"piece": "<sep>", "id": 5}
    assert special["extra"] == [{"piece": "<tool>", "id": 6}]
    assert info["sha256"] == hashlib.sha256(model[0].read_bytes()).hexdigest()


def test_encoder_joins_documents_with_eos(model: tuple[Path, TokenizerConfig]) -> None:
    encoder = DocumentEncoder(model[0])
    tokens, lengths = encoder.encode(TRICKY)
    assert tokens.dtype == np.uint16 and lengths.sum() == len(tokens)
    ends = np.cumsum(lengths) - 1
    assert np.all(tokens[ends] == 3)
    starts = np.concatenate([[0], ends[:-1] + 1])
    decoded = [encoder.text.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]
    assert decoded == TRICKY
    # The numpy ids the encoder asks sentencepiece for are its usual list ids, EOS-joined.
    expected = [i for ids in encoder.text.encode_batch(TRICKY) for i in [*ids, 3]]
    assert tokens.tolist() == expected
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_vocab_too_large_for_sample_says_what_to_do(tmp_path: Path) -> None:
    sample = tmp_path / "tiny.txt"
    sample.write_text("a tiny sample\n" * 20)
    with pytest.raises(ValueError, match="^vocab_size: .*lower tokenizer.vocab_size"):
        train_tokenizer(sample, TokenizerConfig(vocab_size=5000), tmp_path / "t.model")
