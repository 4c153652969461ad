"""Text from a trained model, the demonstration that fits its family.

``TextGenerator`` (decoder: prompts → the dataset tokenizer's ids → ``generate`` → text) runs
at the end of ``lmforge run`` / in ``lmforge generate`` and, every ``train.generate_every`` steps,
in the training callback that logs the texts to MLflow. ``FillMaskPredictor`` (encoder: top-k at
mask tokens) and ``Seq2SeqGenerator`` (encoder-decoder: beam search from a source) run at the end;
``ClassifyPredictor`` (an encoder with a classification head: each prompt's label).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.launch.config import GenerateConfig
from lmforge.model import generate, generate_seq2seq
from lmforge.pipeline.contract.dataset_tokenizer import DatasetTokenizer


class TextGenerator:
    """Continues ``generate.prompts`` with a decoder model.

    Args:
        settings: The generate section (prompts, length, temperature, top-k/p).
        tokenizer: The tokenizer the data was encoded with (its EOS id ends a continuation).
        seed: Seeds a generator of its own, so sampling never consumes the training RNG
            (exact resume) and the same model gives the same texts.
    """

    def __init__(self, settings: GenerateConfig, tokenizer: DatasetTokenizer, seed: int) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.info.eos_id if tokenizer.info.eos_id >= 0 else None
        self.seed = seed

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> list[str]:
        """The prompt + continuation text for every prompt, in order."""
        tok = self.tokenizer  # either kind: prompts encoded as the documents were
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        texts = []
        for prompt in self.settings.prompts:
            ids = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=device)
            out = generate(
                model,
                ids,
                max_new_tokens=self.settings.max_new_tokens,
                temperature=self.settings.temperature,
                top_k=self.settings.top_k,
                top_p=self.settings.top_p,
                eos_id=self.eos_id,
                generator=generator,
            )
            texts.append(tok.decode(out[0].tolist()))
        return texts


class FillMaskPredictor:
    """The encoder's demonstration: the top ``generate.mask_top_k`` tokens at every mask token
    of each prompt, from the masked-LM logits.

    Args:
        settings: The generate section (prompts with the mask token, ``mask_top_k``).
        tokenizer: The tokenizer the data was encoded with (and its mask id).
    """

    def __init__(self, settings: GenerateConfig, tokenizer: DatasetTokenizer) -> None:
        if tokenizer.info.mask_id is None:
            raise ValueError("tokenizer.mask_token: the fill-mask demonstration needs a mask "
                             "token; set it and prepare again")
        self.settings, self.mask_id = settings, tokenizer.info.mask_id
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> list[dict]:
        """Per prompt: ``{"prompt", "text" (masks filled with the top token), "masks":
        [{"position", "top_ids", "top_tokens"}]}``."""
        model.eval()
        device = next(model.parameters()).device
        records = []
        for prompt in self.settings.prompts:
            ids = self.tokenizer.encode(prompt)
            positions = [i for i, t in enumerate(ids) if t == self.mask_id]
            logits = model(torch.tensor([ids], device=device))[0]  # (T, V)
            top = logits[positions].topk(self.settings.mask_top_k, dim=-1).indices.tolist()
            filled = list(ids)
            for position, candidates in zip(positions, top, strict=True):
                filled[position] = candidates[0]
            masks = [{"position": p, "top_ids": c, "top_tokens": [self.tokenizer.id_to_piece(t)
                                                                  for t in c]}
                     for p, c in zip(positions, top, strict=True)]
            records.append({"prompt": prompt, "text": self.tokenizer.decode(filled),
                            "masks": masks})
        return records


class Seq2SeqGenerator:
    """The encoder-decoder's demonstration: each prompt is a source (mask tokens are spans to
    fill in, as in denoising) and beam search with ``generate.num_beams`` writes its target.

    Args:
        settings: The generate section (prompts, ``max_new_tokens``, ``num_beams``).
        tokenizer: The tokenizer the data was encoded with (EOS: the decoder start and the
            end of a target).
    """

    def __init__(self, settings: GenerateConfig, tokenizer: DatasetTokenizer) -> None:
        self.settings, self.eos_id = settings, tokenizer.info.eos_id
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> list[dict]:
        """Per prompt: ``{"prompt", "text" (the target), "ids" (target ids, decoder start
        first)}``."""
        device = next(model.parameters()).device
        records = []
        for prompt in self.settings.prompts:
            src = torch.tensor([self.tokenizer.encode(prompt)], device=device)
            out = generate_seq2seq(model, src, self.settings.max_new_tokens,
                                   decoder_start_id=self.eos_id, eos_id=self.eos_id,
                                   num_beams=self.settings.num_beams)[0].tolist()
            records.append({"prompt": prompt, "text": self.tokenizer.decode(out[1:]), "ids": out})
        return records


class ClassifyPredictor:
    """A classifier's demonstration: each prompt is a text, encoded as the task data is
    ([bos when the tokenizer has one] + text + [eos]), and gets the [CLS] head's label.

    Args:
        tokenizer: The tokenizer the data was encoded with (and its bos and eos ids).
        labels: The class names in id order (the task's labels).
    """

    def __init__(self, settings: GenerateConfig, tokenizer: DatasetTokenizer,
                 labels: list[str]) -> None:
        self.settings, self.labels = settings, list(labels)
        info = tokenizer.info
        self.bos = [info.bos_id] if info.bos_id >= 0 else []
        self.eos = [info.eos_id] if info.eos_id >= 0 else []
        self.tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> list[dict]:
        """Per prompt: ``{"prompt", "text" (the predicted label), "scores" {label: prob}}``."""
        model.eval()
        device = next(model.parameters()).device
        records = []
        for prompt in self.settings.prompts:
            ids = self.bos + self.tokenizer.encode(prompt, special_tokens=False) + self.eos
            probs = model.classify(torch.tensor([ids], device=device))[0].float().softmax(-1)
            scores = {name: round(float(p), 4) for name, p in zip(self.labels, probs,
                                                                    strict=True)}
            records.append({"prompt": prompt, "text": self.labels[int(probs.argmax())],
                            "scores": scores})
        return records
