"""The device contract of the trainer's collectives: they run on the engine's device.

NCCL reduces only CUDA tensors ("No backend type associated with device type cpu" for a
CPU tensor); gloo takes any, so the 2-process CPU engine tests cannot catch a collective on
the wrong device. Here the engine's device is not the CPU: it is torch's ``lazy`` device
(LazyTensor on the TorchScript backend, which runs on a CPU-only machine), and the process
group is a backend that, like NCCL, serves only that device type and refuses everything
else with NCCL's message. The loop is the real :class:`Trainer` (its loss guard, token
counters, evaluation) with the real ``MetricsLogger`` and ``PreemptionHandler``; DeepSpeed
cannot run on ``lazy``, so the engine is a stand-in that only supplies a device, a loss
and a place to save.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lmforge.launch.config import TrainConfig
from lmforge.launch.tracking import Tracker
from lmforge.launch.train.callbacks import MetricsLogger
from lmforge.launch.train.objectives import ObjectiveOutput
from lmforge.launch.train.preemption import PreemptionHandler
from lmforge.launch.train.trainer import Trainer

LOSS, TOKENS, TARGETS = 2.5, 96, 90


def _lazy_device() -> torch.device:
    import torch._lazy
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    return torch.device("lazy")


class _Done(dist._Work):
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.tensors = tensors

    def wait(self, timeout=None) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        future = torch.futures.Future()
        future.set_result(self.tensors)
        return future


class OneDeviceGroup(dist.ProcessGroup):
    """A process group that serves one device type only, as NCCL serves only CUDA.

    The reduction itself is gloo's, on host copies; each call's device type and op are
    recorded.
    """

    def __init__(self, store, rank: int, size: int, timeout, device_type: str) -> None:
        super().__init__(rank, size)
        self.device_type = device_type
        self.gloo = dist.ProcessGroupGloo(dist.PrefixStore("host", store), rank, size, timeout)
        self.calls: list[str] = []

    def allreduce(self, tensors: list[torch.Tensor], opts) -> _Done:
        for tensor in tensors:
            if tensor.device.type != self.device_type:
                raise RuntimeError(
                    f"No backend type associated with device type {tensor.device.type}")
        self.calls.append("MAX" if opts.reduceOp == dist.ReduceOp.MAX else "SUM")
        host = [t.cpu() for t in tensors]
        self.gloo.allreduce(host, opts).wait()
        for tensor, reduced in zip(tensors, host, strict=True):
            tensor.copy_(reduced.to(tensor.device))
        return _Done(tensors)

    def barrier(self, opts=None) -> _Done:
        self.gloo.barrier().wait()
        return _Done([])

    def getBackendName(self) -> str:
        return "one_device"


@pytest.fixture
def lazy_group():
    """A one-rank process group that reduces only ``lazy`` tensors."""
    device = _lazy_device()
    groups: list[OneDeviceGroup] = []

    def create(store, rank, size, timeout):
        groups.append(OneDeviceGroup(store, rank, size, timeout, device.type))
        return groups[-1]

    dist.Backend.register_backend("one_device", create, devices=[device.type])
    dist.init_process_group("lazy:one_device", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield device, groups[0]
    finally:
        dist.destroy_process_group()


class StandInEngine:
    """What the trainer asks of a DeepSpeed engine, on ``device``; backward/step do nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.module = torch.nn.Identity()
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        self.checkpoint_engine = None  # what the save wraps to seal DeepSpeed's own writes

    def zero_optimization_stage(self) -> int:
        return 0

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def get_global_grad_norm(self) -> None:
        return None

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "client_state.json").write_text(json.dumps(client_state["train_state"]))


class Batches:
    """An endless loader of empty batches (the objective ignores them)."""

    skipped_samples = 0
    bad_shards: dict[str, str] = {}

    def __iter__(self):
        while True:
            yield {}

    def state_dict(self) -> dict:
        return {}


class StandInObjective:
    """A constant loss on ``device``, reported as a language model's (validation perplexity)."""

    language_model = True

    def __call__(self, engine, batch, device, generator) -> ObjectiveOutput:
        return ObjectiveOutput(loss=torch.tensor(LOSS, device=device), targets=TARGETS,
                               tokens=TOKENS)


objective = StandInObjective()


def test_every_collective_runs_on_the_engine_device(lazy_group, tmp_path):
    device, group = lazy_group
    train = TrainConfig(max_steps=4, log_every=2, checkpoint_every=0, eval_every=0,
                        micro_batch_size=1, warmup_steps=0)
    metrics = MetricsLogger(Tracker.disabled(), None, None, jsonl=tmp_path / "metrics.jsonl")
    trainer = Trainer(StandInEngine(device), train, objective, Batches(),
                      val_loader=lambda: [{}, {}], checkpoints=tmp_path / "checkpoints",
                      seed=0, callbacks=[metrics, PreemptionHandler()])
    state = trainer.fit()  # the end of the run also evaluates and checkpoints

    assert state.step == 4 and state.tokens_seen == 4 * TOKENS
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == [2, 4]
    assert all(r["train/loss"] == LOSS for r in logged if "train/loss" in r)
    assert [r["val/loss"] for r in logged if "val/loss" in r] == [LOSS]
    saved = json.loads((tmp_path / "checkpoints" / "step_00000004" / "client_state.json")
                       .read_text())
    assert saved["tokens_seen"] == 4 * TOKENS
    # Per step: the loss check and the stop flag. The token counter and the logged means
    # are reduced at logging steps only (2 and 4), then the final evaluation.
    per_step = ["SUM", "MAX"]
    log_step = ["SUM", "SUM", "SUM", "MAX"]  # + tokens (fit), + loss/tokens (logger)
    expected = per_step + log_step + per_step + log_step + ["SUM"]
    assert group.calls == expected
