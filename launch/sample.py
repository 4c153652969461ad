"""Text from a trained model: prompts → sentencepiece ids → ``model.generate`` → text.

Used at the end of ``lmforge run`` / by ``lmforge sample`` and, every
``train.sample_every`` steps, by the training callback that logs samples to MLflow.
"""

from __future__ import annotations

import sentencepiece as spm
import torch
from torch import nn

from lmforge.launch.config import SampleConfig
from lmforge.model import generate
from lmforge.pipeline.manifest import TokenizerInfo


class TextSampler:
    """Continues ``sample.prompts`` with a decoder model.

    Args:
        sample: The sample section (prompts, length, temperature, top-k/p).
        tokenizer_path: The sentencepiece model the data was encoded with.
        tokenizer: Its manifest entry (the EOS id that ends a continuation).
        seed: Seeds a generator of its own, so sampling never consumes the training RNG
            (exact resume) and the same model gives the same texts.
    """

    def __init__(
        self, sample: SampleConfig, tokenizer_path: str, tokenizer: TokenizerInfo, seed: int
    ) -> None:
        self.sample = sample
        self.tokenizer_path = str(tokenizer_path)
        self.eos_id = tokenizer.eos_id
        self.seed = seed
        self._sp: spm.SentencePieceProcessor | None = None  # loaded on first use

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> list[str]:
        """The prompt + continuation text for every prompt, in order."""
        if self._sp is None:
            self._sp = spm.SentencePieceProcessor(model_file=self.tokenizer_path)
        sp = self._sp
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        texts = []
        for prompt in self.sample.prompts:
            ids = torch.tensor([sp.encode(prompt)], dtype=torch.long, device=device)
            out = generate(
                model,
                ids,
                max_new_tokens=self.sample.max_new_tokens,
                temperature=self.sample.temperature,
                top_k=self.sample.top_k,
                top_p=self.sample.top_p,
                eos_id=self.eos_id,
                generator=generator,
            )
            texts.append(sp.decode(out[0].tolist()))
        return texts
