"""The shard byte format and the dataset folder layout, stated once.

The writer (`shards.py`, `phases.py`), the loader (`loader_tar.py`, `loader_shard.py`,
`loader_order.py`), the tokenizer and the manifest all take these from here.

A prepared dataset folder holds::

    manifest.json            the DatasetManifest (see dataset_manifest.py), version 1
    tokenizer.model          the sentencepiece model the tokens come from, or
    tokenizer.json, ...      a Hugging Face tokenizer's files (dataset_tokenizer.py); the
                             manifest's `tokenizer.files` lists them with their sha256
    <dataset>/<split>-NNNNNN.tar

Each shard is an uncompressed GNU tar in WebDataset layout. Sample ``k`` of shard ``i`` of
``<dataset>/<split>`` has the key ``<dataset>-<split>-<i:06d>-<k:08d>`` and two members,
in this order (their names sort so):

- ``<key>.doc_starts.npy``: int32 offsets within the sample where a document starts,
  ascending, always beginning with 0.
- ``<key>.tokens.npy``: ``seq_len + 1`` token ids (inputs plus the label shift) of the
  manifest's ``token_dtype``: uint16 while the vocabulary (and the padding id) fits in
  16 bits, else uint32 (e.g. Llama 3's 128,256 tokens; the loader reads either). Windows
  are cut consecutively from the split's stream of documents
  (each ends with EOS when the tokenizer has an eos piece; ``doc_starts`` marks them either
  way); only the last window of a split is padded, with the padding id (``padding_id``).

Both are plain ``.npy`` files (version 1.0 headers, C order). Every member header has the
same fixed metadata (mtime 0, mode 0444, uid/gid 0, empty user and group names); the
archive ends with two zero blocks and is padded to a whole record, as ``tarfile`` does.
So the same tokens always give the same bytes, and sample ``k`` of a shard starts at
``k * stride`` when all its samples are the same size (the loader's fast path).

**Task data** (``data.task``, see tasks.py) has one dataset, ``task``, so its shards are
``task/{train,val}-NNNNNN.tar`` and the manifest's ``task`` entry names the kind. Its
samples carry ``doc_starts.npy`` and ``tokens.npy`` as above (an *example* in place of a
document; the padding id pads every sample) and one more member per kind, all in name
order (``doc_starts < label < loss_mask < target < tokens``):

- ``sft``: whole examples ``prompt ids + response ids + EOS`` packed greedily in order
  (the next example starts a new sample when it does not fit; an example is never split,
  so one holds at most ``seq_len + 1`` tokens); ``doc_starts`` marks every example start;
  ``<key>.loss_mask.npy`` is uint8 ``[seq_len + 1]``: 1 at response tokens and the EOS
  ending each response, 0 at prompt tokens and padding.
- ``classify``: one example per sample: ``tokens`` = [BOS, if the tokenizer has one] +
  text ids + [EOS], at most ``seq_len`` tokens (the inputs), then padding; ``doc_starts``
  [0]; ``<key>.label.npy``: an int64 scalar (0-d), the index of the label in the
  manifest's ``task.labels``.
- ``seq2seq``: one example per sample: ``tokens`` = source ids + EOS and
  ``<key>.target.npy`` = target ids + EOS (the token dtype, ``[seq_len + 1]``), each at
  most ``seq_len`` tokens, then padding; ``doc_starts`` [0].

EOS (and BOS) are left out when the tokenizer has no such piece.
"""

from __future__ import annotations

MANIFEST_FILE = "manifest.json"
"""Name of the manifest inside a dataset folder; its presence means the dataset is complete."""
MANIFEST_VERSION = 1
"""Version of the manifest layout; a reader refuses any other."""
TOKENIZER_FILE = "tokenizer.model"
"""Name of a sentencepiece model inside a dataset folder (the manifest's `tokenizer.file`; an
HF tokenizer's main file is `tokenizer.json`)."""

TOKEN_DTYPES = ("uint16", "uint32")
"""Token dtypes a shard may hold."""

