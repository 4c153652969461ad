"""The import gate: a Hugging Face ``init.source`` trains only once lmforge's model on its
weights computes what ``transformers`` computes from the same folder.

Runs on rank 0, inside the job, after the source's weights are in lmforge's model and
before DeepSpeed takes it (``warm_start.load_source_weights``); the other ranks wait in
``deepspeed.initialize``. Not in the launcher: for a 7B source the check holds two fp32
copies of the model (~56 GB) for a moment, which the job's node has and a login node or the
machine that submits to Slurm may not; and ``transformers`` is loaded only here. The
``transformers`` model is loaded, run on the probes and freed before lmforge's runs.

The check (fp32, eval): logits on random probe ids over the whole vocabulary within
``atol`` (an encoder-decoder also gets random target ids), and, for the generative
families, identical greedy tokens from a probe prompt — lmforge's cached ``generate`` vs
greedy argmax over ``transformers``' full forward at each step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

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


def _load_transformers(folder: Path, cfg: ModelConfig) -> nn.Module:
    import transformers

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    cls = cls or getattr(transformers, _AUTO_OF_FAMILY[cfg.family])
    model, info = cls.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True,
                                      output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise ImportGateError(f"init.source: transformers finds weights missing in {folder} "
                              f"({sorted(missing)[:5]}); the folder is incomplete")
    return model.eval()


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
    ``folder``; global RNG state is left as it was.

    Raises:
        ImportGateError: The logits differ by more than ``atol`` (the message gives the
            measured difference) or the greedy tokens differ.
    """
    cfg: ModelConfig = model.cfg
    ids, targets = _probes(cfg, seed)
    start_id = int((cfg.hf_config or {}).get("decoder_start_token_id") or 2)
    with torch.random.fork_rng(devices=[]):
        hf = _load_transformers(folder, cfg)
        hf_class = type(hf).__name__
        reference, hf_tokens = _reference(hf, cfg, ids, targets, start_id)
        del hf  # freed before lmforge's forward: one fp32 copy of the model at a time
        was_training = model.training
        model.eval()
        try:
            logits, tokens = _ours(model.float(), cfg, ids, targets, start_id,
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
