"""Loading a source without a whole model per rank (issue 22 item 4): two gloo ranks in
this test's own processes (no launcher). A tiny Llama-3 model saved by `transformers` as
sharded bf16 safetensors is read lazily by `warm_start.resolve`; under ZeRO-3 the model is
built with `deepspeed.zero.Init` and each partition is filled tensor by tensor; under ZeRO
0-2 rank 0 reads and broadcasts. Gathered back, every parameter equals the source's tensor
exactly (read independently with `safetensors.load_file` and the `from_hf` mapping)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file

from lmforge.launch.config import InitConfig, TrainableConfig
from lmforge.launch.train.source_load import LazyTensor, SafetensorsFolder
from lmforge.launch.train.warm_start import load_source_weights, resolve
from lmforge.model import ModelConfig, from_hf

pytestmark = pytest.mark.slow  # two processes that start DeepSpeed (~30 s on an idle machine)

WORLD = 2


def _source(folder: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=0.1, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder


def _expected(folder: Path) -> dict[str, torch.Tensor]:
    """The source under lmforge names, read whole by an independent route."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    config = json.loads((folder / "config.json").read_text())
    return {k: v.float() for k, v in from_hf(config, state)[1].items()}


def _rank(rank: int, folder: str, store: str, out: str) -> None:
    import deepspeed

    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    start = resolve(InitConfig(source=folder), ModelConfig(), TrainableConfig())
    assert start.hf_state is not None
    assert all(isinstance(v, LazyTensor) for v in start.hf_state.values())  # nothing read
    expected = _expected(Path(folder))
    report: dict[str, object] = {}
    ds_config = {"train_batch_size": WORLD, "zero_optimization": {"stage": 3}}
    torch.manual_seed(rank)  # the other rank's own init must not survive the load
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = start.model.build()
    local = sum(p.ds_tensor.numel() for p in model.parameters())
    whole = sum(p.ds_numel for p in model.parameters())
    report["partition_fraction"] = local / whole
    load_source_weights(model, start, rank)
    equal = []
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            equal.append(torch.equal(param.data, expected[name]))
    report["zero3_equal"] = all(equal) and len(equal) == len(list(model.parameters()))
    torch.manual_seed(10 + rank)
    plain = start.model.build()
    load_source_weights(plain, start, rank)
    report["broadcast_equal"] = all(torch.equal(t, expected[k])
                                    for k, t in plain.state_dict().items() if k in expected)
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_partitioned_load_equals_the_source_exactly(tmp_path, capsys):
    folder = _source(tmp_path / "src")
    assert (folder / "model.safetensors.index.json").is_file()
    lazy = SafetensorsFolder(sorted(folder.glob("*.safetensors")))
    assert lazy["lm_head.weight"].shape == (96, 64)
    mp.spawn(_rank, args=(str(folder), str(tmp_path / "store"), str(tmp_path)),
             nprocs=WORLD, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for report in reports:
        assert report["zero3_equal"] and report["broadcast_equal"], report
        assert report["partition_fraction"] == pytest.approx(1 / WORLD, abs=0.02)
