"""RayExecutor on a real local Ray (2 CPUs): phase items run `num_workers` at a time on one
pool of phase workers; the encode stage shares its items over a pool of encoder actors;
placement over nodes follows their CPUs; the local Ray of `ray_session` runs only what a
prepare job uses."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.prepare.phases import WorkContext
from lmforge.pipeline.prepare.tokenizer import train_tokenizer
from lmforge.pipeline.run import local_ray
from lmforge.pipeline.run.executor import RayExecutor, spread_over_nodes
from lmforge.pipeline.run.local_ray import CHECKED_RAY_VERSIONS

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"


def probe_type() -> type:
    """An encode item's result as the executor wants one (a dataclass with a `node` field),
    made in a function so that Ray's workers get the class by value, not by module name."""

    @dataclasses.dataclass
    class Probe:
        index: int
        pid: int = 0
        tokens: int = 0
        node: str = ""

    return Probe


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, *_ in spans] + [(end, -1) for _, end, _ in spans])
    running = peak = 0
    for _, step in events:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("workers", [1, 2])
def test_phase_items_run_at_most_num_workers_at_once(ray_cluster, workers: int) -> None:
    def item(seconds: float) -> tuple[float, float, int]:  # a closure: pickled by value
        start = time.time()
        time.sleep(seconds)
        return start, time.time(), os.getpid()

    executor = RayExecutor(num_workers=workers, progress=False)
    try:
        first = executor.map(item, [0.3] * 4, "test")
        second = executor.map(item, [0.3] * 4, "test")
    finally:
        executor.close()
    assert [len(r) for r in (first, second)] == [4, 4]
    # Two CPUs, so one-CPU Ray remote calls would run two at a time even with num_workers=1.
    assert max(_max_overlap(first), _max_overlap(second)) <= workers
    # Both phases ran on the same `workers` processes: no process start per phase.
    assert len({pid for *_, pid in first + second}) == workers
    if workers == 1:
        assert first[-1][1] - first[0][0] >= 4 * 0.3  # one after another


def test_encoders_and_shard_writers_are_the_phase_workers_already_running(
    ray_cluster, encode_ctx
) -> None:
    probe = probe_type()

    def encode(index: int, ctx: WorkContext, encoder):
        return probe(index, os.getpid())

    executor = RayExecutor(num_workers=2, progress=False)
    try:
        pids = set(executor.map(lambda _: os.getpid(), [0, 1], "test"))
        assert len(pids) == 2
        handles = []
        for result in executor.encode_stream(encode, [0, 1, 2, 3], encode_ctx):
            assert result.pid in pids and result.node
            handles.append(executor.submit(lambda _: os.getpid(), result.index))
        assert set(executor.collect(handles, "test")) <= pids
        assert len(executor.pool) == 2  # no process started for encoding or writing
    finally:
        executor.close()


def test_workers_are_spread_over_nodes_by_cpus() -> None:
    assert spread_over_nodes({"a": 1, "b": 1}, 2) == ["a", "b"]
    assert spread_over_nodes({"a": 4, "b": 1}, 5) == ["a"] * 4 + ["b"]
    assert spread_over_nodes({"a": 4, "b": 2}, 3) == ["a", "a", "b"]
    assert spread_over_nodes({"a": 1, "b": 1}, 1) == ["a"]  # ties go to the first node
    assert spread_over_nodes({"a": 3, "b": 3, "c": 2}, 4) == ["a", "a", "b", "c"]
    for count in range(1, 12):
        assert len(spread_over_nodes({"a": 3, "b": 5, "c": 1}, count)) == count


def test_the_earliest_bad_item_is_reported_whichever_fails_first(ray_cluster) -> None:
    def item(index: int) -> int:
        if index == 1:  # the earliest bad item fails last
            time.sleep(0.5)
            raise ValueError("item 1: bad")
        if index == 2:
            raise ValueError("item 2: bad")
        return index

    executor = RayExecutor(num_workers=2, progress=False)
    try:
        with pytest.raises(ValueError, match="item 1: bad"):
            executor.map(item, [0, 1, 2, 3, 4], "test")
    finally:
        executor.close()


@pytest.fixture(scope="module")
def encode_ctx(tmp_path_factory: pytest.TempPathFactory) -> WorkContext:
    folder = tmp_path_factory.mktemp("encode")
    sample = folder / "sample.txt"
    sample.write_text(CORPUS.read_text()[:50_000])
    model = train_tokenizer(sample, TokenizerConfig(vocab_size=400), folder / "tok.model")
    data = DataConfig(datasets=[DatasetSpec(name="d", paths=[str(sample)])],
                      output_dir=str(folder / "out"))
    return WorkContext(str(folder / "work"), str(folder / "out"), data, 1, str(model))


def test_encode_items_are_shared_over_the_encoder_pool(ray_cluster, encode_ctx) -> None:
    probe = probe_type()

    def item(index: int, ctx: WorkContext, encoder):
        time.sleep(0.2)
        return probe(index, os.getpid(), len(encoder.encode(["ab"])[0]))

    executor = RayExecutor(num_workers=2, progress=False)
    try:
        results = list(executor.encode_stream(item, list(range(6)), encode_ctx))
    finally:
        executor.close()
    assert sorted(r.index for r in results) == list(range(6))
    assert len({r.pid for r in results}) == 2  # both encoders got items
    assert all(r.node and r.tokens >= 2 for r in results)  # model loaded, node named


