"""Training objectives: a loader batch in, the model's loss out, one small object per family.

The tensor maths is in ``model/``: the losses in ``losses.py``, BERT and BART corruption in
``objective_inputs.py``; this module applies it to loader batches on the engine's device.

``train.objective`` picks one (``RunConfig`` checks it against ``model.family``):

- ``causal_lm`` (decoder): next-token loss on the loader's shifted ``labels``.
- ``masked_lm`` (encoder): BERT 80/10/10 corruption of ``input_ids``; loss on the selected
  positions.
- ``denoising`` (encoder-decoder): BART text infilling of ``input_ids``; the decoder
  reconstructs the clean row.

On task data (``data.task``; batches as ``pipeline/loader/batches.py`` builds them):

- ``sft`` (decoder): next-token loss on the loader's ``labels`` (response tokens only),
  attention and positions restricted to each packed example (``segment_ids``,
  ``position_ids``).
- ``classify`` (encoder): cross-entropy of the [CLS] head's scores against ``labels`` (B,).
- ``seq2seq`` (encoder-decoder): teacher forcing; the decoder reads ``target_ids`` shifted
  right (starting with eos, BART's convention) and predicts ``target_ids``.

In evaluation (the model in eval mode) classify and seq2seq also return predictions with
their references (seq2seq: greedy decoding, as text), which ``task_metrics.py`` scores.

Corruption draws from a ``torch.Generator`` the trainer seeds from (seed, step, rank,
micro-batch), so a resumed run corrupts exactly as the uninterrupted one did. The random
work runs on CPU (where the loader's tensors are) and only the results move to the device.

Every objective that predicts the vocabulary goes through ``vocab_loss``: with
``train.loss_chunk_tokens`` > 0 the model returns its final hidden states and
``model.losses.chunked_lm_loss`` projects them chunk by chunk, so the step never holds the
whole (B, T, V) fp32 logits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.launch.train.task_metrics import classification_metrics, generation_metrics
from lmforge.model import (
    causal_lm_loss,
    chunked_lm_loss,
    denoising_inputs,
    generate_seq2seq,
    masked_lm_inputs,
    shift_right,
)
from lmforge.pipeline.contract.dataset_manifest import TokenizerInfo
from lmforge.pipeline.contract.dataset_tokenizer import DatasetTokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the objectives need, from the dataset manifest's tokenizer section."""

    pad: int  # the padding id; without a pad piece one past the vocabulary (not a model input)
    eos: int  # -1: the tokenizer has none
    mask: int | None
    never_masked: tuple[int, ...]  # special pieces (and the padding id) masked LM never selects
    pad_input: int | None = None  # fed to the model where ``pad`` is (masked anyway); None: pad

    def model_input(self, ids: Tensor) -> Tensor:
        """``ids`` with padding replaced by an id the embedding has (a no-op with a pad piece)."""
        if self.pad_input is None or self.pad_input == self.pad:
            return ids
        return ids.masked_fill(ids == self.pad, self.pad_input)


@dataclass
class ObjectiveOutput:
    """One micro-batch through an objective."""

    loss: Tensor  # scalar fp32, connected to the graph
    targets: int  # positions the loss averages over (weights validation means)
    tokens: int  # real (non-padding) input tokens, for throughput and tokens_seen
    predictions: list[Any] | None = None  # evaluation only: what the model predicted ...
    references: list[Any] | None = None  # ... and what it should have (task objectives)
    labels: Tensor | None = None  # the targets the loss scored, IGNORE_INDEX elsewhere (bpb)


def special_ids(tokenizer: TokenizerInfo) -> SpecialIds:
    """Pad/EOS/mask ids of the dataset's tokenizer (``mask`` None when it has no mask piece).

    Without a pad piece the padding id is one past the vocabulary, which no embedding row
    need hold: the model sees the unk piece there instead (attention masks and ignored
    labels keep those positions out of every loss).
    """
    pad_input = tokenizer.pad_id if tokenizer.pad_id >= 0 else max(tokenizer.unk_id, 0)
    return SpecialIds(pad=tokenizer.padding_id, eos=tokenizer.eos_id, mask=tokenizer.mask_id,
                      never_masked=tuple(sorted({*tokenizer.special_ids(), tokenizer.padding_id})),
                      pad_input=pad_input)


