"""Training with DeepSpeed (``launch/train/``).

Owns: the per-rank entry point (``worker.py``) and the launcher that starts and supervises
a process per rank on one machine (``processes.py``), with the rendezvous that keeps rank
0's store and the ranks' gloo/NCCL on loopback (``rendezvous.py``, also the store under
``srun``); wiring a rank's engine, loaders and objective from the config (``build.py``); the loop
(``trainer.py``) and the :class:`~lmforge.launch.train.callbacks.Callback` API with the
built-in callbacks (``callbacks.py``, ``preemption.py``); checkpoints (``checkpoint.py``;
fsync and per-file hashes ``integrity.py``; the checked resume with its fallback ``resume.py``);
objectives on loader batches (``losses.py``) and the task objectives' validation metrics
(``task_metrics.py``); AdamW and LR schedules (``optim.py``); warm starts from a checkpoint
or Hugging Face folder (``warm_start.py``); trainable subsets, frozen parameters and LoRA
adapters (``trainable.py``); activation checkpointing applied from outside the model
(``activation_checkpointing.py``); the bad-loss policy (``loss_guard.py``).

The worker adds the stage hooks (``hooks:``) to its callbacks: of ``launch/stages/`` it
imports ``hooks.py`` alone (user hooks, their failure policy), nothing that runs a graph.

May import: lmforge.launch.config, lmforge.launch.rundir, lmforge.launch.tracking,
    lmforge.launch.eval,
    lmforge.launch.generate, lmforge.launch.redact, lmforge.launch.stages.hooks,
    lmforge.pipeline.contract,
    lmforge.pipeline.config, lmforge.pipeline.durable, lmforge.pipeline.loader, lmforge.model,
    torch, deepspeed, peft, safetensors, transformers, sentencepiece, psutil, xxhash
Imports nothing from here at package level: the worker must stay cheap to start.
"""
