"""Checkpoints that cannot execute code, a `latest` pointer that cannot mislead a resume,
and a full disk during a save that loses nothing (issue 14: items 1, 4 and 6); checkpoints
that survive a crash of the machine: fsynced, hashed, checked on resume, with a fallback
(issue 21: item 6, and the FIFO / symlink / empty-marker inputs of item 7)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import finish, shard_fixtures, train

from lmforge.launch.rundir import RunDir, TrainSummary
from lmforge.launch.train import checkpoint as ckpt
from lmforge.launch.train.errors import CheckpointError, UnsafeCheckpointError
from lmforge.launch.train.integrity import write_sealed
from lmforge.launch.train.resume import resume_point
from lmforge.launch.train.safe_load import load_weights_only, weights_only_loads


class Payload:
    """Unpickling this runs `touch TARGET`: what a planted checkpoint file would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def plant(path: Path, target: Path) -> None:
    """Replaces a checkpoint file by a pickle payload (and keeps its listed size honest, as
    an attacker with write access to the folder would)."""
    torch.save({"module": Payload(target)}, path)
    marker = path.parent / ckpt.COMPLETE
    info = json.loads(marker.read_text())
    info["files"][path.name] = path.stat().st_size
    marker.write_text(json.dumps(info))


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * (100 + step))
    if complete:
        files = {"mp_rank_00_model_states.pt": 100 + step}
        (folder / ckpt.COMPLETE).write_text(json.dumps({"step": step, "files": files}))
    return folder