def corruption_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """A CPU generator seeded from where in the run a micro-batch is (not from history).

    Hashing the coordinates, rather than carrying one generator along, keeps resume exact
    without saving generator state and gives every rank and micro-batch its own stream.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{rank}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def vocab_loss(model: nn.Module, inputs: dict[str, Tensor], labels: Tensor,
               chunk_tokens: int = 0) -> Tensor:
    """Mean fp32 cross-entropy of the model's vocabulary predictions against ``labels``.

    Args:
        model: The model or its DeepSpeed engine; called once with ``inputs``.
        inputs: Keyword arguments of the model's forward.
        labels: (B, T) targets aligned with the logits, ``IGNORE_INDEX`` where none.
        chunk_tokens: 0: the plain loss on the model's logits; > 0: the model returns its
            hidden states and its ``lm_head`` projects ``chunk_tokens`` positions at a time
            (``train.loss_chunk_tokens``).

    Returns:
        Scalar fp32 loss; a zero connected to the graph when no label counts (so every
        parameter still gets a gradient).
    """
    if chunk_tokens <= 0:
        logits = model(**inputs)
        if not bool((labels != IGNORE_INDEX).any()):
            return logits.float().sum() * 0.0
        return causal_lm_loss(logits, labels, IGNORE_INDEX)
    hidden = model(**inputs, return_hidden=True)
    module = getattr(model, "module", model)  # the engine's model owns lm_head and cfg
    return chunked_lm_loss(hidden, module.lm_head, labels, module.cfg.vocab_size,
                           chunk_tokens, IGNORE_INDEX)


class CausalLM:
    """Next-token prediction on the loader's (already shifted) labels."""

    language_model = True  # validation perplexity is meaningful

    def __init__(self, document_masking: bool, ids: SpecialIds | None = None,
                 loss_chunk_tokens: int = 0) -> None:
        self.document_masking = document_masking
        self.ids = ids
        self.loss_chunk_tokens = loss_chunk_tokens

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 generator: torch.Generator) -> ObjectiveOutput:
        input_ids = batch["input_ids"]
        if self.ids is not None:
            input_ids = self.ids.model_input(input_ids)
        inputs = {"input_ids": input_ids.to(device, non_blocking=True)}
        if self.document_masking:
            inputs["segment_ids"] = batch["segment_ids"].to(device, non_blocking=True)
            inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        loss = vocab_loss(model, inputs, labels, self.loss_chunk_tokens)
        targets = int((labels != IGNORE_INDEX).sum())
        return ObjectiveOutput(loss, targets, targets, labels=labels)


class MaskedLM:
    """BERT masked LM over ``input_ids`` (the packed row without its last token)."""

    language_model = True  # validation perplexity is meaningful

    def __init__(self, ids: SpecialIds, vocab_size: int, document_masking: bool,
                 mask_prob: float = 0.15, loss_chunk_tokens: int = 0) -> None:
        self.ids = ids
        self.vocab_size = vocab_size
        self.document_masking = document_masking
        self.mask_prob = mask_prob
        self.loss_chunk_tokens = loss_chunk_tokens

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 generator: torch.Generator) -> ObjectiveOutput:
        clean = batch["input_ids"]  # (B, T)
        corrupted, labels = masked_lm_inputs(
            clean, mask_id=self.ids.mask, vocab_size=self.vocab_size, generator=generator,
            mask_prob=self.mask_prob, special_ids=list(self.ids.never_masked),
            ignore_index=IGNORE_INDEX)
        real = clean != self.ids.pad
        inputs = {"input_ids": self.ids.model_input(corrupted).to(device),
                  "attention_mask": real.long().to(device)}
        if self.document_masking:
            inputs["segment_ids"] = batch["segment_ids"].to(device, non_blocking=True)
            inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
        # nothing selected (tiny batch): a zero loss still reaches every grad
        loss = vocab_loss(model, inputs, labels.to(device), self.loss_chunk_tokens)
        return ObjectiveOutput(loss, int((labels != IGNORE_INDEX).sum()), int(real.sum()),
                               labels=labels)


