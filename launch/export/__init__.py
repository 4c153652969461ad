"""From a checkpoint to a verified Hugging Face folder (``launch/export/``).

Owns: gathering a checkpoint's weights and loading them into the model
(``from_checkpoint.py``), writing the Hugging Face folder atomically and checking its logits
with the family's Auto class (``hf_folder.py``), the check a new export passes in its
temporary folder before it is published: logits and greedy tokens (``verify.py``),
converting and verifying the sentencepiece tokenizer (``hf_tokenizer.py``). Every failure is
an :class:`ExportError`.

May import: ``launch.config``, ``launch.rundir``, ``launch.train.checkpoint`` (finding a
complete checkpoint), ``pipeline.manifest``, ``model``, and ``transformers``/``tokenizers``
inside functions.
"""


class ExportError(Exception):
    """An export could not be written or does not reproduce the trained model/tokenizer."""


__all__ = ["ExportError"]
