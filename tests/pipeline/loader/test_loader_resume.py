"""ShardLoader resume: exact continuation, also after world-size and worker changes."""

from __future__ import annotations

import itertools
import json

import pytest
from shard_fixtures import write_shards

from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader

SHARDS = {"web": {"train": [5, 7, 3, 9, 12]}, "code": {"train": [8, 6, 11]}}  # 36 + 25


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path, SHARDS, seq_len=8)


def loader(shards, batch, rank=0, world=1, workers=0, **config) -> ShardLoader:
    config = {"return_keys": True, "shuffle_buffer": 10, "num_workers": workers, **config}
    cfg = LoaderConfig(**config)
    return ShardLoader(shards.manifest, "train", batch, rank=rank, world_size=world, seed=3,
                       config=cfg)


def take(loader: ShardLoader, steps: int) -> list[list[str]]:
    return [b["keys"] for b in itertools.islice(loader, steps)]


def global_stream(per_rank: list[list[list[str]]]) -> list[str]:
    """Keys in global order: for every step, rank 0's rows, then rank 1's, …"""
    return [k for step in zip(*per_rank, strict=True) for rows in step for k in rows]


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


def test_every_rank_resumes_exactly_mid_epoch_across_epochs(shards):
    steps, stop = 30, 7  # 30 steps × 4 samples spans two epochs of 61 samples
    for rank in range(2):
        full = take(loader(shards, 2, rank, 2, workers=2), steps)
        first = loader(shards, 2, rank, 2, workers=2)
        head = take(first, stop)
        resumed = loader(shards, 2, rank, 2, workers=2)
        resumed.load_state_dict(roundtrip(first.state_dict()))
        assert head + take(resumed, steps - stop) == full


def test_state_is_the_same_on_every_rank(shards):
    states = []
    for rank in range(2):
        ldr = loader(shards, 2, rank, 2)
        take(ldr, 5)
        states.append(ldr.state_dict())
    assert states[0] == states[1]
    assert states[0]["position"] == 5 * 4


def test_resume_on_one_rank_without_workers_after_two_ranks_with_two(shards):
    stop, more = 5, 9
    full = global_stream([take(loader(shards, 3, r, 2, workers=2), stop + more) for r in range(2)])
    first = [loader(shards, 3, r, 2, workers=2) for r in range(2)]
    for ldr in first:
        take(ldr, stop)
    state = roundtrip(first[0].state_dict())
    # Same global batch (3 × 2 = 6 × 1): every step gets exactly the same samples.
    single = loader(shards, 6, 0, 1, workers=0)
    single.load_state_dict(state)
    assert global_stream([take(single, more)]) == full[stop * 6 :]
    # Half the global batch (3 × 1, twice the accumulation): the stream still continues.
    small = loader(shards, 3, 0, 1, workers=0)
    small.load_state_dict(state)
    assert global_stream([take(small, 2 * more)]) == full[stop * 6 :]


def test_resume_on_two_ranks_after_one(shards):
    full = global_stream([take(loader(shards, 4, 0, 1), 12)])
    first = loader(shards, 4, 0, 1, workers=2)
    take(first, 4)
    resumed = []
    for rank in range(2):
        ldr = loader(shards, 2, rank, 2, workers=2)
        ldr.load_state_dict(roundtrip(first.state_dict()))
        resumed.append(take(ldr, 8))
    assert global_stream(resumed) == full[16:]


def test_resume_refuses_another_seed_or_shuffle_buffer(shards):
    first = loader(shards, 2)
    take(first, 2)
    other = ShardLoader(shards.manifest, "train", 2, seed=4,
                        config=LoaderConfig(shuffle_buffer=10))
    with pytest.raises(ValueError, match="saved with seed=3"):
        other.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="shuffle_buffer"):
        loader(shards, 2, shuffle_buffer=11).load_state_dict(first.state_dict())


def test_finite_loader_resumes_inside_its_pass(tmp_path):
    data = write_shards(tmp_path, {"web": {"val": [4, 6, 3]}}, seq_len=8)
    cfg = LoaderConfig(return_keys=True)
    full = [b["keys"] for b in ShardLoader(data.manifest, "val", 2, config=cfg, infinite=False)]
    first = ShardLoader(data.manifest, "val", 2, config=cfg, infinite=False)
    head = [b["keys"] for b in itertools.islice(first, 3)]
    resumed = ShardLoader(data.manifest, "val", 2, config=cfg, infinite=False)
    resumed.load_state_dict(first.state_dict())
    assert head + [b["keys"] for b in resumed] == full
    assert [b["keys"] for b in resumed] == full  # a completed pass starts again
