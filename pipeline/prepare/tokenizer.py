"""sentencepiece training; the description, files and batch encoding of either tokenizer kind.

`SENTENCEPIECE_OPTIONS` is the one place the training options live; the Hugging Face export
converts exactly these. They make `decode(encode(text)) == text` for any text: identity
normalization, no whitespace squeezing, byte fallback for unseen characters.

A reused tokenizer (`tokenizer.model_path`) is a sentencepiece model or a Hugging Face
tokenizer (`dataset_tokenizer.tokenizer_source`); `describe_tokenizer`, `copy_tokenizer_files`
and `DocumentEncoder` take either. An HF tokenizer encodes each document as
`AutoTokenizer.from_pretrained(folder)(text)` does (`contract/hf_tokenizer.py`), then EOS.

Threads: every encoder is one thread; parallelism comes from the pool of encoder actors (one
per core). `tokenizers` has a Rayon thread pool of its own that `encode_batch` would use; the
HF encoder sets ``TOKENIZERS_PARALLELISM=false`` in its process (unless the environment sets
it), so that pool never starts and two workers on two cores run two threads, not 2 × cores
(``RAYON_NUM_THREADS`` is then irrelevant).
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from lmforge.pipeline.config import TokenizerConfig
from lmforge.pipeline.contract.dataset_tokenizer import (
    HF,
    SENTENCEPIECE,
    file_sha256,
    open_tokenizer,
    tokenizer_source,
)
from lmforge.pipeline.contract.hf_tokenizer import ROLES, HFTokenizer
from lmforge.pipeline.contract.shard_format import token_dtype
from lmforge.pipeline.durable import write_atomic

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

SENTENCEPIECE_OPTIONS: dict[str, Any] = {
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "pad_id": PAD_ID,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_piece": "<pad>",
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
    # Deterministic training: the training text is used whole, in file order, on one thread.
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "num_threads": 1,
    "max_sentence_length": 16384,
    "minloglevel": 2,
}
"""Fixed sentencepiece trainer options; `trainer_options` adds the configured ones."""


def trainer_options(config: TokenizerConfig) -> dict[str, Any]:
    """All sentencepiece trainer options for `config` (fixed ones plus configured ones)."""
    return {
        **SENTENCEPIECE_OPTIONS,
        "model_type": config.type,
        "vocab_size": config.vocab_size,
        "character_coverage": config.character_coverage,
        "user_defined_symbols": config.special_pieces(),
    }


def train_tokenizer(text_file: Path, config: TokenizerConfig, model_path: Path) -> Path:
    """Train a sentencepiece model on a text file (one or more lines per document).

    Args:
        text_file: The tokenizer's training text.
        config: The `tokenizer` section.
        model_path: Where to write the `.model` (its `.vocab` goes next to it).

    Returns:
        `model_path`.

    Raises:
        ValueError: If the text cannot support `vocab_size` (says what to change).
    """
    spm.set_random_generator_seed(config.seed)
    prefix = str(model_path.with_suffix(""))
    try:
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=prefix, **trainer_options(config)
        )
    except RuntimeError as err:
        raise ValueError(
            f"vocab_size: sentencepiece could not train {config.vocab_size} pieces on the "
            f"{text_file.stat().st_size} bytes of training text ({err}); lower "
            "tokenizer.vocab_size or raise tokenizer.train_text_bytes / add data"
        ) from err
    # The model records the text file and output paths; drop them so the same text gives
    # the same bytes wherever it was trained.
    from sentencepiece import sentencepiece_model_pb2

    produced = Path(prefix + ".model")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(produced.read_bytes())
    proto.trainer_spec.ClearField("input")
    proto.trainer_spec.ClearField("model_prefix")
    # Durable (fsynced, with its folder) before anything records its sha256 or trusts it
    # on a rerun: a crash must not leave a zero-filled model that a marker vouches for.
    write_atomic(model_path, proto.SerializeToString())
    if produced != model_path:
        produced.unlink()
    return model_path


def copy_tokenizer_files(model_path: Path | str, folder: Path) -> None:
    """Write the tokenizer's files into a dataset folder under their names there
    (``tokenizer.model``, or ``tokenizer.json`` and its config files), durably: the manifest
    vouches for them."""
    for name, path in tokenizer_source(model_path).files.items():
        write_atomic(folder / name, path.read_bytes())


def describe_tokenizer(model_path: Path | str, config: TokenizerConfig) -> dict[str, Any]:
    """The manifest's `tokenizer` entry for a sentencepiece model (without `file`) or an HF
    tokenizer (with `file`, `kind` and `files`); see `describe_sentencepiece`."""
    source = tokenizer_source(model_path)
    if source.kind == SENTENCEPIECE:
        return describe_sentencepiece(source.files["tokenizer.model"], config)
    return describe_hf(open_tokenizer(source), source.sha256s(), config)


def describe_hf(tok: HFTokenizer, sha256s: dict[str, str],
                config: TokenizerConfig) -> dict[str, Any]:
    """The manifest's `tokenizer` entry of an HF tokenizer: the roles and ids its config
    gives (`HFTokenizer`), its vocabulary (highest id + 1) and every file's sha256.

    Without a role in the HF config, lmforge's `tokenizer.mask_token` / `sep_token` still
    name the mask / sep token if the vocabulary has them.
    """
    special: dict[str, Any] = {}
    for role in ROLES:
        piece = tok.roles[role]
        if piece is None and role in ("mask", "sep"):
            piece = config.mask_token if role == "mask" else config.sep_token
        token_id = tok.tokenizer.token_to_id(piece) if piece else None
        if token_id is not None:
            special[role] = {"piece": piece, "id": token_id}
    special["extra"] = [{"piece": p, "id": tok.tokenizer.token_to_id(p)} for p in tok.extras]
    main = next(iter(sha256s))
    return {
        "file": main,
        "sha256": sha256s[main],
        "vocab_size": tok.vocab_size,
        "type": tok.model_type(),
        "pad_id": tok.pad_id,
        "unk_id": tok.unk_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "special_tokens": special,
        "byte_fallback": tok.byte_fallback(),
        "kind": HF,
        "files": dict(sha256s),
    }


def describe_sentencepiece(model_path: Path | str, config: TokenizerConfig) -> dict[str, Any]:
    """The manifest's `tokenizer` entry (without `file`) for a sentencepiece model.

    Any sentencepiece model works: without a pad piece (``pad_id`` -1, as in Llama's
    ``tokenizer.model``) padding uses `shard_format.padding_id`; without an eos piece
    documents are joined without a separator (the shards' ``doc_starts`` still mark them).
    """
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}[proto.trainer_spec.model_type]
    special: dict[str, Any] = {}
    for role, piece_id in (("pad", sp.pad_id()), ("unk", sp.unk_id()),
                           ("bos", sp.bos_id()), ("eos", sp.eos_id())):
        if piece_id >= 0:
            special[role] = {"piece": sp.id_to_piece(piece_id), "id": piece_id}
    for role, piece in (("mask", config.mask_token), ("sep", config.sep_token)):
        if piece is not None and sp.piece_to_id(piece) != sp.unk_id():
            special[role] = {"piece": piece, "id": sp.piece_to_id(piece)}
    special["extra"] = [
        {"piece": p, "id": sp.piece_to_id(p)}
        for p in config.extra_special_tokens
        if sp.piece_to_id(p) != sp.unk_id()
    ]
    return {
        "sha256": file_sha256(model_path),
        "vocab_size": sp.vocab_size(),
        "type": model_type,
        "pad_id": sp.pad_id(),
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "special_tokens": special,
        "byte_fallback": bool(proto.trainer_spec.byte_fallback),
    }


class DocumentEncoder:
    """Encodes document texts into one EOS-joined token stream (the `TokenizerStep`), with a
    sentencepiece model or an HF tokenizer (`model_path`: a file or an HF folder).

    Attributes:
        text: The tokenizer (`encode(text, special_tokens)`, `bos_id`, ...), for task data.
    """

    def __init__(self, model_path: Path | str) -> None:
        source = tokenizer_source(model_path)
        if source.kind == HF:
            # One thread per encoder: see the module docstring.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.text = open_tokenizer(source)
        self.eos_id = self.text.eos_id
        self.dtype = np.dtype(token_dtype(self.text.vocab_size, self.text.pad_id))
        # A model without an eos piece: documents follow each other directly; an HF
        # tokenizer that ends every text with eos itself (add_eos_token) gets no second one.
        appended = self.eos_id >= 0 and not self.text.adds_eos
        self._eos = np.array([self.eos_id] if appended else [], np.int32)
        if source.kind == SENTENCEPIECE:
            self._encode = self.text.processor.encode
        else:
            self.encode = self._encode_hf  # type: ignore[method-assign]

    def _encode_hf(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """`encode` with an HF tokenizer: one batch call, ids flattened straight into numpy."""
        if not texts:
            return np.zeros(0, self.dtype), np.zeros(0, np.int64)
        docs = self.text.encode_batch(texts)
        eos = [self.eos_id] if len(self._eos) else []
        lengths = np.fromiter(map(len, docs), np.int64, count=len(docs)) + len(eos)
        # Straight from the id lists into one array: no per-document array or list copy.
        parts = chain.from_iterable((ids, eos) for ids in docs)
        tokens = np.fromiter(chain.from_iterable(parts), self.dtype, count=int(lengths.sum()))
        return tokens, lengths

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode texts, each followed by EOS (when the model has an eos piece).

        Returns:
            (tokens, lengths): the concatenated ids (1-D, uint16/uint32) and each
            document's length including its EOS (1-D int64).
        """
        if not texts:
            return np.zeros(0, self.dtype), np.zeros(0, np.int64)
        # One document per call, ids as numpy: ~5% faster than a batch call returning
        # lists of Python ints (measured; no int objects, no thread pool). Parallelism
        # comes from the actor pool.
        parts: list[np.ndarray] = []
        for text in texts:
            parts.append(self._encode(text, return_type="numpy"))
            parts.append(self._eos)
        lengths = np.fromiter(map(len, parts[::2]), np.int64, count=len(texts)) + len(self._eos)
        return np.concatenate(parts, dtype=self.dtype, casting="unsafe"), lengths
