"""The check every export passes in its temporary folder before it is published.

Loads the folder with the Auto class of its family and requires (fp32):

- logits within ``export.verify_atol`` of lmforge's model on the same ids: random ids over
  the whole vocabulary (an encoder-decoder also gets random target ids);
- for the generative families, identical greedy tokens on a real text: a decoder continues
  it (``transformers`` ``generate`` vs lmforge's ``generate``), an encoder-decoder
  reconstructs it with a masked span (``generate`` vs ``generate_seq2seq``).

The tokenizer was already checked against sentencepiece when the folder was written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.launch.export import ExportError
from lmforge.launch.export.hf_folder import load_export, verify_logits
from lmforge.model import ModelConfig, generate, generate_seq2seq
from lmforge.pipeline.contract.dataset_tokenizer import DatasetTokenizer

GREEDY_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."
"""The real text greedy decoding is compared on."""
GREEDY_TOKENS = 12
"""New tokens compared per greedy check."""


class ExportCheck:
    """Verifies an export folder against the trained model; pass to ``write_hf_folder``.

    Args:
        model: The trained lmforge model (fp32, eval).
        model_cfg: Its model section.
        tokenizer: The run's tokenizer (the greedy check's text, special ids).
        atol: Largest accepted logit difference.
        length: Length of the random id rows.
        seed: Seeds the random ids.
    """

    def __init__(self, model: nn.Module, model_cfg: ModelConfig, tokenizer: DatasetTokenizer,
                 atol: float, length: int, seed: int = 0) -> None:
        self.model, self.cfg, self.tokenizer = model, model_cfg, tokenizer.info
        self.sentencepiece = tokenizer
        self.atol, self.length, self.seed = atol, length, seed
        self.max_diff: float | None = None
        self.greedy_tokens: list[int] | None = None

    def __call__(self, folder: Path) -> None:
        hf_model = load_export(folder)
        generator = torch.Generator().manual_seed(self.seed)
        shape = (2, self.length)
        input_ids = torch.randint(0, self.tokenizer.vocab_size, shape, generator=generator)
        decoder_ids = None
        with torch.no_grad():
            if self.cfg.family == "encoder_decoder":
                decoder_ids = torch.randint(0, self.tokenizer.vocab_size, shape,
                                            generator=generator)
                reference = self.model(input_ids, decoder_ids)
            elif self.cfg.num_labels:  # BertForSequenceClassification: class scores
                reference = self.model.classify(input_ids)
            else:
                reference = self.model(input_ids)
        self.max_diff = verify_logits(folder, reference, input_ids, self.atol,
                                      decoder_input_ids=decoder_ids, model=hf_model)
        line = (f"export verified: {type(hf_model).__name__} max |logit diff| vs lmforge = "
                f"{self.max_diff:.2e}")
        if self.cfg.family != "encoder":
            self.greedy_tokens = self._check_greedy(folder, hf_model)
            line += f"; greedy tokens identical ({len(self.greedy_tokens)} tokens)"
        print(line, flush=True)

    @torch.no_grad()
    def _check_greedy(self, folder: Path, hf_model: nn.Module) -> list[int]:
        ids = self.sentencepiece.encode(GREEDY_TEXT)
        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        common = {"max_new_tokens": GREEDY_TOKENS, "do_sample": False, "num_beams": 1,
                  "eos_token_id": eos, "pad_token_id": pad}
        if self.cfg.family == "encoder_decoder":
            mask_id = self.tokenizer.mask_id
            source = ids[:4] + ([mask_id] if mask_id is not None else []) + ids[8:]
            src = torch.tensor([source])
            ours = generate_seq2seq(self.model, src, GREEDY_TOKENS, decoder_start_id=eos,
                                    eos_id=eos)
            theirs = hf_model.generate(input_ids=src, attention_mask=torch.ones_like(src),
                                       decoder_start_token_id=eos, **common)
        else:
            prompt = torch.tensor([ids])
            ours = generate(self.model, prompt, GREEDY_TOKENS, greedy=True, eos_id=eos)
            theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                       **common)
        if ours.tolist() != theirs.tolist():
            raise ExportError(
                f"{folder}: greedy decoding differs between transformers "
                f"({theirs[0].tolist()}) and lmforge ({ours[0].tolist()}) although the logits "
                f"agree within {self.max_diff:.3g}; the export does not reproduce the model"
            )
        return ours[0].tolist()
