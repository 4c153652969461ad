"""Bits per byte: the byte count of each token (sentencepiece with byte fallback, a
byte-level BPE from `tokenizers`), the formula, and one validation dataset at a time."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import shard_fixtures
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.launch.eval.bpb import (
    bits_per_byte,
    piece_bytes,
    target_bytes,
    token_bytes,
    val_datasets,
)
from lmforge.launch.eval.in_loop import LoopEval
from lmforge.launch.eval.scoring import PairEncoder
from lmforge.pipeline.config import MixSourceConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.dataset_tokenizer import open_sentencepiece
from lmforge.pipeline.contract.hf_tokenizer import HFTokenizer
from lmforge.pipeline.loader.mix import Mix
from lmforge.pipeline.loader.shard_loader import ShardLoader

TEXTS = ["ROMEO: What light through yonder window breaks?",
         "Tous les étés, à Noël — déjà vu; 1234 naïve",
         "tabs\tand  double  spaces\nand newlines", "日本語のテキスト 🙂"]


def test_bits_per_byte_by_hand():
    # 8 bits of surprise (8 ln 2 nats) over 4 bytes: 2 bits per byte.
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert math.isnan(bits_per_byte(1.0, 0))
    assert piece_bytes("\u2581the") == 4 and piece_bytes("<0xE2>") == 1
    assert piece_bytes("##ing") == 3 and piece_bytes("Ġthe", byte_level=True) == 4


def test_sentencepiece_pieces_add_up_to_the_text_bytes(eval_spm):
    handle = open_sentencepiece(eval_spm.read_bytes(), str(eval_spm))
    table = token_bytes(handle, 600, special_ids=[0, 1, 2, 3])
    assert table[500:].sum() == 0 and table[:4].sum() == 0  # past the vocabulary, specials
    for text in TEXTS:
        ids = handle.encode(text)
        # sentencepiece's dummy prefix: one "▁" before the text, counted as a space
        assert int(table[ids].sum()) == len((" " + text).encode("utf-8")), text
    eos = 3
    labels = torch.tensor([[*handle.encode(TEXTS[1]), eos, -100, -100]])
    assert target_bytes(labels, table) == len((" " + TEXTS[1]).encode("utf-8"))


def test_byte_level_bpe_counts_one_byte_per_character():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"]))
    handle = HFTokenizer(tok.to_str(), {"eos_token": "<|endoftext|>"}, {}, "bpe")
    table = token_bytes(handle, handle.vocab_size, special_ids=[handle.eos_id])
    for text in [*TEXTS, "unseen words: Łódź ßtraße"]:
        ids = handle.encode(text)
        assert handle.decode(ids) == text
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text
    assert table[handle.eos_id] == 0


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> DatasetManifest:
    root = tmp_path_factory.mktemp("bpb_data")
    shard_fixtures().write_shards(root, {"a": {"train": [8], "val": [5]},
                                         "b": {"train": [8], "val": [3, 4]},
                                         "c": {"train": [8]}}, seq_len=16)
    return DatasetManifest.read(root)


def _samples(manifest) -> int:
    return sum(int((b["labels"] != -100).any(-1).sum())
               for b in ShardLoader(manifest, "val", 2, infinite=False))


def test_each_validation_dataset_alone(two_datasets):
    alone = val_datasets(two_datasets)
    assert list(alone) == ["a", "b"]  # c has no validation split
    assert [_samples(m) for m in alone.values()] == [5, 7]
    assert _samples(two_datasets) == 12
    # data.mix names them <source>/<dataset>
    mix = Mix([MixSourceConfig(str(two_datasets.location), weight=1.0, name="web")],
              [two_datasets])
    mixed = val_datasets(mix)
    assert list(mixed) == ["web/a", "web/b"]
    assert [_samples(m) for m in mixed.values()] == [5, 7]


def test_loop_eval_bpb_from_one_pass_per_dataset():
    passes = {"x": (10 * math.log(2), 5.0, 20.0), "y": (3 * math.log(2), 1.0, 1.0)}

    def val_sums(batches):
        return passes[batches]

    def doubled(values):  # two ranks with the same sums
        return [2 * v for v in values]

    encoder = PairEncoder(lambda text, special: [], 0)
    loop = LoopEval([], encoder, 64, 4, torch.ones(8, dtype=torch.int64),
                    {"x": lambda: "x", "y": lambda: "y"})
    metrics = loop.evaluate(None, val_sums, (0.0, 0.0), doubled, 0, 2)
    assert metrics == {"val/x/bpb": pytest.approx(0.5), "val/y/bpb": pytest.approx(3.0)}
    one = LoopEval([], encoder, 64, 4, torch.ones(8, dtype=torch.int64), {"x": lambda: "x"})
    # one dataset: the pooled pass's sums, no pass of its own
    assert one.evaluate(None, None, (6 * math.log(2), 3.0), doubled, 0, 2) == {
        "val/x/bpb": pytest.approx(2.0)}
