"""Bits per byte: a validation loss that compares across tokenizers.

``bpb = (summed nats of the scored target tokens) / ln 2 / (UTF-8 bytes of those tokens)``.

Nats are the objective's cross-entropy summed over the positions it scores (mean loss ×
targets, exactly what the validation loss averages). Bytes are counted per target token from
a table over the vocabulary, built once from the dataset's tokenizer (:func:`token_bytes`):

- a special or control token (pad, unk, bos, eos, mask, extra specials): 0 bytes;
- a byte-fallback piece ``<0xNN>``: 1 byte;
- a byte-level BPE token (a ``tokenizers`` ByteLevel decoder, GPT-2 / Llama 3): one byte per
  character of the token string (each character stands for one byte);
- any other piece: the UTF-8 length of its text with sentencepiece's ``▁`` counted as the
  one-byte space it stands for (WordPiece's ``##`` prefix is not counted).

So a piece's bytes are those it contributes to decoded text, except that sentencepiece's
dummy prefix (the ``▁`` it puts before the first word of each document) counts one byte that
the source text does not have: one byte per document, an overcount of about 1/1000 on
1 KB documents. Decoding each id alone (``decode([id])``) would not do: it drops the leading
space of ``▁word`` and turns a lone byte of a multi-byte character into U+FFFD (3 bytes).

The metric is ``val/<dataset>/bpb`` for each validation dataset: the dataset names of the
prepared data, ``<source>/<dataset>`` for ``data.mix`` (:func:`val_datasets`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

import torch

from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.dataset_tokenizer import DatasetTokenizer, SentencePieceTokenizer
from lmforge.pipeline.contract.hf_tokenizer import HFTokenizer
from lmforge.pipeline.loader.mix import Mix

IGNORE_INDEX = -100
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def bits_per_byte(nats: float, n_bytes: float) -> float:
    """Summed nats over ``n_bytes`` UTF-8 bytes, in bits per byte (nan when no bytes)."""
    return nats / math.log(2) / n_bytes if n_bytes > 0 else float("nan")


def _byte_level(handle: Any) -> bool:
    inner = getattr(handle, "tokenizer", None)  # an HF `tokenizers.Tokenizer`
    return type(getattr(inner, "decoder", None)).__name__ == "ByteLevel"


def piece_bytes(piece: str, byte_level: bool = False) -> int:
    """The UTF-8 bytes one (non-special) token string stands for (see the module docstring)."""
    if _BYTE_PIECE.match(piece):
        return 1
    if byte_level:
        return len(piece)
    return len(piece.removeprefix("##").replace("\u2581", " ").encode("utf-8"))


def token_bytes(tokenizer: DatasetTokenizer | SentencePieceTokenizer | HFTokenizer,
                size: int, special_ids: Iterable[int] = ()) -> torch.Tensor:
    """Bytes of each id below ``size`` (the model's vocabulary; ids the tokenizer lacks count
    0), as an int64 tensor to index with target ids.

    Args:
        tokenizer: The dataset's tokenizer (its special ids count 0), or an opened one.
        size: At least the tokenizer's vocabulary.
        special_ids: More ids that count 0 (an opened tokenizer's specials).

    Raises:
        ValueError: The dataset's tokenizer files cannot be read or opened.
    """
    special = set(special_ids)
    handle = tokenizer
    if isinstance(tokenizer, DatasetTokenizer):
        handle = tokenizer.tokenizer
        special |= set(tokenizer.info.special_ids())
    byte_level = _byte_level(handle)
    processor = getattr(handle, "processor", None)  # sentencepiece
    table = torch.zeros(size, dtype=torch.int64)
    for i in range(min(size, handle.vocab_size)):
        if i in special:
            continue
        if processor is not None:
            if processor.is_control(i) or processor.is_unknown(i):
                continue
            if processor.is_byte(i):
                table[i] = 1
                continue
        table[i] = piece_bytes(handle.id_to_piece(i), byte_level)
    return table


def target_bytes(labels: torch.Tensor, table: torch.Tensor) -> int:
    """UTF-8 bytes of the targets in ``labels`` (``IGNORE_INDEX`` elsewhere)."""
    targets = labels[labels != IGNORE_INDEX]
    return int(table.to(targets.device)[targets].sum())


def val_datasets(data: DatasetManifest | Mix) -> dict[str, DatasetManifest | Mix]:
    """Each validation dataset alone, by the name its bpb is logged under: the prepared
    dataset's names, or ``<source>/<dataset>`` for ``data.mix``; datasets without a
    validation sample are left out."""
    def with_val(manifest: DatasetManifest) -> list[str]:
        return [name for name, info in manifest.datasets.items()
                if "val" in info.splits and info.splits["val"].samples > 0]

    def alone(manifest: DatasetManifest, name: str) -> DatasetManifest:
        return dataclasses.replace(manifest, datasets={name: manifest.datasets[name]})

    if isinstance(data, DatasetManifest):
        return {name: alone(data, name) for name in with_val(data)}
    out: dict[str, DatasetManifest | Mix] = {}
    for source, manifest in zip(data.sources, data.manifests, strict=True):
        for name in with_val(manifest):
            out[f"{source.label}/{name}"] = Mix([source], [alone(manifest, name)])
    return out