class Denoising:
    """BART text infilling: corrupted row into the encoder, the clean row out of the decoder."""

    language_model = True  # validation perplexity is meaningful

    def __init__(self, ids: SpecialIds, mask_ratio: float = 0.3,
                 poisson_lambda: float = 3.0, loss_chunk_tokens: int = 0) -> None:
        self.ids = ids
        self.mask_ratio = mask_ratio
        self.poisson_lambda = poisson_lambda
        self.loss_chunk_tokens = loss_chunk_tokens

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 generator: torch.Generator) -> ObjectiveOutput:
        parts = denoising_inputs(
            batch["input_ids"], mask_id=self.ids.mask, pad_id=self.ids.pad,
            decoder_start_id=self.ids.eos, generator=generator, mask_ratio=self.mask_ratio,
            poisson_lambda=self.poisson_lambda, ignore_index=IGNORE_INDEX)
        labels = parts.pop("labels").to(device)
        for name in ("input_ids", "decoder_input_ids"):
            parts[name] = self.ids.model_input(parts[name])
        loss = vocab_loss(model, {name: t.to(device) for name, t in parts.items()}, labels,
                          self.loss_chunk_tokens)
        targets = int((labels != IGNORE_INDEX).sum())
        return ObjectiveOutput(loss, targets, targets, labels=labels)


def evaluating(model: nn.Module) -> bool:
    """Whether the model is in eval mode (a DeepSpeed engine's own ``training`` flag does
    not follow ``eval()``; its module's does)."""
    return not getattr(model, "module", model).training


class SFT(CausalLM):
    """Supervised fine-tuning: causal LM on response tokens only (the loader's ``labels``
    are -100 elsewhere), each packed example attending only to itself."""

    def __init__(self, ids: SpecialIds, loss_chunk_tokens: int = 0) -> None:
        # A row without any response token gets a connected zero loss (``vocab_loss``).
        super().__init__(document_masking=True, ids=ids, loss_chunk_tokens=loss_chunk_tokens)