def sealed_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint as saves write it now: every file with its size and xxh3-64 hash."""
    folder = root / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    files = {name: write_sealed(folder / name, lambda f: torch.save(
        {"w": torch.full((4096,), float(step))}, f))
        for name in ("mp_rank_00_model_states.pt", "rank00000.pt")}
    (folder / ckpt.COMPLETE).write_text(json.dumps({"step": step, "world_size": 1,
                                                    "files": files}))
    (root / ckpt.LATEST).write_text(folder.name)
    return folder


# -- the latest pointer and the COMPLETE marker --------------------------------------


@pytest.mark.parametrize("content,problem", [
    (b"step_00000009", "points at step_00000009, which does not exist"),
    (b"../../etc", "not a checkpoint tag"),
    (b"/tmp/step_00000002", "not a checkpoint tag"),
    (b"\xff\xfe\x00garbage", "is not text"),
    (b"step_00000003", "points at step_00000003, which is incomplete: no COMPLETE marker"),
])
def test_a_bad_latest_falls_back_to_the_newest_complete_checkpoint_with_a_warning(
    tmp_path, caplog, content, problem
):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 1)
    newest = fake_checkpoint(root, 2)
    fake_checkpoint(root, 3, complete=False)
    (root / ckpt.LATEST).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="lmforge.train"):
        assert ckpt.find_resume(root, "auto") == newest
    assert problem in caplog.text and "resuming from step_00000002 instead" in caplog.text


def test_a_file_of_the_wrong_size_makes_a_checkpoint_incomplete(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    older = fake_checkpoint(root, 1)
    newest = fake_checkpoint(root, 2)
    (root / ckpt.LATEST).write_text(newest.name)
    (newest / "mp_rank_00_model_states.pt").write_bytes(b"short")  # truncated by a crash
    with caplog.at_level(logging.WARNING, logger="lmforge.train"):
        assert ckpt.find_resume(root, "auto") == older
    assert "mp_rank_00_model_states.pt has 5 bytes, COMPLETE lists 102" in caplog.text
    with pytest.raises(FileNotFoundError, match="has 5 bytes, COMPLETE lists 102"):
        ckpt.find_resume(root, str(newest))


def test_checkpoints_without_a_complete_one_are_an_error_unless_resume_none(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 4, complete=False)
    with pytest.raises(CheckpointError, match=r"1 checkpoint folder\(s\) but none is complete "
                       r"\(step_00000004: no COMPLETE marker.*--resume none"):
        ckpt.find_resume(root, "auto")
    assert ckpt.find_resume(root, "none") is None
    assert ckpt.find_resume(tmp_path / "nothing-yet", "auto") is None  # a first run


@pytest.mark.parametrize("damage", ["zero-filled", "one byte changed"])
def test_a_damaged_file_of_the_right_size_is_found_by_its_hash(tmp_path, caplog, damage):
    """Issue 21: a file a crash left zero-filled (XFS) passed the size check, and its load
    failed on every requeue; a changed byte inside a tensor even loaded silently."""
    root = tmp_path / "checkpoints"
    older = sealed_checkpoint(root, 1)
    newest = sealed_checkpoint(root, 2)
    path = newest / "mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    if damage == "zero-filled":
        data = bytearray(len(data))
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert ckpt.find_resume(root, "auto") == newest  # the size check alone trusts it
    with caplog.at_level(logging.WARNING, logger="lmforge.train"):
        assert resume_point(root, "auto") == older
    assert f"{path} does not match its hash in step_00000002/COMPLETE" in caplog.text
    with pytest.raises(CheckpointError, match=f"--resume {newest}: {path} does not match"):
        resume_point(root, str(newest))
    assert resume_point(root, str(older)) == older
    path.unlink()
    (older / "rank00000.pt").write_bytes(b"\0" * (older / "rank00000.pt").stat().st_size)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint is intact "
                       r"\(step_00000001 failed"):
        resume_point(root, "auto")


@pytest.mark.parametrize("marker,problem", [
    ("{}", "lists no files"), ('{"files": {}}', "lists no files"), ("[]", "lists no files"),
    ('{"files": ["a"]}', "lists no files"), ('{"files": {"../../x": 3}}', "outside the folder"),
    ('{"files": {"a": {"size": 3}}}', "no size and hash for 'a'"),
])
def test_a_complete_marker_listing_no_files_is_not_complete(tmp_path, caplog, marker, problem):
    """Issue 21: a COMPLETE of `{}` counted as complete."""
    root = tmp_path / "checkpoints"
    older = fake_checkpoint(root, 1)
    newest = fake_checkpoint(root, 2)
    (newest / ckpt.COMPLETE).write_text(marker)
    (root / ckpt.LATEST).write_text(newest.name)
    assert problem in ckpt.incomplete_reason(newest)
    with caplog.at_level(logging.WARNING, logger="lmforge.train"):
        assert ckpt.find_resume(root, "auto") == older
    assert problem in caplog.text


def _resume_within(root: Path, seconds: float) -> Path | None:
    found: list = []
    worker = threading.Thread(target=lambda: found.append(ckpt.find_resume(root, "auto")),
                              daemon=True)  # a blocked open must not hold the test run
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "--resume auto blocked"
    return found[0]


def test_a_fifo_never_blocks_resume_auto(tmp_path, caplog):
    """Issue 21: a FIFO as `checkpoints/latest` blocked `--resume auto` for ever."""
    root = tmp_path / "checkpoints"
    older = fake_checkpoint(root, 1)
    newest = fake_checkpoint(root, 2)
    os.mkfifo(root / ckpt.LATEST)
    with caplog.at_level(logging.WARNING, logger="lmforge.train"):
        assert _resume_within(root, 10) == newest
    assert "latest cannot be read" in caplog.text and "is not a regular file" in caplog.text
    (newest / ckpt.COMPLETE).unlink()
    os.mkfifo(newest / ckpt.COMPLETE)  # nor as a marker or a listed file
    assert _resume_within(root, 10) == older
    (older / "mp_rank_00_model_states.pt").unlink()
    os.mkfifo(older / "mp_rank_00_model_states.pt")
    assert ckpt.incomplete_reason(older) == "mp_rank_00_model_states.pt is not a regular file"


def test_a_symlinked_step_folder_is_never_resumed_from(tmp_path, caplog):
    """Issue 21: `latest` (or the newest-complete fallback) followed a symlinked `step_*`
    out of `checkpoints/`."""
    root = tmp_path / "checkpoints"
    real = fake_checkpoint(root, 1)
    outside = fake_checkpoint(tmp_path / "elsewhere", 9)
    link = root / "step_00000009"
    link.symlink_to(outside)
    (root / ckpt.LATEST).write_text(link.name)
    with caplog.at_level(logging.WARNING, logger="lmforge.train"):
        assert ckpt.find_resume(root, "auto") == real
    assert "points at step_00000009, which is incomplete: it is a symbolic link" in caplog.text
    (root / ckpt.LATEST).unlink()
    assert ckpt.complete_checkpoints(root) == [real]
    with pytest.raises(FileNotFoundError, match="symbolic link"):
        ckpt.find_resume(root, str(link))


SPY_ON_A_SAVE = """
import json, os, socket, sys
from pathlib import Path
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ["MASTER_PORT"] = str(s.getsockname()[1])
import deepspeed, torch
from lmforge.launch.train import checkpoint as ckpt
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
model = torch.nn.Linear(8, 8)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                  config={"train_batch_size": 1, "zero_optimization": {"stage": 2}})
events, fsync, replace = [], os.fsync, os.replace
os.fsync = lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))
os.replace = lambda a, b: (events.append(("rename", str(b))), replace(a, b))
ckpt.save_checkpoint(engine, Path(sys.argv[1]), 1, {}, keep=1)
print("EVENTS " + json.dumps(events))
"""


@pytest.mark.slow
def test_a_save_fsyncs_every_file_and_the_folder_before_complete(tmp_path):
    """Issue 21: DeepSpeed's files and the RNG files were never fsynced, yet the fsynced
    COMPLETE and `latest` vouched for them (a power cut could leave them empty)."""
    root = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", SPY_ON_A_SAVE, str(root)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [tuple(e) for e in json.loads(proc.stdout.split("EVENTS ")[-1])]
    folder = root / "step_00000001"
    complete = events.index(("rename", str(folder / ckpt.COMPLETE)))
    synced = {path for kind, path in events[:complete] if kind == "fsync"}
    listed = json.loads((folder / ckpt.COMPLETE).read_text())["files"]
    assert {"mp_rank_00_model_states.pt", "rank00000.pt"} <= set(listed)
    assert {str(folder / name) for name in listed} | {str(folder)} <= synced
    assert all(len(entry["xxh3_64"]) == 16 for entry in listed.values())
    assert resume_point(root, "auto") == folder


def test_the_train_summary_is_replaced_never_rewritten_in_place(tmp_path):
    """Issue 21: train_summary.json was written in place (a crash could leave it empty)."""
    run = RunDir.of(tmp_path)
    run.write_train_summary(TrainSummary(step=1))
    before = tmp_path / "before.json"
    os.link(run.train_summary, before)  # an in-place write would change this inode too
    run.write_train_summary(TrainSummary(step=2))
    assert json.loads(before.read_text())["step"] == 1
    assert run.read_train_summary().step == 2


# -- weights-only loading ------------------------------------------------------------


def test_pruning_touches_only_the_step_folders_saves_create(tmp_path):
    """Issue 21: pruning deleted every folder without COMPLETE that sorts before `step_`
    (`best/`, `Backup/`, `hf_export/`) and counted a symlinked `step_*` as a checkpoint."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    fake_checkpoint(root, 5, complete=False)  # a crash's leftover: pruned
    for name in ("best", "Backup", "hf_export", "notes", "step_final"):
        (root / name).mkdir()
        (root / name / "weights.pt").write_bytes(b"mine")
    outside = tmp_path / "elsewhere"
    fake_checkpoint(outside, 1)  # complete, older than every real one
    fake_checkpoint(outside, 3, complete=False)  # partial, older than the current save
    (root / "step_00000001").symlink_to(outside / "step_00000001")
    (root / "step_00000003").symlink_to(outside / "step_00000003")
    ckpt._prune(root, keep=2, current="step_00000006")
    assert sorted(p.name for p in root.iterdir()) == [
        "Backup", "best", "hf_export", "notes", "step_00000001", "step_00000003",
        "step_00000004", "step_00000006", "step_final"]
    for name in ("best", "Backup", "hf_export", "notes", "step_final"):
        assert (root / name / "weights.pt").read_bytes() == b"mine"
    assert (root / "step_00000001").is_symlink() and (root / "step_00000003").is_symlink()
    assert (outside / "step_00000001" / ckpt.COMPLETE).is_file()
    assert (outside / "step_00000003" / "mp_rank_00_model_states.pt").is_file()