def test_encode_reports_the_earliest_bad_item_whichever_fails_first(
    ray_cluster, encode_ctx
) -> None:
    probe = probe_type()

    def item(index: int, ctx: WorkContext, encoder):
        if index == 1:  # the earliest bad item fails last
            time.sleep(0.5)
            raise ValueError("item 1: bad")
        if index == 2:
            raise ValueError("item 2: bad")
        return probe(index)

    executor = RayExecutor(num_workers=2, progress=False)
    try:
        with pytest.raises(ValueError, match="item 1: bad"):
            list(executor.encode_stream(item, list(range(5)), encode_ctx))
    finally:
        executor.close()


LEAN_PROBE = """
import json, pathlib, psutil, ray
from ray._private import node, services, utils
from lmforge.pipeline.run.local_ray import ray_session
with ray_session(None):
    assert ray.get(ray.remote(lambda: 1).remote()) == 1
    kids = psutil.Process().children(recursive=True)
    commands = [" ".join(p.cmdline()) for p in kids]
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    ports = {p.name.rsplit("_", 1)[0]: p.read_text()
             for p in pathlib.Path(session).glob("*_port_*")}
print(json.dumps({"commands": commands, "ports": ports, "ray": ray.__version__, "restored": [
    node.Node.start_api_server.__module__, node.Node.start_monitor.__module__,
    node.Node.start_log_monitor.__module__, utils.get_dashboard_dependency_error.__module__,
    services._build_python_executable_command_memory_profileable.__module__,
    services.get_node.__module__]}))
"""


@pytest.mark.slow
def test_the_local_ray_runs_only_what_the_job_uses(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", LEAN_PROBE], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    commands = out["commands"]
    assert any("gcs_server" in c for c in commands) and any("raylet" in c for c in commands)
    raylet = next(c for c in commands if "raylet/raylet" in c)
    agent_command = raylet.split("--dashboard_agent_command=")[1].split(" --")[0]
    if out["ray"] in CHECKED_RAY_VERSIONS:
        for unused in ("dashboard/dashboard.py", "autoscaler/_private/monitor.py",
                       "_private/log_monitor.py"):
            assert not [c for c in commands if unused in c], (unused, commands)
        # The stand-in agent: running, no Ray dashboard agent, and it published "no port"
        # for what the minimal agent publishes no port for.
        assert "-m lmforge.pipeline.run.ray_agent" in agent_command, agent_command
        assert [c for c in commands if "lmforge.pipeline.run.ray_agent" in c], commands
        assert not [c for c in commands if c.startswith("ray::DashboardAgent")], commands
        for name in ("metrics_agent_port", "metrics_export_port",
                     "dashboard_agent_listen_port"):
            assert out["ports"][name] == "-1", out["ports"]
    else:  # a Ray version the lean start was not checked against starts as Ray starts it
        assert "lmforge" not in agent_command, agent_command
    # Ray's own functions are back once the local Ray is up.
    assert all(m.startswith("ray.") for m in out["restored"]), out["restored"]


@pytest.mark.slow
def test_local_ray_ignores_a_cluster_recorded_by_ray_start():
    """`ray start` records its cluster in <ray temp dir>/ray_current_cluster and leaves the
    file behind if it dies; ray.init() with no address would attach to that address (and
    hang on a dead one). `data.ray_address: null` means a Ray of the job's own."""
    tmp = Path(tempfile.mkdtemp(prefix="lmf", dir="/tmp"))  # short: Ray's socket paths
    try:
        (tmp / "ray").mkdir()
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens
        code = ("import ray\nfrom lmforge.pipeline.run.local_ray import ray_session\n"
                "with ray_session(None):\n"
                "    print(ray.get(ray.remote(lambda: 'ok').remote()))\n")
        env = {**os.environ, "TMPDIR": str(tmp)}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _current(targets: list) -> list:
    return [getattr(owner, name) for owner, name, _ in targets]


def test_a_ray_version_not_checked_patches_nothing() -> None:
    """The lean start touches Ray's private attributes only on a checked Ray version: on any
    other, every one of them is still Ray's own object, and ray.init gets no private key."""
    targets = local_ray.patch_targets()
    before = _current(targets)
    assert len(targets) == 6 and all(callable(f) for f in before)
    with local_ray.lean_local_start("0.0.0-not-checked"):
        during = _current(targets)
        assert all(a is b for a, b in zip(during, before, strict=True)), during
    assert all(a is b for a, b in zip(_current(targets), before, strict=True))
    assert "_system_config" not in local_ray.local_init_options("0.0.0-not-checked")


def test_a_checked_ray_version_patches_every_target_and_restores_it() -> None:
    targets = local_ray.patch_targets()
    before = _current(targets)
    with local_ray.lean_local_start(CHECKED_RAY_VERSIONS[0]):
        assert _current(targets) == [replacement for _, _, replacement in targets]
    assert all(a is b for a, b in zip(_current(targets), before, strict=True))
    assert "_system_config" in local_ray.local_init_options(CHECKED_RAY_VERSIONS[0])
