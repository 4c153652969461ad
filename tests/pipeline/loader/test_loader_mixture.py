"""ShardLoader mixtures: proportions by weight, even coverage, weights changed mid-run."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from shard_fixtures import write_shards

from lmforge.pipeline.loader.order import MIXTURE_CHUNK
from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader

SHARDS = {"web": {"train": [7, 9, 4]}, "code": {"train": [6, 5]}, "math": {"train": [3]}}


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path, SHARDS, seq_len=4, weights={"web": 3.0, "code": 1.0})


def keys(shards, batch: int, steps: int, state: dict | None = None, **config) -> tuple:
    cfg = LoaderConfig(return_keys=True, shuffle_buffer=8, **config)
    loader = ShardLoader(shards.manifest, "train", batch, seed=1, config=cfg)
    if state is not None:
        loader.load_state_dict(state)
    rows = [k for b in itertools.islice(loader, steps) for k in b["keys"]]
    return rows, loader.state_dict()


def by_dataset(rows: list[str]) -> Counter:
    return Counter(k.split("-")[0] for k in rows)


def test_manifest_weights_are_exact_per_chunk_and_close_on_a_prefix(shards):
    rows, _ = keys(shards, 256, MIXTURE_CHUNK // 256)
    counts = by_dataset(rows)
    # web 3, code 1, math 1 (manifest default): 4096 · 3/5 = 2457.6 → 2458 by largest remainder.
    assert counts == {"web": 2458, "code": 819, "math": 819}
    prefix = by_dataset(rows[:1000])
    assert abs(prefix["web"] / 1000 - 0.6) < 0.05  # hypergeometric σ ≈ 0.013
    # Each dataset cycles through whole epochs: no sample is drawn twice before all once.
    for name in ("web", "code", "math"):
        per_key = Counter(k for k in rows if k.startswith(name))
        assert set(per_key) == shards.keys("train", name)
        assert max(per_key.values()) - min(per_key.values()) <= 1


def test_config_weights_override_and_zero_leaves_a_dataset_out(shards):
    rows, _ = keys(shards, 256, 16, weights={"code": 1.0, "math": 1.0})
    counts = by_dataset(rows)
    assert set(counts) == {"code", "math"} and counts["code"] == counts["math"] == 2048


def test_new_weights_continue_every_dataset_where_it_stopped(shards):
    stage1, state = keys(shards, 8, 10)
    stage2, _ = keys(shards, 8, 10, state=state, weights={"web": 1.0})
    web_alone, _ = keys(shards, 8, 20, weights={"web": 1.0})  # web's own stream from 0
    used = sum(1 for k in stage1 if k.startswith("web"))
    web_stream = [k for k in stage1 if k.startswith("web")] + stage2
    assert web_stream == web_alone[: used + 80]
    # Resuming stage 2 from its own state continues it exactly.
    first, state2 = keys(shards, 8, 4, state=state, weights={"web": 1.0})
    rest, _ = keys(shards, 8, 6, state=state2, weights={"web": 1.0})
    assert first + rest == stage2


def test_a_weight_too_small_for_a_chunk_is_refused(shards):
    with pytest.raises(ValueError, match="^weights: 'math' has 0.0001"):
        keys(shards, 1, 1, weights={"web": 1.0, "math": 1e-4})
