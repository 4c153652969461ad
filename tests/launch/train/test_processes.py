"""The local launcher's supervision rules on plain processes (no training): which exit
statuses end the run, what becomes of the other ranks, with pidfds and without them.

The same rules through real DeepSpeed ranks: test_engine.py (a rank SIGKILLed, SIGUSR1 to
rank 0, SIGTERM to and SIGKILL of the launcher)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lmforge.launch.train import processes
from lmforge.launch.train.exit_codes import REQUEUE_EXIT_CODE


def _rank(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


EXITS = "import sys, time; time.sleep({delay}); sys.exit({status})"
RUNS_ON = "import time; time.sleep(120)"


@pytest.fixture(params=["pidfd", "polling"])
def wait_mode(request, monkeypatch):
    """Both ways the launcher waits: pidfds (Linux), and polling where there are none."""
    if request.param == "polling":
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    return request.param


@pytest.mark.parametrize("ends,expected", [  # (seconds, exit status) of each rank
    (((0, 0), (0, 0)), 0),
    (((0, REQUEUE_EXIT_CODE), (0, REQUEUE_EXIT_CODE)), REQUEUE_EXIT_CODE),
    (((0, 0), (0, REQUEUE_EXIT_CODE)), REQUEUE_EXIT_CODE),
    (((0, REQUEUE_EXIT_CODE), (0.3, 0)), REQUEUE_EXIT_CODE),  # 75 does not stop the others
])
def test_the_run_status_from_ranks_that_all_end(wait_mode, tmp_path, ends, expected):
    ranks = [_rank(EXITS.format(delay=delay, status=status)) for delay, status in ends]
    assert processes._supervise(ranks, tmp_path / "train_summary.json") == expected
    assert [p.returncode for p in ranks] == [status for _, status in ends]


def test_a_failed_rank_stops_the_others_and_fails_the_run(wait_mode, tmp_path):
    ranks = [_rank(RUNS_ON), _rank(EXITS.format(delay=0.2, status=3)), _rank(RUNS_ON)]
    started = time.monotonic()
    assert processes._supervise(ranks, tmp_path / "train_summary.json") == 1
    assert time.monotonic() - started < 30  # SIGTERM ended them, no grace period waited out
    assert [p.returncode for p in ranks] == [-15, 3, -15]


def test_a_killed_rank_after_a_preempted_summary_still_asks_for_a_resume(tmp_path):
    summary = tmp_path / "train_summary.json"
    summary.write_text('{"preempted": true}')
    ranks = [_rank(EXITS.format(delay=0, status=REQUEUE_EXIT_CODE)),
             _rank("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")]
    assert processes._supervise(ranks, summary) == REQUEUE_EXIT_CODE
