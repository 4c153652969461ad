"""A ZeRO-3 model built partitioned from scratch (issue 23 item 2): two gloo ranks in this
test's own processes (no launcher) build each model family under
``source_load.model_build_context`` (``deepspeed.zero.Init``, ``init_weights`` one gathered
module at a time). Gathered back, every parameter equals the whole build's from the same
seed exactly, the random generator is left in the same state (dropout and later draws
match), and no rank held more than its partition of any parameter."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.launch.train.source_load import model_build_context, uses_partitioned_build
from lmforge.model import ModelConfig

pytestmark = pytest.mark.slow  # two processes that start DeepSpeed

WORLD = 2
SMALL = {"d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "vocab_size": 96,
         "max_seq_len": 64}
# Every init convention (llama, gpt2 tied with biases, bert with a new classification
# head, xavier encoder-decoder), each family.
CASES = {
    "llama": ModelConfig.from_preset("tiny", **{**SMALL, "n_kv_heads": 2}),
    "gpt2": ModelConfig.from_preset("gpt2-124m", **SMALL),
    "bert_head": ModelConfig.from_preset("bert-base", **SMALL, num_labels=3),
    "transformer": ModelConfig.from_preset("transformer-base", **SMALL),
}


def _rank(rank: int, store: str, out: str) -> None:
    import deepspeed

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ds_config = {"train_batch_size": WORLD, "zero_optimization": {"stage": 3}}
    report: dict[str, object] = {}
    for (name, cfg), checked in itertools.product(CASES.items(), (True, False)):
        torch.manual_seed(7)
        whole = cfg.build()
        after_whole = torch.get_rng_state()
        torch.manual_seed(7)
        # checked: the local writes DeepSpeed's layout allows; else its public all-gather
        with model_build_context(True, ds_config, checked=checked):
            part = cfg.build()
        same_rng = torch.equal(torch.get_rng_state(), after_whole)
        params = dict(part.named_parameters())
        local = sum(p.ds_tensor.numel() for p in params.values())
        total = sum(p.ds_numel for p in params.values())
        held = all(p.data.numel() == 0 for p in params.values())  # only ds_tensor is kept
        equal = []
        for key, tensor in whole.named_parameters():
            with deepspeed.zero.GatheredParameters([params[key]]):
                equal.append(torch.equal(params[key].data, tensor.data))
        key = f"{name}-{'local' if checked else 'public'}"
        report[key] = {"equal": all(equal) and len(equal) == len(params),
                       "rng": same_rng, "fraction": local / total, "held": held}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_partitioned_build_equals_the_whole_build(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(report) == sorted(f"{name}-{path}" for name in CASES
                                        for path in ("local", "public"))
        for name, case in report.items():
            assert case["equal"] and case["rng"] and case["held"], (rank, name, case)
            assert case["fraction"] == pytest.approx(1 / WORLD, abs=0.05), (rank, name)


def test_deepspeed_internals_only_on_a_checked_version() -> None:
    from lmforge.launch.train.lean_deepspeed import CHECKED_DEEPSPEED_VERSIONS, is_checked

    assert is_checked(CHECKED_DEEPSPEED_VERSIONS[0])
    assert not is_checked("0.0.1") and not is_checked("99.0.0")


def test_every_zero3_run_but_lora_builds_partitioned() -> None:
    assert uses_partitioned_build(3, "all")
    assert uses_partitioned_build(3, "head_only")
    assert not uses_partitioned_build(3, "lora")
    assert not any(uses_partitioned_build(stage, "all") for stage in (0, 1, 2))
