"""Hugging Face export: a folder `transformers` loads with its Auto classes, logit-verified.

`write_hf_folder` takes the Hugging Face config and state dict (from
`lmforge.model.hf.to_hf`) and the run's sentencepiece model, and writes `config.json`,
`model.safetensors`, `generation_config.json`, the tokenizer files and the sentencepiece
`tokenizer.model` into a temporary sibling folder; a `verify` callback checks that folder,
and only then is it renamed into place, so a crash or a failed check never replaces the
previous export. It replaces only an earlier export (whose `.lmforge_export` marker lists
every file in it) or an empty folder, never another folder (`check_replaceable`).
`verify_logits` reloads a folder with the Auto class of its architecture
(`AutoModelForCausalLM`, `AutoModelForMaskedLM`, `AutoModelForSeq2SeqLM`) and compares
its logits with the training model's.

Load exports with the Auto classes: `LlamaTokenizer.from_pretrained(export)` in transformers
5.x rebuilds its own pre-tokenizer around the vocabulary and differs from sentencepiece on
texts that start with a space; `AutoTokenizer` reads the verified `tokenizer.json` as is.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.launch.export import ExportError
from lmforge.launch.export.hf_tokenizer import tokenizer_ids, write_tokenizer
from lmforge.pipeline.contract.dataset_tokenizer import DatasetTokenizer

__all__ = ["MARKER", "ExportError", "check_replaceable", "verify_logits", "write_hf_folder"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# The Auto class that loads each architecture lmforge exports (see hf_classes.hf_architecture).
AUTO_CLASS_OF = {
    "LlamaForCausalLM": "AutoModelForCausalLM",
    "GPT2LMHeadModel": "AutoModelForCausalLM",
    "BertForMaskedLM": "AutoModelForMaskedLM",
    "BertForSequenceClassification": "AutoModelForSequenceClassification",
    "BartForConditionalGeneration": "AutoModelForSeq2SeqLM",
}


def _model_class_name(hf_config: dict[str, Any]) -> str:
    """The class the export holds: the config's `architectures`, else the `*ForCausalLM`
    class `AutoModelForCausalLM` builds for its model_type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    named = (hf_config.get("architectures") or [None])[0]
    if named in AUTO_CLASS_OF:
        return named
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(
            f"config.model_type: {model_type!r} is not a causal LM model type of transformers; "
            "build the config with lmforge.model.hf.to_hf (e.g. 'llama' or 'gpt2')"
        )
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def _untie(
    hf_config: dict[str, Any], state_dict: dict[str, torch.Tensor], class_name: str
) -> dict[str, torch.Tensor]:
    """Drops the tied copies (e.g. `lm_head.weight`) that transformers re-ties on load.

    safetensors refuses tensors that share storage, and Hugging Face checkpoints of tied
    models store only the source tensor; a tied copy that differs from its source would be
    silently replaced on load, so it is an error.
    """
    import transformers

    tied = getattr(getattr(transformers, class_name, None), "_tied_weights_keys", None)
    if not isinstance(tied, dict):
        tied = {"lm_head.weight": None}
    if not hf_config.get("tie_word_embeddings", False):
        return dict(state_dict)
    kept = dict(state_dict)
    for copy_key, source_key in tied.items():
        if copy_key not in kept:
            continue
        source = kept.get(source_key) if source_key else None
        if source is not None and not torch.equal(kept[copy_key], source):
            raise ExportError(
                f"config.tie_word_embeddings is true but state dict '{copy_key}' differs from "
                f"'{source_key}'; set tie_word_embeddings false or export the tied model"
            )
        del kept[copy_key]
    return kept


def _contiguous_unshared(
    state_dict: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Casts floating tensors to `dtype`; every tensor contiguous, on CPU, in its own storage."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _check_token_ids(hf_config: dict[str, Any],
                     spm_model: str | Path | DatasetTokenizer) -> None:
    """The model's vocab must cover the tokenizer and agree on bos/eos/pad ids."""
    pieces, ids = tokenizer_ids(spm_model)
    if isinstance(spm_model, DatasetTokenizer):
        spm_model = spm_model.path
    vocab_size = hf_config.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < pieces:
        raise ExportError(
            f"config.vocab_size: {vocab_size} is below the {pieces} pieces of "
            f"{spm_model}; export with the tokenizer the model was trained with"
        )
    for key, spm_id in ids.items():
        value = hf_config.get(key)
        if value is not None and spm_id >= 0 and value != spm_id:
            raise ExportError(
                f"config.{key}: {value} but {spm_model} has id {spm_id}; pass "
                f"{key}={spm_id} to lmforge.model.hf.to_hf"
            )


