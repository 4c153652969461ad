"""ShardLoader: coverage across ranks and workers, determinism, labels, document ids."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from shard_fixtures import PAD_ID, write_shards

from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader

SHARDS = {"web": {"train": [5, 7, 3, 9, 12], "val": [4, 6, 3]}}  # 36 train, 13 val samples


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path, SHARDS, seq_len=16)


def keys_of(loader: ShardLoader, steps: int | None = None) -> list[list[str]]:
    batches = loader if steps is None else itertools.islice(loader, steps)
    return [batch["keys"] for batch in batches]


def flat(batches: list[list[str]]) -> list[str]:
    return [k for batch in batches for k in batch]


def make(shards, split="train", batch=3, **kw) -> ShardLoader:
    config = {"return_keys": True, "shuffle_buffer": 8}
    config.update(kw.pop("config", {}))
    return ShardLoader(shards.manifest, split, batch, config=LoaderConfig(**config), **kw)


def test_two_ranks_two_workers_cover_one_epoch_without_overlap_or_gap(shards):
    steps = 36 // 6  # one epoch at micro-batch 3 × 2 ranks
    per_rank = [
        keys_of(make(shards, rank=r, world_size=2, config={"num_workers": 2}), steps)
        for r in range(2)
    ]
    seen = flat(per_rank[0]) + flat(per_rank[1])
    assert len(seen) == 36
    assert set(seen) == shards.keys("train")
    # Workers do not change the order: the same rank without workers sees the same rows.
    for r in range(2):
        assert per_rank[r] == keys_of(make(shards, rank=r, world_size=2), steps)


def test_validation_pass_is_complete_ordered_and_even_across_ranks(shards):
    per_rank = [
        keys_of(make(shards, "val", 2, rank=r, world_size=2, infinite=False,
                     config={"num_workers": 2}))
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # ceil(13 / 4), padded on both ranks
    interleaved = [k for step in zip(*per_rank, strict=True) for batch in step for k in batch]
    real = [k for k in interleaved if k]
    assert real == sorted(shards.keys("val"))  # manifest order, no shuffle
    assert len(interleaved) - len(real) == 16 - 13


def test_more_workers_than_batches(shards):
    expected = keys_of(make(shards, "val", 16, infinite=False))
    assert len(expected) == 1
    assert keys_of(make(shards, "val", 16, infinite=False, config={"num_workers": 2})) == expected


def test_same_seed_same_order_other_seed_or_epoch_other_order(shards):
    first = flat(keys_of(make(shards, seed=7), 24))
    assert first == flat(keys_of(make(shards, seed=7), 24))
    assert first != flat(keys_of(make(shards, seed=8), 24))
    epoch0, epoch1 = first[:36], flat(keys_of(make(shards, batch=4, seed=7), 18))[36:]
    assert epoch0 != epoch1
    assert set(epoch0) == set(epoch1) == shards.keys("train")


def test_shuffle_off_reads_in_manifest_order(shards):
    loader = make(shards, batch=4, config={"shuffle": False})
    assert flat(keys_of(loader, 9)) == sorted(shards.keys("train"))


def test_inputs_and_labels_match_the_shards_and_padding_is_ignored(shards):
    loader = make(shards, "val", 5, infinite=False, config={"document_masking": False})
    batches = list(loader)
    assert set(batches[0]) == {"input_ids", "labels", "keys"}
    ignored = 0
    for batch in batches:
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        for row, key in enumerate(batch["keys"]):
            labels = batch["labels"][row]
            if not key:  # padding row past the end of the pass
                assert (labels == -100).all() and (batch["input_ids"][row] == PAD_ID).all()
                continue
            tokens = torch.from_numpy(shards.tokens[key].astype(np.int64))
            assert torch.equal(batch["input_ids"][row], tokens[:-1])
            expected = tokens[1:].clone()
            expected[expected == PAD_ID] = -100
            assert torch.equal(labels, expected)
            ignored += int((labels == -100).sum())
    assert ignored == 3  # the pad tail of the split's last sample, nothing else


def test_segment_and_position_ids_follow_doc_starts(shards):
    batch = next(iter(make(shards, batch=8)))
    for row, key in enumerate(batch["keys"]):
        starts = set(shards.doc_starts[key].tolist())
        segment, position = -1, 0
        for t in range(16):
            if t in starts:
                segment, position = segment + 1, 0
            assert batch["segment_ids"][row, t] == segment
            assert batch["position_ids"][row, t] == position
            position += 1
    assert batch["position_ids"].dtype == torch.int64


def test_resume_mid_epoch_continues_exactly(shards):
    full = keys_of(make(shards, rank=1, world_size=2), 10)
    first = make(shards, rank=1, world_size=2)
    head = keys_of(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make(shards, rank=1, world_size=2, config={"num_workers": 2})
    resumed.load_state_dict(state)
    assert head + keys_of(resumed, 6) == full


def test_uint32_tokens(tmp_path):
    data = write_shards(tmp_path, {"big": {"train": [4, 4]}}, token_dtype="uint32")
    batch = next(iter(make(data, batch=8, config={"shuffle": False})))
    key = batch["keys"][5]
    assert batch["input_ids"][5].tolist() == data.tokens[key][:-1].tolist()


def test_pax_tars_with_long_keys(tmp_path):
    name = "web-" + "x" * 120  # keys beyond the 100-byte ustar name field
    data = write_shards(tmp_path, {name: {"train": [3, 2]}}, tar_format="PAX_FORMAT")
    batch = next(iter(make(data, batch=5, config={"shuffle": False})))
    assert batch["keys"] == sorted(data.keys("train"))
    assert batch["input_ids"][4].tolist() == data.tokens[batch["keys"][4]][:-1].tolist()


def test_sizes(shards):
    loader = make(shards)
    assert loader.samples_per_epoch == 36
    assert loader.tokens_per_epoch == 36 * 16
    assert len(make(shards, "val", 2, world_size=2, infinite=False)) == 4


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_workers", -1), ("shuffle_buffer", 0), ("prefetch_factor", 0), ("weights", {"a": -1.0})],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        LoaderConfig(**{field: value})


def test_missing_split_and_unknown_weight_are_named(shards):
    with pytest.raises(ValueError, match="no dataset has samples in split 'test'"):
        ShardLoader(shards.manifest, "test", 2)
    with pytest.raises(ValueError, match="^weights: no dataset \\['wiki'\\]"):
        ShardLoader(shards.manifest, "train", 2, config=LoaderConfig(weights={"wiki": 1.0}))
