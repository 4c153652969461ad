"""The DeepSpeed engine through `lmforge train`: exact resume, checkpoint-on-signal (a rank's
or the launcher's), a killed launcher, and crashes (one rank SIGKILLed between checkpoints or
while a checkpoint is being written).

Real DeepSpeed, 2 processes on gloo, tiny shards in the contract format. Losses are the
mean over ranks written by rank 0 to ``metrics.jsonl`` (exact floats).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from engine_helpers import finish, losses, shard_fixtures, train

from lmforge.launch.train.checkpoint import COMPLETE, LATEST
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


CONFIG = """\
name: engine
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 32
  loader: {{document_masking: true}}
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train:
  micro_batch_size: 4
  log_every: 1
  eval_every: 0
  eval_batches: 2
  warmup_steps: 2
tracking: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("engine")
    shard_fixtures().write_shards(
        tmp / "data", {"d": {"train": [64, 64, 64], "val": [16]}}, seq_len=32
    )
    path = tmp / "engine.yaml"
    path.write_text(CONFIG.format(data=tmp / "data"))
    return path


@pytest.mark.parametrize(
    "zero_stage,precision", [(2, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]
)
def test_resume_is_bit_identical(config, tmp_path, zero_stage, precision):
    common = [f"--deepspeed.zero_stage={zero_stage}", f"--train.precision={precision}",
              "--train.max_steps=8", "--train.checkpoint_every=4"]
    straight = tmp_path / "straight"
    finish(train(config, straight, *common))
    resumed = tmp_path / "resumed"
    checkpoint = straight / "checkpoints" / "step_00000004"
    assert (checkpoint / COMPLETE).exists()
    finish(train(config, resumed, *common, resume=str(checkpoint)))
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(5, 9))
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]
    assert a[8] != a[5]  # the model is actually training


def _rank0_worker(parent: psutil.Process) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if "lmforge.launch.train.worker" in " ".join(child.cmdline()):
                if child.environ().get("RANK") == "0":
                    return child
        except psutil.Error:
            continue
    return None


def test_signal_checkpoints_exits_75_and_resume_continues(config, tmp_path):
    # Constant LR: the schedule does not depend on max_steps, so runs of different length
    # agree step by step and the preempted run can be compared with a straight one.
    common = ["--train.lr_schedule=constant", "--train.warmup_steps=0"]
    run_dir = tmp_path / "preempted"
    proc = train(config, run_dir, *common, "--train.max_steps=100000")
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    rank0 = _rank0_worker(psutil.Process(proc.pid))
    assert rank0 is not None
    rank0.send_signal(signal.SIGUSR1)  # only rank 0: the stop must still be collective
    finish(proc, expect=REQUEUE_EXIT_CODE)
    stopped = max(losses(run_dir))
    tag = (run_dir / "checkpoints" / LATEST).read_text().strip()
    assert tag == f"step_{stopped:08d}"
    marker = json.loads((run_dir / "checkpoints" / tag / COMPLETE).read_text())
    assert marker["step"] == stopped and marker["world_size"] == 2

    end = stopped + 3
    finish(train(config, run_dir, *common, f"--train.max_steps={end}", resume="auto"))
    straight = tmp_path / "straight"
    finish(train(config, straight, *common, f"--train.max_steps={end}"))
    after, reference = losses(run_dir), losses(straight)
    assert [after[s] for s in range(1, end + 1)] == [reference[s] for s in range(1, end + 1)]


def test_the_launcher_passes_sigterm_to_the_ranks_and_takes_them_down_when_killed(config,
                                                                                  tmp_path):
    """SIGTERM to `lmforge train` reaches every rank: they checkpoint and it exits 75. A
    SIGKILLed launcher leaves no rank behind: each gets SIGTERM from the kernel (it dies
    with its parent) and checkpoints on the way out."""
    common = ["--train.lr_schedule=constant", "--train.warmup_steps=0",
              "--train.max_steps=100000"]
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"

    def started(proc, steps: int) -> None:
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.1)

    proc = train(config, run_dir, *common)
    started(proc, 2)
    proc.send_signal(signal.SIGTERM)
    finish(proc, expect=REQUEUE_EXIT_CODE)
    stopped = max(losses(run_dir))
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == f"step_{stopped:08d}"

    proc = train(config, run_dir, *common, resume="auto")
    started(proc, stopped + 2)
    workers = _workers(psutil.Process(proc.pid))
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"ranks still running after the launcher was killed: {alive}"
    last = (run_dir / "checkpoints" / LATEST).read_text().strip()
    assert int(last.split("_")[1]) > stopped + 1  # the ranks checkpointed as they stopped
    assert (run_dir / "checkpoints" / last / COMPLETE).exists()


def test_fp16_on_cpu_is_a_config_error(config, tmp_path):
    proc = train(config, tmp_path / "fp16", "--train.precision=fp16", "--train.max_steps=2")
    out = finish(proc, expect=2)
    assert "train.precision: fp16 needs a CUDA GPU" in out
    assert not (tmp_path / "fp16" / "checkpoints").exists()


def test_no_dataset_is_a_clear_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(data=tmp_path / "missing"))
    out = finish(train(path, tmp_path / "run", "--train.max_steps=2"), expect=1)
    assert "no prepared dataset; run `lmforge prepare CONFIG`" in out
    assert os.path.basename(str(tmp_path / "missing")) in out


