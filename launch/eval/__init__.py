"""Downstream evaluation: task files scored as lm-evaluation-harness scores them
(``launch/eval/``).

Owns: the eval task files and their examples (``tasks.py``: the JSONL formats, multiple
choice and cloze; ``harness_yaml.py``: the subset of an lm-evaluation-harness task YAML that
points at a local file; ``task_files.py``: which reader a file needs), the scoring
(``scoring.py``: context/continuation token ids the way lm-evaluation-harness makes them,
``acc``/``acc_norm``/``acc_bytes``, the cloze's ``acc`` and log-likelihood) on any
model-agnostic log-likelihood function over token ids (``loglikelihood.py``: one built from a
logits function, for transformers and the training loop alike), and ``lmforge eval`` on a
Hugging Face export (``on_export.py``, ``command.py``); scoring on every rank at once, with
equal forward passes for ZeRO-3, for evaluation inside training (``distributed.py``), which
``in_loop.py`` runs from ``Trainer.evaluate`` with bits per byte per validation dataset
(``bpb.py``); the loss curves and scores of a run as a PNG (``curves.py``).
A task file a user can get wrong raises :class:`EvalTaskError` naming the file and line.

``transformers`` and ``mlflow`` only inside functions.
May import: lmforge.launch.config, lmforge.launch.rundir, lmforge.launch.tracking,
    lmforge.pipeline.contract, lmforge.pipeline.loader, lmforge.pipeline.durable, torch,
    transformers, mlflow
"""

from lmforge.launch.eval.tasks import EvalTask, EvalTaskError

__all__ = ["EvalTask", "EvalTaskError"]