BLOCK = 512
"""Tar block: headers and member data are padded to whole blocks."""
RECORD = 20 * BLOCK
"""Tar record: the archive is padded to whole records (tarfile's default blocking)."""
MEMBER_MTIME = 0
"""Modification time of every member."""
MEMBER_MODE = 0o444
"""File mode of every member."""

TOKENS_MEMBER = "tokens.npy"
"""Member suffix (after ``"{key}."``) of a sample's token ids."""
DOC_STARTS_MEMBER = "doc_starts.npy"
"""Member suffix (after ``"{key}."``) of a sample's document-start offsets."""
LOSS_MASK_MEMBER = "loss_mask.npy"
"""Member suffix of an sft sample's loss mask (uint8, 1 = response token)."""
LABEL_MEMBER = "label.npy"
"""Member suffix of a classify sample's label id (int64 scalar)."""
TARGET_MEMBER = "target.npy"
"""Member suffix of a seq2seq sample's target ids (token dtype, seq_len + 1)."""
TASK_DATASET = "task"
"""The one dataset name (folder, key prefix) of a task data set."""
TASK_MEMBERS: dict[str, tuple[str, ...]] = {
    "sft": (LOSS_MASK_MEMBER,),
    "classify": (LABEL_MEMBER,),
    "seq2seq": (TARGET_MEMBER,),
}
"""Members a task sample has beyond ``doc_starts`` and ``tokens``, by task kind."""


def padding_id(pad_id: int, vocab_size: int) -> int:
    """The id that pads a split's last window and that the loader masks out of the labels.

    The tokenizer's pad piece when it has one (sentencepiece never emits it). Many published
    models have none (``pad_id=-1``, e.g. Llama's ``tokenizer.model``); then it is
    ``vocab_size``, one past the last piece, so it can never be mistaken for a real token.
    It is never a model input: the objectives mask it and feed a valid id in its place.
    """
    return pad_id if pad_id >= 0 else vocab_size


def token_dtype(vocab_size: int, pad_id: int = 0) -> str:
    """The smallest unsigned dtype that holds every token id of a vocabulary and its
    padding id (see `padding_id`)."""
    ids = max(vocab_size, padding_id(pad_id, vocab_size) + 1)
    return "uint16" if ids <= 2**16 else "uint32"


def shard_file_name(split: str, index: int) -> str:
    """File name of a shard inside its dataset folder: ``{split}-{index:06d}.tar``."""
    return f"{split}-{index:06d}.tar"


def sample_key(dataset: str, split: str, shard_index: int, sample_index: int) -> str:
    """The deterministic ``__key__`` of a sample."""
    return f"{dataset}-{split}-{shard_index:06d}-{sample_index:08d}"


def samples_per_shard(target_bytes: int, seq_len: int, itemsize: int) -> int:
    """How many samples make a shard of about `target_bytes`.

    Args:
        target_bytes: Wanted shard size.
        seq_len: The manifest's seq_len (a sample holds seq_len + 1 tokens).
        itemsize: Bytes per token (2 or 4).
    """
    # tokens.npy: header block + (128-byte .npy header + tokens) in whole blocks.
    token_member = BLOCK + -(-(128 + (seq_len + 1) * itemsize) // BLOCK) * BLOCK
    sample_bytes = token_member + 2 * BLOCK  # doc_starts member: header + one block
    return max(1, target_bytes // sample_bytes)


def task_samples_per_shard(target_bytes: int, seq_len: int, itemsize: int, kind: str) -> int:
    """How many task samples make a shard of about `target_bytes` (`samples_per_shard`
    with the kind's extra member counted)."""
    token_member = BLOCK + -(-(128 + (seq_len + 1) * itemsize) // BLOCK) * BLOCK
    extra = {
        "sft": BLOCK + -(-(128 + seq_len + 1) // BLOCK) * BLOCK,  # loss_mask, uint8
        "classify": 2 * BLOCK,  # label: header + one block
        "seq2seq": token_member,  # target
    }[kind]
    return max(1, target_bytes // (token_member + 2 * BLOCK + extra))
