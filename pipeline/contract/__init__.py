"""The dataset contract: what ``prepare`` writes and ``launch/`` and the loader read.

- ``dataset_manifest.py`` the typed ``manifest.json`` (``DatasetManifest``), its only reader
  and writer
- ``shard_format.py`` the shard layout: names, members, token dtypes, padding, sizes
- ``shard_tar.py`` the tar bytes of a shard, read without ``webdataset``
- ``stats.py`` the typed reader of ``stats.json`` (``PrepareStats``)
- ``dataset_tokenizer.py`` the dataset's tokenizer as one handle (``DatasetTokenizer``), of
  either kind; ``hf_tokenizer.py`` a Hugging Face tokenizer set up as ``AutoTokenizer`` does

Plain Python and numpy, and sentencepiece / tokenizers to open the dataset's tokenizer: no
Ray, no torch, nothing of ``prepare`` (the builder).
May import: lmforge.pipeline.durable, sentencepiece, tokenizers
"""
