"""lmforge.pipeline: raw text → a prepared dataset (WebDataset shards + manifest.json), and
the loader that streams it to training.

- ``contract/`` the dataset contract: the typed manifest, the shard bytes, the stats reader
- ``prepare/``  readers, cleaning steps, dedup, tokenizers, phases, the shard writer, drivers
- ``run/``      who runs the phase items: in-process or a pool of Ray actors, local Ray start
- ``loader/``   streaming shards to each rank, mixtures, exact resume
- ``config.py`` the ``data`` and ``tokenizer`` config sections; ``durable.py`` durable writes

The top-level modules are plain Python; each subpackage states its own rule.
May import: -
"""
