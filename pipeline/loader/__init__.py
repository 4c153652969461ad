"""Streaming a prepared dataset to training: each rank and worker its own samples, mixtures
across datasets, exact resume.

- ``shard_loader.py`` ``ShardLoader``, the loader training uses
- ``order.py`` the sample order (mixture, shuffle, ranks, resume state)
- ``mix.py`` ``data.mix``: several prepared datasets as one stream, repetition caps
- ``draws.py`` what a run draws from each ``data.mix`` source (planned, or counted from states)
- ``shard.py`` reading and checking one shard; ``batches.py`` micro-batches and collation

Reads the contract only (the ``DatasetManifest`` it is handed): nothing of ``prepare``, no Ray.
May import: lmforge.pipeline.config, lmforge.pipeline.contract, torch
"""
