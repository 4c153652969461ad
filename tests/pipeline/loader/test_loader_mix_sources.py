"""``data.mix``: two prepared datasets streamed as one — proportions, exact resume (same and
other world size), reweighting stages, repetition caps, mismatch errors, the draw plan."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter

import pytest
from shard_fixtures import write_shards

from lmforge.pipeline.config import DataConfig, MixSourceConfig
from lmforge.pipeline.contract.shard_tar import ShardError
from lmforge.pipeline.loader.draws import drawn_between, plan_draws
from lmforge.pipeline.loader.mix import Mix, MixError
from lmforge.pipeline.loader.order import MIXTURE_CHUNK
from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader

SEQ = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    a = write_shards(root / "a", {"web": {"train": [7, 9, 4], "val": [3]}}, seq_len=SEQ)
    b = write_shards(root / "b", {"code": {"train": [6, 5]}}, seq_len=SEQ, seed=1)
    return a, b


def mix(folders, wa=3.0, wb=1.0, cap_b=None, cap_a=None, tokens=False) -> Mix:
    a, b = folders
    if tokens:
        return Mix([MixSourceConfig(str(a.manifest.parent), tokens=int(wa * 100)),
                    MixSourceConfig(str(b.manifest.parent), tokens=int(wb * 100))])
    return Mix([MixSourceConfig(str(a.manifest.parent), weight=wa, max_epochs=cap_a),
                MixSourceConfig(str(b.manifest), weight=wb, max_epochs=cap_b)])


def loader(m: Mix, batch: int, rank: int = 0, world: int = 1) -> ShardLoader:
    cfg = LoaderConfig(return_keys=True, shuffle_buffer=8)
    return ShardLoader(m, "train", batch, rank=rank, world_size=world, seed=5, config=cfg)


def stream(loaders: list[ShardLoader], steps: int) -> list[str]:
    """Keys in global order: per step, rank 0's rows, then rank 1's, …"""
    per_rank = [[b["keys"] for b in itertools.islice(ldr, steps)] for ldr in loaders]
    return [k for step in zip(*per_rank, strict=True) for rows in step for k in rows]


def source(key: str) -> str:
    return key.split("-")[0]


def test_proportions_follow_weights_and_token_budgets(folders):
    keys = stream([loader(mix(folders), 256)], MIXTURE_CHUNK // 256)
    # 4096 · 3/4 = 3072 exactly per chunk; a 1000-sample prefix within 0.05 (σ ≈ 0.012).
    assert Counter(map(source, keys)) == {"web": 3072, "code": 1024}
    assert abs(sum(source(k) == "web" for k in keys[:1000]) / 1000 - 0.75) < 0.05
    # Each source cycles through its samples evenly (whole epochs, no early repeats).
    for name in ("web", "code"):
        per_key = Counter(k for k in keys if source(k) == name)
        assert max(per_key.values()) - min(per_key.values()) <= 1
    # Token budgets 300 : 100 are the same shares, hence the same stream.
    assert stream([loader(mix(folders, tokens=True), 256)], 4) == keys[:1024]


def test_resume_mid_stream_on_the_same_and_another_world_size(folders):
    m = mix(folders)
    full = stream([loader(m, 3, r, 2) for r in range(2)], 20)
    first = [loader(m, 3, r, 2) for r in range(2)]
    head = stream(first, 7)
    state = json.loads(json.dumps(first[0].state_dict()))
    assert state == first[1].state_dict()
    same = [loader(m, 3, r, 2) for r in range(2)]
    other = [loader(m, 2, r, 3) for r in range(3)]  # 2 × 3 = 6 as well
    one = [loader(m, 3)]  # half the global batch: twice the accumulation
    for group in (same, other, one):
        for ldr in group:
            ldr.load_state_dict(state)
    steps = 13
    assert head + stream(same, steps) == full
    assert head + stream(other, steps) == full
    assert head + stream(one, 2 * steps) == full


def test_a_reweighting_stage_continues_each_source(folders):
    first = loader(mix(folders), 8)
    stage1 = stream([first], 10)
    second = loader(mix(folders, wa=1.0, wb=1.0), 8)  # the same shards, new weights
    second.load_state_dict(first.state_dict())
    stage2 = stream([second], 10)
    assert 0.4 < sum(source(k) == "web" for k in stage2) / 80 < 0.6
    only_b = loader(mix(folders, wa=0.001, wb=1.0), 8)  # b's own order from the start
    b_stream = [k for k in stream([only_b], 40) if source(k) == "code"]
    used = [k for k in stage1 + stage2 if source(k) == "code"]
    assert used == b_stream[: len(used)]


def test_a_capped_source_leaves_the_mixture_at_its_cap(folders):
    m = mix(folders, wa=1.0, wb=1.0, cap_b=2)  # b: 11 samples, 2 epochs = 22 draws
    full = stream([loader(m, 4)], 30)
    drawn = Counter(k for k in full if source(k) == "code")
    assert sum(drawn.values()) == 22 and set(drawn.values()) == {2}
    last_b = max(i for i, k in enumerate(full) if source(k) == "code")
    assert 30 < last_b < 60  # ~44 at 1:1; only web after it
    # A resume across the cap point is exact.
    first = loader(m, 4)
    head = stream([first], 5)
    again = loader(m, 4)
    again.load_state_dict(first.state_dict())
    assert head + stream([again], 25) == full
    plan = plan_draws(m, 120, seed=5)
    assert [(d.label, d.tokens_drawn, d.capped) for d in plan.sources] == [
        ("a", (120 - 22) * SEQ, False), ("b", 22 * SEQ, True)]
    assert plan.stop is None and plan.sources[1].epochs == 2.0


def test_every_source_capped_stops_with_a_named_error(folders):
    m = mix(folders, cap_a=1, cap_b=1)  # 20 + 11 samples in all
    plan = plan_draws(m, 40)
    assert plan.stop == 31 and all(d.capped for d in plan.sources)
    ldr = loader(m, 4)
    with pytest.raises(ShardError, match=r"data.mix: every source reached its max_epochs"):
        stream([ldr], 10)


def test_sources_that_do_not_fit_are_refused_listing_each_mismatch(folders, tmp_path):
    a, _ = folders
    other = write_shards(tmp_path, {"x": {"train": [4]}}, seq_len=8, token_dtype="uint32")
    with pytest.raises(MixError) as err:
        Mix([MixSourceConfig(str(a.manifest.parent), weight=1.0),
             MixSourceConfig(str(tmp_path), weight=1.0)])
    text = str(err.value)
    assert "data.mix[1]" in text and "seq_len 8 vs 4" in text
    assert "token_dtype uint32 vs uint16" in text and "tokenizer" not in text.split(":")[1]
    with pytest.raises(MixError, match=r"^data.mix\[0\]: .*no manifest here"):
        Mix([MixSourceConfig(str(tmp_path / "nowhere"), weight=1.0)])
    assert other.manifest.exists()


def test_mix_config_is_validated():
    with pytest.raises(ValueError, match="needs exactly one of them"):
        MixSourceConfig("d", weight=1.0, tokens=10)
    with pytest.raises(ValueError, match="max_epochs"):
        MixSourceConfig("d", weight=1.0, max_epochs=0)
    with pytest.raises(ValueError, match="some sources give a weight, others tokens"):
        DataConfig(mix=[MixSourceConfig("a", weight=1.0), MixSourceConfig("b", tokens=5)])
    with pytest.raises(ValueError, match="give each a `name`"):
        DataConfig(mix=[MixSourceConfig("x/d", weight=1.0), MixSourceConfig("y/d/", weight=1)])
    cfg = DataConfig(mix=[MixSourceConfig("runs/data/manifest.json", weight=1.0)])
    assert cfg.mix[0].label == "data"


def test_a_moved_source_folder_still_resumes(folders, tmp_path):
    a, b = folders
    first = loader(mix(folders), 4)
    stream([first], 3)
    moved = shutil.copytree(b.manifest.parent, tmp_path / "elsewhere" / "b")
    again = loader(Mix([MixSourceConfig(str(a.manifest.parent), weight=3.0),
                        MixSourceConfig(str(moved), weight=1.0)]), 4)
    again.load_state_dict(first.state_dict())  # same source names and shards: same stream
    assert stream([again], 5) == stream([first], 5)


def test_the_draw_plan_is_what_the_loader_draws_across_stages(folders):
    cfg = LoaderConfig(return_keys=True, shuffle_buffer=8)
    first = loader(mix(folders), 8)
    stage1 = Counter(map(source, stream([first], 10)))
    plan1 = plan_draws(mix(folders), 80, seed=5, loader=cfg)
    assert {d.label: d.tokens_drawn for d in plan1.sources} == {
        "a": stage1["web"] * SEQ, "b": stage1["code"] * SEQ}
    assert plan1.state == {**first.state_dict(), "global_batch": 1}
    # An anneal stage with new weights continues the planned state as the loader does.
    anneal = mix(folders, wa=1.0, wb=3.0)
    second = loader(anneal, 8)
    second.load_state_dict(first.state_dict())
    stage2 = Counter(map(source, stream([second], 10)))
    plan2 = plan_draws(anneal, 80, seed=5, loader=cfg, start=plan1.state)
    assert [(d.label, d.tokens_drawn, d.share) for d in plan2.sources] == [
        ("a", stage2["web"] * SEQ, 0.25), ("b", stage2["code"] * SEQ, 0.75)]
    # Counted afterwards from the two checkpointable states: the same.
    assert drawn_between(anneal, 5, first.state_dict(), second.state_dict(), cfg) == \
        plan2.sources
    # Over one whole mixture chunk the counts are the weights' shares exactly (by hand:
    # 4096 / 4 = 1024 samples of a, 3072 of b).
    whole = plan_draws(anneal, MIXTURE_CHUNK, seed=5, loader=cfg, start=plan1.state)
    assert [d.tokens_drawn for d in whole.sources] == [1024 * SEQ, 3072 * SEQ]
    with pytest.raises(ValueError, match="shuffle_buffer"):
        plan_draws(anneal, 8, seed=5, start=plan1.state)  # another shuffle: another order
