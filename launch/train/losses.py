"""Training objectives: a loader batch in, the model's loss out, one small object per family.

``train.objective`` picks one (``RunConfig`` checks it against ``model.family``):

- ``causal_lm`` (decoder): next-token loss on the loader's shifted ``labels``.
- ``masked_lm`` (encoder): BERT 80/10/10 corruption of ``input_ids``; loss on the selected
  positions.
- ``denoising`` (encoder-decoder): BART text infilling of ``input_ids``; the decoder
  reconstructs the clean row.

Corruption draws from a ``torch.Generator`` the trainer seeds from (seed, step, rank,
micro-batch), so a resumed run corrupts exactly as the uninterrupted one did. The random
work runs on CPU (where the loader's tensors are) and only the results move to the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.model import causal_lm_loss, denoising_inputs, masked_lm_inputs, masked_lm_loss

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the objectives need, read from the dataset manifest's tokenizer section."""

    pad: int
    eos: int
    mask: int | None
    never_masked: tuple[int, ...]  # special pieces that masked LM never selects


@dataclass
class ObjectiveOutput:
    """One micro-batch through an objective."""

    loss: Tensor  # scalar fp32, connected to the graph
    targets: int  # positions the loss averages over (weights validation means)
    tokens: int  # real (non-padding) input tokens, for throughput and tokens_seen


def special_ids(manifest: Path | str) -> SpecialIds:
    """Pad/EOS/mask ids of the dataset's tokenizer.

    Args:
        manifest: The prepared dataset's ``manifest.json``.

    Returns:
        The ids; ``mask`` is None when the tokenizer has no mask piece.
    """
    tokenizer = json.loads(Path(manifest).read_text(encoding="utf-8"))["tokenizer"]
    specials = tokenizer.get("special_tokens") or {}
    mask = specials.get("mask", {}).get("id")
    never = {tokenizer[k] for k in ("pad_id", "unk_id", "bos_id", "eos_id") if k in tokenizer}
    never |= {entry["id"] for role, entry in specials.items() if role != "extra"}
    never |= {entry["id"] for entry in specials.get("extra", [])}
    never = {i for i in never if i is not None and i >= 0}
    return SpecialIds(pad=int(tokenizer["pad_id"]), eos=int(tokenizer["eos_id"]),
                      mask=None if mask is None else int(mask), never_masked=tuple(sorted(never)))


def corruption_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """A CPU generator seeded from where in the run a micro-batch is (not from history).

    Hashing the coordinates, rather than carrying one generator along, keeps resume exact
    without saving generator state and gives every rank and micro-batch its own stream.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{rank}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class CausalLM:
    """Next-token prediction on the loader's (already shifted) labels."""

    def __init__(self, document_masking: bool) -> None:
        self.document_masking = document_masking

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 generator: torch.Generator) -> ObjectiveOutput:
        inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True)}
        if self.document_masking:
            inputs["segment_ids"] = batch["segment_ids"].to(device, non_blocking=True)
            inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        loss = causal_lm_loss(model(**inputs), labels)
        targets = int((labels != IGNORE_INDEX).sum())
        return ObjectiveOutput(loss, targets, targets)


class MaskedLM:
    """BERT masked LM over ``input_ids`` (the packed row without its last token)."""

    def __init__(self, ids: SpecialIds, vocab_size: int, document_masking: bool,
                 mask_prob: float = 0.15) -> None:
        self.ids = ids
        self.vocab_size = vocab_size
        self.document_masking = document_masking
        self.mask_prob = mask_prob

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 generator: torch.Generator) -> ObjectiveOutput:
        clean = batch["input_ids"]  # (B, T)
        corrupted, labels = masked_lm_inputs(
            clean, mask_id=self.ids.mask, vocab_size=self.vocab_size, generator=generator,
            mask_prob=self.mask_prob, special_ids=list(self.ids.never_masked),
            ignore_index=IGNORE_INDEX)
        real = clean != self.ids.pad
        inputs = {"input_ids": corrupted.to(device), "attention_mask": real.long().to(device)}
        if self.document_masking:
            inputs["segment_ids"] = batch["segment_ids"].to(device, non_blocking=True)
            inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
        logits = model(**inputs)
        targets = int((labels != IGNORE_INDEX).sum())
        if targets == 0:  # nothing selected (tiny batch): a zero loss still reaches every grad
            return ObjectiveOutput(logits.float().sum() * 0.0, 0, int(real.sum()))
        return ObjectiveOutput(masked_lm_loss(logits, labels.to(device)), targets,
                               int(real.sum()))


class Denoising:
    """BART text infilling: corrupted row into the encoder, the clean row out of the decoder."""

    def __init__(self, ids: SpecialIds, mask_ratio: float = 0.3,
                 poisson_lambda: float = 3.0) -> None:
        self.ids = ids
        self.mask_ratio = mask_ratio
        self.poisson_lambda = poisson_lambda

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 generator: torch.Generator) -> ObjectiveOutput:
        parts = denoising_inputs(
            batch["input_ids"], mask_id=self.ids.mask, pad_id=self.ids.pad,
            decoder_start_id=self.ids.eos, generator=generator, mask_ratio=self.mask_ratio,
            poisson_lambda=self.poisson_lambda, ignore_index=IGNORE_INDEX)
        labels = parts.pop("labels").to(device)
        logits = model(**{name: t.to(device) for name, t in parts.items()})
        targets = int((labels != IGNORE_INDEX).sum())
        return ObjectiveOutput(causal_lm_loss(logits, labels), targets, targets)


Objective = CausalLM | MaskedLM | Denoising


def build_objective(name: str, manifest: Path | str, vocab_size: int,
                    document_masking: bool) -> Objective:
    """The objective ``train.objective`` names.

    Args:
        name: ``causal_lm``, ``masked_lm`` or ``denoising``.
        manifest: The prepared dataset's ``manifest.json`` (special token ids).
        vocab_size: Model vocabulary (masked LM's random replacements come from it).
        document_masking: Whether batches carry segment/position ids to pass on.

    Raises:
        ValueError: The objective needs a mask token the dataset's tokenizer lacks.
    """
    if name == "causal_lm":
        return CausalLM(document_masking)
    ids = special_ids(manifest)
    if ids.mask is None:
        raise ValueError(
            f"train.objective: {name} needs a mask token, but the tokenizer of {manifest} has "
            "none; set tokenizer.mask_token (e.g. '<mask>') and run `lmforge prepare` again"
        )
    if name == "masked_lm":
        return MaskedLM(ids, vocab_size, document_masking)
    if name == "denoising":
        return Denoising(ids)
    raise ValueError(f"train.objective: unknown objective {name!r}")