def test_a_planted_payload_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "rank00000.pt"
    torch.save({"python": Payload(target)}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"^{path}: refused to load.*posix.system"):
        load_weights_only(path)
    with weights_only_loads(), pytest.raises(UnsafeCheckpointError, match=str(path)):
        torch.load(path, weights_only=False)  # what DeepSpeed's readers call
    assert not target.exists()
    torch.save({"w": torch.ones(2)}, path)  # tensors and plain data still load
    assert torch.equal(load_weights_only(path)["w"], torch.ones(2))


CONFIG = """\
name: safety
data:
  datasets: [{{name: d, paths: [unused.txt]}}]
  output_dir: {data}
  seq_len: 16
tokenizer: {{vocab_size: 1000}}
model: {{preset: tiny, n_layers: 1, d_model: 32, n_heads: 2, n_kv_heads: 1, d_ff: 64}}
train: {{micro_batch_size: 2, max_steps: 4, checkpoint_every: 2, eval_every: 0,
         eval_batches: 1, log_every: 1, warmup_steps: 1, precision: fp32}}
deepspeed: {{zero_stage: 2}}
tracking: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 4-step ZeRO-2 run (checkpoints at steps 2 and 4); copy it before changing."""
    tmp = tmp_path_factory.mktemp("safety")
    shard_fixtures().write_shards(tmp / "data", {"d": {"train": [32], "val": [8]}}, seq_len=16)
    config = tmp / "safety.yaml"
    config.write_text(CONFIG.format(data=tmp / "data"))
    finish(train(config, tmp / "run"))
    return config, tmp / "run"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.launch.cli", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "rank00001.pt"])
