"""A Hugging Face tokenizer against `transformers.AutoTokenizer`, on the way in and out.

The pipeline reads an HF tokenizer with `tokenizers` alone (pipeline/contract/hf_tokenizer.py
reproduces what `AutoTokenizer` does with `tokenizer.json` and `tokenizer_config.json`).
Some tokenizer classes rebuild their pre-tokenizer in their own constructor, and transformers
patches a few tokenizers (old Mistral regexes), so the reading is checked, not trusted:

- `check_hf_source`, before a corpus is encoded (`lmforge prepare`): `AutoTokenizer` on the
  configured folder must give lmforge's ids and special ids on varied text, or prepare is
  refused naming `tokenizer.model_path`, the class and the first text that differs;
- `verify_hf_tokenizer`, on every export: `AutoTokenizer` on the exported folder must give
  the ids the data was encoded with.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.launch.export import ExportError
from lmforge.pipeline.contract.dataset_tokenizer import (
    HF,
    DatasetTokenizer,
    open_tokenizer,
    tokenizer_source,
)


def _first_difference(encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                      ids: dict[str, int], hf: Any, texts: list[str]) -> str | None:
    """What first differs between lmforge's tokenizer and `hf` (an AutoTokenizer): a special
    id, a text's ids (special tokens added, as for a document) or their decoded text."""
    for role, want in ids.items():
        got = getattr(hf, f"{role}_token_id")
        got = -1 if got is None else got
        if got != want:
            return f"{role} id {got} with AutoTokenizer but {want} in lmforge"
    for index, text in enumerate(texts):
        want_ids, got = encode(text), hf.encode(text)
        if got != want_ids:
            return (f"text #{index} {text!r} encodes to {got} with AutoTokenizer but to "
                    f"{want_ids} in lmforge")
        want_text, got_text = decode(got), hf.decode(got, skip_special_tokens=True)
        if got_text != want_text:
            return (f"text #{index} {text!r}: ids {got} decode to {got_text!r} with "
                    f"AutoTokenizer but {want_text!r} in lmforge")
    return None


def check_hf_source(model_path: str | Path | None, texts: list[str]) -> None:
    """Refuse an HF tokenizer that lmforge would encode differently from
    `AutoTokenizer.from_pretrained` (nothing to do for sentencepiece or no tokenizer).

    A folder is loaded as it is (with its config.json, as a user's AutoTokenizer loads it);
    a bare tokenizer.json from a folder holding only it.

    Raises:
        ValueError: Naming ``tokenizer.model_path``, the tokenizer class and what differs.
    """
    if not model_path:
        return
    source = tokenizer_source(model_path)
    if source.kind != HF:
        return
    from transformers import AutoTokenizer  # slow import; only for an HF tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(model_path)
        if not folder.is_dir():
            shutil.copyfile(folder, Path(tmp) / "tokenizer.json")
            folder = Path(tmp)
        hf = AutoTokenizer.from_pretrained(str(folder))
    ours = open_tokenizer(source)
    ids = {"bos": ours.bos_id, "eos": ours.eos_id, "pad": ours.pad_id}
    problem = _first_difference(ours.encode, ours.decode, ids, hf, texts)
    if problem:
        raise ValueError(
            f"tokenizer.model_path: {model_path}: lmforge's reading of tokenizer.json does not "
            f"encode as AutoTokenizer ({type(hf).__name__}) does: {problem}. This class "
            "rebuilds its tokenizer from the vocabulary: if tokenizer.json is right, set "
            "\"tokenizer_class\": \"TokenizersBackend\" in tokenizer_config.json; otherwise "
            "save the tokenizer AutoTokenizer builds (save_pretrained) and point at that folder")


def verify_hf_tokenizer(tokenizer: DatasetTokenizer, out_dir: str | Path,
                        texts: list[str]) -> None:
    """Checks that `AutoTokenizer.from_pretrained(out_dir)` encodes like the dataset's HF
    tokenizer: the same ids (special tokens added as for a document) and the same decoded
    text for every text, and the bos/eos/pad ids the manifest records.

    Raises:
        ExportError: Naming the first text (or special id) that differs, with both results.
    """
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out_dir))
    info = tokenizer.info
    ids = {"bos": info.bos_id, "eos": info.eos_id, "pad": info.pad_id}
    problem = _first_difference(tokenizer.encode, tokenizer.decode, ids, hf, texts)
    if problem:
        raise ExportError(f"tokenizer export {out_dir} (from {tokenizer.folder}): {problem} "
                          "(the ids the data was encoded with); please report it with the "
                          "tokenizer")
