"""From a checkpoint to a verified Hugging Face folder (``launch/export/``).

Owns: gathering a checkpoint's weights and loading them into the model
(``from_checkpoint.py``), writing the Hugging Face folder atomically and checking its logits
with the family's Auto class (``hf_folder.py``), the check a new export passes in its
temporary folder before it is published: logits and greedy tokens (``verify.py``),
converting and verifying the sentencepiece tokenizer (``hf_tokenizer.py``). Every failure is
an :class:`ExportError`.

``transformers``/``tokenizers`` only inside functions.
May import: lmforge.launch.config, lmforge.launch.rundir, lmforge.launch.train.checkpoint,
    lmforge.launch.train.trainable, lmforge.launch.train.warm_start, lmforge.launch.redact,
    lmforge.pipeline.contract, lmforge.pipeline.durable, lmforge.model, torch, safetensors,
    transformers, tokenizers, sentencepiece
"""


class ExportError(Exception):
    """An export could not be written or does not reproduce the trained model/tokenizer."""


__all__ = ["ExportError"]