class Classify:
    """Sequence classification with the encoder's [CLS] head."""

    language_model = False

    def __init__(self, ids: SpecialIds, labels: list[str]) -> None:
        self.ids = ids
        self.labels = list(labels)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 generator: torch.Generator) -> ObjectiveOutput:
        mask = batch["attention_mask"]
        labels = batch["labels"].to(device)  # -100: a padding row of the last batch
        scores = model(input_ids=self.ids.model_input(batch["input_ids"]).to(device),
                       attention_mask=mask.to(device), head="classify")  # (B, num_labels)
        real = labels != IGNORE_INDEX
        targets = int(real.sum())
        if targets == 0:
            return ObjectiveOutput(scores.float().sum() * 0.0, 0, 0, [], [])
        loss = F.cross_entropy(scores.float(), labels, ignore_index=IGNORE_INDEX)
        out = ObjectiveOutput(loss, targets, int(mask[real.cpu()].sum()))
        if evaluating(model):
            out.predictions = scores.argmax(-1)[real].tolist()
            out.references = labels[real].tolist()
        return out

    def metrics(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        """Accuracy, macro F1 and per-class F1 (``val_`` names)."""
        return classification_metrics(predictions, references, self.labels)


class Seq2Seq:
    """Teacher-forced sequence-to-sequence on task data; in evaluation also greedy decoding
    of every source, scored as text (exact match, BLEU)."""

    language_model = True

    def __init__(self, ids: SpecialIds, tokenizer_model: DatasetTokenizer | None = None,
                 decode: bool = True, loss_chunk_tokens: int = 0) -> None:
        self.ids = ids
        self.tokenizer_model = tokenizer_model
        self.decode = decode and tokenizer_model is not None
        self.loss_chunk_tokens = loss_chunk_tokens

    def __call__(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 generator: torch.Generator) -> ObjectiveOutput:
        inputs = self.teacher_forcing(batch)
        labels = inputs.pop("labels").to(device)
        # only padding rows (the last batch of a finite pass): vocab_loss gives a zero
        loss = vocab_loss(model, {name: t.to(device) for name, t in inputs.items()}, labels,
                          self.loss_chunk_tokens)
        targets = int((labels != IGNORE_INDEX).sum())
        if targets == 0:
            return ObjectiveOutput(loss, 0, 0, [], [])
        out = ObjectiveOutput(loss, targets, targets, labels=labels)
        if evaluating(model) and self.decode:
            out.predictions, out.references = self.greedy_texts(model, batch, device)
        return out

    def teacher_forcing(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Model inputs and labels: decoder input = eos + target[:-1], labels = target with
        padding ignored (the target's own eos is predicted)."""
        target = batch["target_ids"]
        labels = target.masked_fill(target == self.ids.pad, IGNORE_INDEX)
        decoder_input = shift_right(labels, self.ids.eos, self.ids.pad, IGNORE_INDEX)
        return {"input_ids": self.ids.model_input(batch["input_ids"]),
                "attention_mask": batch["attention_mask"],
                "decoder_input_ids": self.ids.model_input(decoder_input),
                "labels": labels}

    @torch.no_grad()
    def greedy_texts(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device
                     ) -> tuple[list[str], list[str]]:
        """(greedy outputs, references) as text, each cut at its first eos."""
        module = getattr(model, "module", model)  # the engine's model: decoding is local
        real = (batch["target_ids"] != self.ids.pad).any(-1)  # not a padding row
        batch = {name: t[real] for name, t in batch.items()}
        target = batch["target_ids"]
        longest = int((target != self.ids.pad).sum(-1).max())
        out = generate_seq2seq(
            module, self.ids.model_input(batch["input_ids"]).to(device), max(longest, 1),
            decoder_start_id=self.ids.eos, attention_mask=batch["attention_mask"].to(device),
            eos_id=self.ids.eos)
        hypotheses = [self._text(row[1:]) for row in out.tolist()]
        references = [self._text(row) for row in target.tolist()]
        return hypotheses, references

    def _text(self, ids: list[int]) -> str:
        kept = []
        for token in ids:
            if token in (self.ids.eos, self.ids.pad):
                break
            kept.append(token)
        return self.tokenizer_model.decode(kept)

    def metrics(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Exact match and BLEU (``val_`` names)."""
        return generation_metrics(predictions, references)


Objective = CausalLM | MaskedLM | Denoising | SFT | Classify | Seq2Seq


def build_objective(name: str, tokenizer: TokenizerInfo, vocab_size: int,
                    document_masking: bool, labels: list[str] | None = None,
                    tokenizer_model: DatasetTokenizer | None = None,
                    decode: bool = True, loss_chunk_tokens: int = 0) -> Objective:
    """The objective ``train.objective`` names.

    Args:
        name: ``causal_lm``, ``masked_lm``, ``denoising``, ``sft``, ``classify`` or
            ``seq2seq``.
        tokenizer: The prepared dataset's tokenizer (special token ids).
        vocab_size: Model vocabulary (masked LM's random replacements come from it).
        document_masking: Whether batches carry segment/position ids to pass on.
        labels: classify: the class names in id order.
        tokenizer_model: seq2seq: the dataset's tokenizer (validation outputs as text).
        decode: seq2seq: greedy-decode in validation (off under ZeRO-3, where ranks must
            run the same number of forwards).
        loss_chunk_tokens: ``train.loss_chunk_tokens`` (0: plain loss on full logits).

    Raises:
        ValueError: The objective needs a mask token the dataset's tokenizer lacks (the
            dataset check refuses such a config before training; this is the backstop).
    """
    ids = special_ids(tokenizer)
    if name == "causal_lm":
        return CausalLM(document_masking, ids, loss_chunk_tokens)
    if name == "sft":
        return SFT(ids, loss_chunk_tokens)
    if name == "classify":
        return Classify(ids, labels or [])
    if name == "seq2seq":
        if ids.eos < 0:
            raise ValueError("train.objective: seq2seq starts the decoder with the eos piece, "
                             "but the tokenizer has none; use a tokenizer with an eos piece")
        return Seq2Seq(ids, tokenizer_model, decode, loss_chunk_tokens)
    if ids.mask is None:
        raise ValueError(
            f"train.objective: {name} needs a mask token, but the tokenizer has none; set "
            "tokenizer.mask_token (e.g. '<mask>') and run `lmforge prepare` again"
        )
    if name == "masked_lm":
        return MaskedLM(ids, vocab_size, document_masking,
                        loss_chunk_tokens=loss_chunk_tokens)
    if name == "denoising":
        if ids.eos < 0:
            raise ValueError(
                "train.objective: denoising starts the decoder with the eos piece, but the "
                "tokenizer has none; use a tokenizer with an eos piece"
            )
        return Denoising(ids, loss_chunk_tokens=loss_chunk_tokens)
    raise ValueError(f"train.objective: unknown objective {name!r}")