def test_resume_export_and_sample_refuse_a_planted_payload(trained, tmp_path, name):
    config, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step4 = copy / "checkpoints" / "step_00000004"
    target = tmp_path / "pwned"
    planted = step4 / name
    plant(planted, target)
    commands = [["train", str(config), f"--run_dir={copy}", "--train.max_steps=6",
                 "--resume", "auto"]]
    if name != "rank00001.pt":  # export and sample read the weights, not the RNG files
        commands += [["export", str(config), f"--run_dir={copy}"],
                     ["generate", str(config), f"--run_dir={copy}"]]
    for command in commands:
        proc = _cli(*command)
        assert proc.returncode != 0, command
        assert f"{planted}: refused to load" in proc.stdout + proc.stderr, command
    assert not target.exists()


@pytest.mark.slow
def test_a_save_never_writes_through_a_symlinked_step_folder(trained, tmp_path):
    config, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    link = copy / "checkpoints" / "step_00000006"
    link.symlink_to(outside)
    proc = _cli("train", str(config), f"--run_dir={copy}", "--train.max_steps=6",
                "--resume", "auto")
    assert proc.returncode != 0
    assert f"{link} is a symbolic link" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert link.is_symlink() and sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_a_damaged_checkpoint_is_skipped_by_resume_auto_and_refused_by_name(trained, tmp_path):
    """Issue 21: a file left zero-filled by a crash (right size) failed every requeue with an
    uncaught error instead of resuming from the previous checkpoint."""
    config, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step4 = copy / "checkpoints" / "step_00000004"
    damaged = step4 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's own file
    damaged.write_bytes(b"\0" * damaged.stat().st_size)
    proc = _cli("train", str(config), f"--run_dir={copy}", "--resume", str(step4))
    assert proc.returncode != 0
    assert f"--resume {step4}: {damaged} does not match its hash" in proc.stdout + proc.stderr
    proc = _cli("train", str(config), f"--run_dir={copy}", "--train.max_steps=6",
                "--resume", "auto")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"step_00000004: skipping this checkpoint: {damaged}" in out
    assert "step_00000002 at step 2" in out  # "resumed from …/step_00000002 at step 2"


@pytest.mark.slow
def test_a_checkpoint_that_fails_to_load_falls_back_under_resume_auto(trained, tmp_path):
    """A file whose hash matches but that torch cannot read (a marker rewritten with it):
    rank 1 fails, rank 0 loads; both move to the previous checkpoint together."""
    config, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step4 = copy / "checkpoints" / "step_00000004"
    garbage = step4 / "rank00001.pt"
    garbage.write_bytes(b"not a torch file")
    marker = json.loads((step4 / ckpt.COMPLETE).read_text())
    marker["files"][garbage.name] = write_sealed(garbage, lambda f: f.write(b"not a torch file"))
    (step4 / ckpt.COMPLETE).write_text(json.dumps(marker))
    proc = _cli("train", str(config), f"--run_dir={copy}", "--train.max_steps=6",
                "--resume", "auto")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"step_00000004: skipping this checkpoint: {garbage}: cannot be read" in out
    assert "step_00000002 at step 2" in out


def _small_fs(where: Path, size_kib: int) -> Path:
    where.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                           str(where)], capture_output=True, text=True)
    assert proc.returncode == 0, f"cannot mount a tmpfs at {where}: {proc.stderr} (needs root)"
    return where


@pytest.mark.slow
def test_a_full_disk_during_a_save_stops_every_rank_and_keeps_the_last_checkpoint(
    trained, tmp_path
):
    config, run = trained
    one = sum(f.stat().st_size for f in (run / "checkpoints" / "step_00000002").iterdir())
    # Room for one checkpoint and a half: the save at step 2 fits, the one at step 4 cannot.
    fs = _small_fs(tmp_path / "fs", size_kib=int(one * 1.5) // 1024 + 64)
    try:
        started = time.monotonic()
        proc = _cli("train", str(config), f"--run_dir={fs / 'run'}")
        elapsed = time.monotonic() - started
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "saving the checkpoint failed on rank" in out and "MiB free" in out, out[-3000:]
        assert "the previous checkpoint step_00000002 is intact" in out
        assert elapsed < 120, f"ranks took {elapsed:.0f} s to stop"  # a whole run is ~20 s
        checkpoints = fs / "run" / "checkpoints"
        assert ckpt.incomplete_reason(checkpoints / "step_00000002") is None
        assert (checkpoints / ckpt.LATEST).read_text() == "step_00000002"
        assert ckpt.find_resume(checkpoints, "auto") == checkpoints / "step_00000002"
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_payload_class_is_really_a_payload(tmp_path):
    # The guard above is only meaningful if the planted file does run code when trusted.
    target = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(target)))
    assert target.exists()
