"""The import gate: a Hugging Face ``init.source`` trains only once lmforge's model on its
weights computes what ``transformers`` computes from the same folder.

Runs on rank 0, inside the job, after the source's weights are in the training model
(``warm_start.load_source_weights``); the other ranks go on into ``deepspeed.initialize``
and wait there. Not in the launcher: ``transformers`` is loaded only here.

Memory (:func:`verify_import_streamed`, what a run does): neither model is ever whole. Both
are built with their parameters on the meta device (buffers real) and every module's
parameters are read from the source just before the module runs and dropped right after
(lmforge's through the same lazy mapping the training model was filled from, transformers'
from the safetensors files by its own names). Rank 0's extra peak is the two models'
buffers, one module's fp32 weights per model (the largest: the token embedding or output
matrix, 2.1 GB for Llama 3 8B) and the probes' activations; nothing on the other ranks.
The price is time: the weights are read once per forward, (2 + ``GREEDY_TOKENS``) times
per model (about 20 passes over the files, from the page cache after the first).
:func:`verify_import` takes an lmforge model already holding the weights (tests, and any
caller with the model at hand); its transformers side is streamed the same way.

The check (fp32, eval): logits on random probe ids over the whole vocabulary within
``atol`` (an encoder-decoder also gets random target ids), and, for the generative
families, identical greedy tokens from a probe prompt — lmforge's cached ``generate`` vs
greedy argmax over ``transformers``' full forward at each step.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.model import ModelConfig, generate, generate_seq2seq

log = logging.getLogger("lmforge.train")

PROBE_ROWS, PROBE_LENGTH, GREEDY_TOKENS = 2, 24, 8
"""Probe id rows and their length; new tokens compared greedily."""

_AUTO_OF_FAMILY = {"decoder": "AutoModelForCausalLM", "encoder": "AutoModelForMaskedLM",
                   "encoder_decoder": "AutoModelForSeq2SeqLM"}


class ImportGateError(ValueError):
    """lmforge's model on the source's weights differs from ``transformers`` on the folder
    (``load_source_weights`` raises it as a ``WarmStartError``, which the worker reports)."""


@dataclass
class ImportCheck:
    """What the gate measured."""

    hf_class: str
    max_diff: float
    greedy_tokens: list[int]

    def line(self) -> str:
        text = (f"import verified: {self.hf_class} max |logit diff| lmforge vs transformers = "
                f"{self.max_diff:.2e}")
        if self.greedy_tokens:
            text += f"; greedy tokens identical ({len(self.greedy_tokens)} tokens)"
        return text


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory) and keep
    their buffers real (RoPE tables, position ids): what :func:`streamed` fills."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextlib.contextmanager
def streamed(model: nn.Module, read: Callable[[list[str], torch.Size], torch.Tensor]
             ) -> Iterator[None]:
    """Runs ``model`` (meta parameters) with each module's own parameters read just before
    its forward, by ``read(its names, its shape)``, and dropped after it."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    handles = []
    for module in model.modules():
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        if not own:
            continue

        def load(mod: nn.Module, args: Any, own: list = own) -> None:
            for n, p in own:
                mod._parameters[n] = nn.Parameter(read(names[id(p)], p.shape),
                                                  requires_grad=False)

        def drop(mod: nn.Module, args: Any, out: Any, own: list = own) -> None:
            for n, p in own:
                mod._parameters[n] = p

        handles += [module.register_forward_pre_hook(load), module.register_forward_hook(drop)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        from lmforge.launch.train.source_load import release_freed_memory

        release_freed_memory()


def _reader(weights: Mapping[str, Any], what: str) -> Callable[[list[str], torch.Size],
                                                              torch.Tensor]:
    from lmforge.launch.train.source_load import materialize

    def read(names: list[str], shape: torch.Size) -> torch.Tensor:
        key = next((n for n in names if n in weights), None)
        if key is None:
            raise ImportGateError(f"init.source: {what} has no weight {names[0]!r}; the "
                                  "folder is incomplete")
        value = materialize(weights[key]).float()
        if value.shape != shape:  # lmforge pads the vocabulary: rows the source lacks
            padded = torch.zeros(shape)
            padded[: value.shape[0]] = value
            value = padded
        return value
    return read


def _load_transformers(folder: Path, cfg: ModelConfig
                       ) -> tuple[nn.Module, Callable[[list[str], torch.Size], torch.Tensor]]:
    """transformers' model of ``folder`` with meta parameters (buffers from the files),
    and the reader that streams its weights."""
    import transformers

    from lmforge.launch.train.source_load import SafetensorsFolder, safetensors_files

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = (config.get("architectures") or [None])[0]
    hf_config = transformers.AutoConfig.from_pretrained(str(folder))
    cls = getattr(transformers, name, None) if name else None
    with params_on_meta():
        if cls is not None:
            model = cls(hf_config)
        else:
            model = getattr(transformers, _AUTO_OF_FAMILY[cfg.family]).from_config(hf_config)
    files = SafetensorsFolder(safetensors_files(folder))
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""

    def key_of(name: str) -> str | None:
        for key in (name, name.removeprefix(prefix), prefix + name):
            if key in files:
                return key
        return None

    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(pname)
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    tied_head = bool(getattr(hf_config, "tie_word_embeddings", False)) and output is not None
    weights: dict[str, Any] = {}
    missing = []
    for param, group in groups.values():
        key = next((k for k in map(key_of, group) if k is not None), None)
        if key is None and tied_head and param is output.weight:  # saved once, as the input
            key = next((k for k in map(key_of, groups[id(inputs.weight)][1]) if k), None)
        if key is None:
            missing += [n for n in group if "position_ids" not in n]
            continue
        weights.update({pname: files[key] for pname in group})
    if missing:
        raise ImportGateError(f"init.source: transformers finds weights missing in {folder} "
                              f"({sorted(missing)[:5]}); the folder is incomplete")
    for bname, buffer in model.named_buffers():
        key = key_of(bname)
        if key is not None:
            buffer.data = files.read(key).to(buffer.dtype)
    return model.eval(), _reader(weights, str(folder))


def _probes(cfg: ModelConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (PROBE_ROWS, min(PROBE_LENGTH, cfg.max_seq_len - GREEDY_TOKENS))
    return (torch.randint(0, cfg.vocab_size, shape, generator=generator),
            torch.randint(0, cfg.vocab_size, shape, generator=generator))


@torch.no_grad()
def _reference(hf: nn.Module, cfg: ModelConfig, ids: torch.Tensor, targets: torch.Tensor,
               start_id: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' logits on the probes and its greedy continuation of the first row."""
    if cfg.family == "encoder_decoder":
        logits = hf(input_ids=ids, decoder_input_ids=targets).logits
        out = torch.tensor([[start_id]])
        for _ in range(GREEDY_TOKENS):
            step = hf(input_ids=ids[:1], decoder_input_ids=out).logits[:, -1].argmax(-1)
            out = torch.cat([out, step[:, None]], dim=1)
        return logits, out[0, 1:].tolist()
    logits = hf(input_ids=ids).logits
    if cfg.family == "encoder":
        return logits, []
    out = ids[:1]
    for _ in range(GREEDY_TOKENS):
        out = torch.cat([out, hf(input_ids=out).logits[:, -1].argmax(-1)[:, None]], dim=1)
    return logits, out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def _ours(model: nn.Module, cfg: ModelConfig, ids: torch.Tensor, targets: torch.Tensor,
          start_id: int, classify: bool) -> tuple[torch.Tensor, list[int]]:
    if cfg.family == "encoder_decoder":
        logits = model(ids, targets)
        out = generate_seq2seq(model, ids[:1], GREEDY_TOKENS, decoder_start_id=start_id)
        return logits, out[0, 1:].tolist()  # after decoder_start_id
    if cfg.family == "encoder":
        # The source's head: a classifier's scores, else the masked-LM logits.
        return (model.classify(ids) if classify else model(ids)), []
    out = generate(model, ids[:1], GREEDY_TOKENS, greedy=True)
    return model(ids), out[0, ids.shape[1]:].tolist()


def verify_import(folder: Path, model: nn.Module, atol: float = 1e-4, seed: int = 0
                  ) -> ImportCheck:
    """Compares ``model`` (lmforge, the source's weights loaded) with ``transformers`` on
    ``folder`` (streamed from its files); global RNG state is left as it was.

    Raises:
        ImportGateError: The logits differ by more than ``atol`` (the message gives the
            measured difference) or the greedy tokens differ.
    """
    return _compare(folder, model.float(), contextlib.nullcontext(), atol, seed)


def verify_import_streamed(folder: Path, cfg: ModelConfig, weights: Mapping[str, Any],
                           atol: float = 1e-4, seed: int = 0) -> ImportCheck:
    """:func:`verify_import` for lmforge's model of ``cfg`` on ``weights`` (lmforge names;
    tensors or ``LazyTensor`` s), never holding either model whole (module docstring)."""
    with params_on_meta():
        model = cfg.build()
    return _compare(folder, model, streamed(model, _reader(weights, "the source")), atol, seed)


def _compare(folder: Path, model: nn.Module, ours_context: Any, atol: float, seed: int
             ) -> ImportCheck:
    cfg: ModelConfig = model.cfg
    ids, targets = _probes(cfg, seed)
    start_id = int((cfg.hf_config or {}).get("decoder_start_token_id") or 2)
    with torch.random.fork_rng(devices=[]):
        hf, read = _load_transformers(folder, cfg)
        hf_class = type(hf).__name__
        with streamed(hf, read):
            reference, hf_tokens = _reference(hf, cfg, ids, targets, start_id)
        del hf
        was_training = model.training
        model.eval()
        try:
            with ours_context:
                logits, tokens = _ours(model, cfg, ids, targets, start_id,
                                       hf_class.endswith("SequenceClassification"))
        finally:
            model.train(was_training)
    if logits.shape != reference.shape:
        raise ImportGateError(f"init.source: lmforge's logits have shape {tuple(logits.shape)}, "
                              f"{hf_class}'s {tuple(reference.shape)} on {folder}")
    diff = (logits.float() - reference.float()).abs().max().item()
    if not diff <= atol:  # NaN fails too
        raise ImportGateError(
            f"init.source: lmforge's model on the weights of {folder} differs from "
            f"transformers' {hf_class} by {diff:.3g} in the logits (> {atol:g}); the import "
            "does not reproduce the model (its config.json has a field lmforge reads wrongly): "
            "training from it would start from another model. Report it with the config.json")
    if tokens != hf_tokens:
        raise ImportGateError(
            f"init.source: greedy tokens differ between transformers' {hf_class} "
            f"({hf_tokens}) and lmforge ({tokens}) on {folder}, although the logits agree "
            f"within {diff:.3g}; the import does not reproduce the model")
    return ImportCheck(hf_class, diff, tokens)
