"""The builder: raw text → a prepared dataset (shards, tokenizer, stats.json, manifest.json).

- ``driver.py`` ``prepare()``, the one entry point (``task_driver.py`` for ``data.task``)
- ``sources.py`` input files and their read chunks; ``readers.py`` documents out of them
- ``steps.py`` cleaning and quality steps; ``phases.py`` each phase's work per item, resumable,
  returning the dataclasses of ``results.py``; ``tasks.py`` fine-tuning task data
- ``chain.py`` the chain of steps a chunk runs (with user steps); the curation rules
  ``quality.py`` (Gopher, C4, FineWeb), ``language.py``, ``pii.py``, ``decontaminate.py``;
  ``removals.py`` what each rule removed, per dataset, in pipeline order; ``text_arrays.py``
  a batch's words found, measured and hashed with numpy
- ``tokenizer.py`` sentencepiece training, and encoding with either tokenizer kind;
  ``shards.py`` the shard writer
- ``manifest_writer.py``, ``task_manifest.py``, ``stats.py`` what is written at the end;
  ``publish.py`` the work folder and moving the finished dataset into place

No torch, nothing of ``launch``; the drivers hand the phase items to ``run``'s executors.
May import: lmforge.pipeline.config, lmforge.pipeline.contract, lmforge.pipeline.durable,
    lmforge.pipeline.folder_lock, lmforge.pipeline.run, sentencepiece, tokenizers, webdataset
"""
