"""The loader's global order as pure arithmetic: bijective per epoch, window-local."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.pipeline.loader.order import MIXTURE_CHUNK, DatasetSplit, Mixture, ShardEntry


def split(counts: list[int], window: int, shuffle: bool = True, seed: int = 5) -> DatasetSplit:
    shards = [ShardEntry(f"s{i}.tar", f"s{i}.tar", n, None) for i, n in enumerate(counts)]
    return DatasetSplit("web", shards, seed, shuffle, window)


@pytest.mark.parametrize(("counts", "window"), [([5, 1, 9, 4], 3), ([7], 7), ([2, 30, 3], 64)])
def test_each_epoch_visits_every_sample_once_and_windows_stay_local(counts, window):
    data = split(counts, window)
    n = sum(counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for epoch in range(3):
        shards, samples = data.locate_many(np.arange(epoch * n, (epoch + 1) * n))
        flat = starts[shards] + samples
        assert sorted(flat.tolist()) == list(range(n))
        # A window holds exactly the samples of its stretch of the shuffled shard order.
        order, _ = data._shard_order(epoch)
        rank_of_shard = np.argsort(order)
        stretch = np.concatenate([[0], np.cumsum(np.array(counts)[order])])
        where = stretch[rank_of_shard[shards]] + samples
        for w in range(0, n, window):
            assert sorted(where[w : w + window].tolist()) == list(range(w, min(n, w + window)))
    shard, sample = data.locate_many(np.array([2 * n + 3]))
    assert data.locate(2 * n + 3) == (int(shard[0]), int(sample[0]))


def test_shuffle_off_is_the_manifest_order():
    data = split([3, 2], 4, shuffle=False)
    shards, samples = data.locate_many(np.arange(10))
    assert list(zip(shards.tolist(), samples.tolist(), strict=True)) == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] * 2


def test_mixture_counts_and_seek_agree_with_a_full_walk():
    mix = Mixture([2.0, 1.0, 0.0, 1.0], seed=9, generation=0)
    assert mix.counts.tolist() == [2048, 1024, 0, 1024]
    positions = np.arange(2 * MIXTURE_CHUNK + 100)
    datasets, j = mix.locate_many(positions)
    for d in range(4):
        # The j-th sample of each dataset is taken exactly once, in order.
        assert j[datasets == d].tolist() == list(range(int((datasets == d).sum())))
    for p in (0, 1, 777, MIXTURE_CHUNK, 2 * MIXTURE_CHUNK + 100):
        assert mix.consumed(p).tolist() == np.bincount(datasets[:p], minlength=4).tolist()
    next_generation = Mixture([2.0, 1.0, 0.0, 1.0], seed=9, generation=1)
    assert not np.array_equal(datasets, next_generation.locate_many(positions)[0])
