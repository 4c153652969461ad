"""Folder locks (pipeline/folder_lock.py) between real processes: who holds it is named, a
killed holder leaves nothing behind, readers share, a process may ask twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmforge.pipeline.folder_lock import FolderLocked, folder_lock, holds


def hold_in_child(folder: Path, shared: bool) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from lmforge.pipeline.folder_lock import folder_lock
        with folder_lock({str(folder)!r}, "test holder", shared={shared}):
            print("held", flush=True)
            time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    child = hold_in_child(tmp_path, shared=False)
    try:
        with pytest.raises(FolderLocked) as err, folder_lock(tmp_path, "lmforge train"):
            pass
        message = str(err.value)
        assert f"pid={child.pid}" in message and "test holder" in message
        assert "lmforge train cannot take it" in message
        with pytest.raises(FolderLocked), folder_lock(tmp_path, "a reader", shared=True):
            pass
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with folder_lock(tmp_path, "after the kill"):  # the kernel released it with the process
        assert holds(tmp_path)
    assert not holds(tmp_path)


def test_readers_share_and_keep_a_writer_out(tmp_path):
    child = hold_in_child(tmp_path, shared=True)
    try:
        with folder_lock(tmp_path, "second reader", shared=True):
            pass
        # refused at once (LOCK_NB), never waiting for the reader to finish
        with pytest.raises(FolderLocked, match=f"pid={child.pid}"):
            with folder_lock(tmp_path, "prepare"):
                pass
    finally:
        child.kill()
        child.wait()


def test_the_lock_is_reentrant_in_one_process_and_not_inherited(tmp_path):
    with folder_lock(tmp_path, "runner"), folder_lock(tmp_path, "train inside the runner"):
        assert holds(tmp_path)
        # a child process does not inherit it: it is refused like any other process
        proc = subprocess.run([sys.executable, "-c", (
            "from lmforge.pipeline.folder_lock import folder_lock, FolderLocked\n"
            f"try:\n    folder_lock({str(tmp_path)!r}, 'child').__enter__()\n"
            "except FolderLocked:\n    print('refused')\n")], capture_output=True, text=True)
        assert proc.stdout.strip() == "refused", proc.stderr
    assert not holds(tmp_path)