def test_training_survives_mlflow_down_and_delivers_when_it_returns(config, tmp_path):
    """A real MLflow server that is not up when training starts: training goes on, and
    every logged step reaches the server once it is started."""
    from mlflow.tracking import MlflowClient
    from mlflow_server import MlflowServer, free_port

    port = free_port()
    run_dir = tmp_path / "tracked"
    proc = train(config, run_dir, f"--tracking.uri=http://127.0.0.1:{port}",
                 "--tracking.enabled=true", "--tracking.experiment=engine",
                 "--tracking.close_timeout_s=240", "--tracking.retry_max_s=2",
                 "--train.max_steps=40", "--train.eval_every=20")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    with MlflowServer(tmp_path / "mlflow", port=port) as server:  # comes up mid-training
        out = finish(proc)
        assert "tracking" in out.lower()  # the outage was reported, not silent
        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("engine")
        (mlrun,) = client.search_runs([experiment.experiment_id])
        logged = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id,
                                                                     "train/loss")}
        assert logged == losses(run_dir)
        assert sorted(logged) == list(range(1, 41))
        assert client.get_metric_history(mlrun.info.run_id, "val/loss")


# --- Crashes (issue 14, item 5): SIGKILL of one rank, between checkpoints and mid-write ---

def _worker(parent: psutil.Process, rank: int) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if ("lmforge.launch.train.worker" in " ".join(child.cmdline())
                    and child.environ().get("RANK") == str(rank)):
                return child
        except psutil.Error:
            continue
    return None


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    return [w for w in (_worker(parent, r) for r in (0, 1)) if w is not None]


def _assert_all_gone(proc, workers: list[psutil.Process], within: float = 60) -> str:
    """The run fails and the launcher tears every rank down within ``within`` seconds."""
    out, _ = proc.communicate(timeout=within)
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"ranks still running after the launcher ended: {alive}"
    assert proc.returncode not in (0, REQUEUE_EXIT_CODE), out[-3000:]
    return out


def test_sigkill_of_one_rank_fails_the_run_and_resume_auto_is_bit_identical(config, tmp_path):
    common = ["--train.precision=fp32", "--train.lr_schedule=constant",
              "--train.warmup_steps=0", "--train.checkpoint_every=4"]
    run_dir = tmp_path / "crashed"
    proc = train(config, run_dir, *common, "--train.max_steps=100000")
    deadline = time.time() + 300
    root = run_dir / "checkpoints"
    # Kill once a checkpoint is published and the run is 1-2 steps past it.
    while not (root / LATEST).exists() or max(losses(run_dir)) % 4 not in (1, 2):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.005)
    parent = psutil.Process(proc.pid)
    workers = _workers(parent)
    assert len(workers) == 2
    killed_at = time.monotonic()
    _worker(parent, 1).send_signal(signal.SIGKILL)
    _assert_all_gone(proc, workers)
    assert time.monotonic() - killed_at < 60
    latest = int((root / LATEST).read_text().strip().split("_")[1])
    crashed = losses(run_dir)
    assert max(crashed) > latest  # steps after the checkpoint are lost and redone

    # The steps logged before the kill are the uninterrupted run's (nothing had failed yet):
    # the resumed run must redo every step after the checkpoint to exactly those losses.
    end = max(crashed)
    finish(train(config, run_dir, *common, f"--train.max_steps={end}", resume="auto"))
    after = losses(run_dir)
    assert sorted(after) == list(range(1, end + 1))
    assert [after[s] for s in range(latest + 1, end + 1)] == [
        crashed[s] for s in range(latest + 1, end + 1)]


def test_sigkill_during_checkpoint_write_resumes_from_the_previous_one(config, tmp_path):
    # A model big enough (~10 M parameters, ~160 MB of checkpoint) that a save takes a
    # measurable time, so the kill lands while DeepSpeed is writing step 6.
    common = ["--train.precision=fp32", "--model.n_layers=4", "--model.d_model=384",
              "--model.n_heads=6", "--model.n_kv_heads=2", "--model.d_ff=1536",
              "--train.max_steps=9", "--train.checkpoint_every=3"]
    run_dir = tmp_path / "crashed"
    proc = train(config, run_dir, *common)
    partial = run_dir / "checkpoints" / "step_00000006"
    deadline = time.time() + 300
    while not (partial.is_dir() and any(partial.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "no save of step 6 seen"
        time.sleep(0.002)
    parent = psutil.Process(proc.pid)
    workers = _workers(parent)
    _worker(parent, 0).send_signal(signal.SIGKILL)
    _assert_all_gone(proc, workers)
    assert not (partial / COMPLETE).exists()  # killed mid-write
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == "step_00000003"

    crashed = losses(run_dir)  # steps 1-6 of the uninterrupted run (the kill came after 6)
    assert sorted(crashed) == list(range(1, 7))
    finish(train(config, run_dir, *common, "--train.checkpoint_every=8", resume="auto"))
    after = losses(run_dir)
    assert sorted(after) == list(range(1, 10))
    assert [after[s] for s in range(4, 7)] == [crashed[s] for s in range(4, 7)]
    assert after[9] != after[4]  # and it trained on to the end
    root = run_dir / "checkpoints"
    assert not partial.exists()
    assert all((p / COMPLETE).exists() for p in root.iterdir() if p.is_dir())
    assert (root / LATEST).read_text().strip() == "step_00000009"