def _fsync_tree(folder: Path) -> None:
    """Flushes every file and the folder itself, so the rename publishes complete bytes."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


MARKER = ".lmforge_export"
"""Written into every export: the files it holds. Only such a folder (holding nothing else)
or an empty one is ever replaced."""


def check_replaceable(out_dir: Path) -> None:
    """Raises unless ``out_dir`` is absent, empty, or an earlier lmforge export holding only
    the files its :data:`MARKER` lists: an export never deletes what lmforge did not write
    (another model, the run directory with its checkpoints and ``mlflow.db``).

    Raises:
        ExportError: Naming the folder, what is in it, and what to do.
    """
    what_to_do = ("choose another folder with --out (or export.output_dir), or move "
                  "the folder away yourself")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"{out_dir}: the export folder exists and is not a folder (a file "
                          f"or a symbolic link); lmforge will not replace it: {what_to_do}")
    if not out_dir.exists():
        return
    entries = {p.name for p in out_dir.iterdir()}
    if not entries:
        return
    listed: set[str] = set()
    if MARKER in entries:
        try:
            listed = set(json.loads((out_dir / MARKER).read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            listed = set()
    foreign = sorted(entries - listed - {MARKER})
    if not foreign:
        return
    run_files = sorted({"checkpoints", "mlflow.db", "config.yaml"} & set(foreign))
    if run_files:
        kind = f"looks like a run directory (it holds {', '.join(run_files)})"
    elif MARKER not in entries:
        kind = "is not empty and is not an lmforge export"
    else:
        kind = "is an lmforge export that also holds files lmforge did not write"
    shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
    raise ExportError(f"{out_dir}: the export folder {kind} ({shown}); an export replaces "
                      f"only an earlier export or an empty folder: {what_to_do}")


def save_weights(tensors: dict[str, torch.Tensor], folder: Path,
                 max_shard_size: int | None = None) -> list[str]:
    """Writes ``model.safetensors``, or, when the tensors exceed ``max_shard_size`` bytes,
    ``model-0000i-of-0000n.safetensors`` files filled in key order (a tensor larger than
    the limit gets a file of its own) and ``model.safetensors.index.json`` mapping each
    tensor to its file, as transformers does. Returns the weight files' names."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_hf_folder(
    out_dir: str | Path,
    hf_config: dict[str, Any],
    hf_state_dict: dict[str, torch.Tensor],
    spm_model: str | Path | DatasetTokenizer,
    *,
    dtype: torch.dtype = torch.float32,
    verify: Callable[[Path], None] | None = None,
    max_shard_size: int | None = None,
) -> Path:
    """Writes a Hugging Face model folder, atomically, verified before it is published.

    Args:
        out_dir: Destination folder: absent, empty, or an earlier export (its
            :data:`MARKER` lists every file in it), which is replaced; anything else is
            refused before any work.
        hf_config: `PretrainedConfig.to_dict()`-style mapping with `model_type`.
        hf_state_dict: Tensors under Hugging Face names.
        spm_model: The run's tokenizer (the dataset's handle, or a sentencepiece `.model`):
            exported (an HF tokenizer's files copied) and verified as the tokenizer.
        dtype: Dtype of the floating tensors in `model.safetensors` (and `config.dtype`).
        max_shard_size: Largest weight file in bytes; more weights are split into shards with
            an index (:func:`save_weights`). None: one `model.safetensors`.
        verify: Called with the complete temporary folder before it takes `out_dir`'s
            place; whatever it raises leaves an existing export at `out_dir` untouched.

    Returns:
        The export folder.

    Raises:
        ExportError: The config, state dict and tokenizer do not fit together, or the
            tokenizer does not reproduce sentencepiece's ids (or `verify` raises it).
    """
    if dtype not in _DTYPE_NAMES:
        raise ExportError(f"dtype: {dtype} is not exportable; use one of {list(_DTYPE_NAMES)}")
    out_dir = Path(out_dir)
    class_name = _model_class_name(hf_config)
    _check_token_ids(hf_config, spm_model)
    config = dict(hf_config)
    config["architectures"] = config.get("architectures") or [class_name]
    config["dtype"] = _DTYPE_NAMES[dtype]
    config.pop("torch_dtype", None)  # transformers 5 names it `dtype`
    tensors = _contiguous_unshared(_untie(config, hf_state_dict, class_name), dtype)

    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of an earlier crash
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_weights(tensors, tmp, max_shard_size)
        generation = {
            key: config[key]
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
            if config.get(key) is not None
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer(spm_model, tmp)  # verified: AutoTokenizer encodes as the data was
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"written_by": "lmforge export",
                                              "files": files}, indent=2) + "\n")
        _fsync_tree(tmp)
        if verify is not None:
            verify(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap: the old export moves aside before the new one takes its name, so `out_dir` is
    # always absent or complete, never partial.
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        check_replaceable(out_dir)  # again: the folder may have changed while verifying
    except ExportError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def load_export(out_dir: str | Path) -> torch.nn.Module:
    """Loads an export in fp32 with the Auto class of its architecture, in eval mode.

    Raises:
        ExportError: Weights are missing or unused on load.
    """
    import transformers  # slow import; only when exporting

    config = json.loads((Path(out_dir) / "config.json").read_text())
    auto = getattr(transformers, AUTO_CLASS_OF.get(_model_class_name(config),
                                                   "AutoModelForCausalLM"))
    model, info = auto.from_pretrained(str(out_dir), dtype=torch.float32, output_loading_info=True,
                                       use_safetensors=True)  # never a pickled .bin
    missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
    if missing or unexpected:
        raise ExportError(
            f"{out_dir}: transformers found missing weights {sorted(missing)} and unused "
            f"weights {sorted(unexpected)}; the state dict names do not match the config's "
            "architecture (check lmforge.model.hf.to_hf)"
        )
    return model.eval()


def verify_logits(
    out_dir: str | Path,
    reference_logits: torch.Tensor,
    input_ids: torch.LongTensor,
    atol: float = 1e-4,
    *,
    decoder_input_ids: torch.LongTensor | None = None,
    model: torch.nn.Module | None = None,
) -> float:
    """Reloads an export with its Auto class (CausalLM, MaskedLM, Seq2SeqLM) and compares
    its logits.

    Args:
        out_dir: Folder written by `write_hf_folder`.
        reference_logits: Logits of the source model on `input_ids`, shape (B, T, V).
        input_ids: Token ids, shape (B, T) (an encoder-decoder's source).
        atol: Largest allowed absolute difference.
        decoder_input_ids: An encoder-decoder's teacher-forced target ids, shape (B, T).
        model: The export already loaded with :func:`load_export` (loaded here when None).

    Returns:
        The largest absolute logit difference.

    Raises:
        ExportError: Weights are missing or unused on load, shapes differ, or the difference
            exceeds `atol` (the message gives the measured difference).
    """
    model = load_export(out_dir) if model is None else model
    inputs = {"input_ids": input_ids}
    if decoder_input_ids is not None:
        inputs["decoder_input_ids"] = decoder_input_ids
    with torch.no_grad():
        logits = model(**inputs).logits  # (B, T, V)
    if logits.shape != reference_logits.shape:
        raise ExportError(
            f"{out_dir}: exported model gives logits of shape {tuple(logits.shape)} but the "
            f"reference has {tuple(reference_logits.shape)}; check config.vocab_size"
        )
    diff = (logits.float() - reference_logits.detach().float().cpu()).abs().max().item()
    if not diff <= atol:  # also catches NaN
        raise ExportError(
            f"{out_dir}: exported logits differ from the trained model's by {diff:.3g} "
            f"(> atol {atol:g}); the weight mapping or config (norm eps, rope theta, "
            "activation) does not match the trained model"
        )
    return diff
