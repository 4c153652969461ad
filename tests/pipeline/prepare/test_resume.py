"""Kill `prepare` at different phases, rerun it, and get the uninterrupted result.

The interrupted runs are real processes killed with SIGKILL once a phase has finished some
of its items; the rerun must finish the rest, keep shards that were already written, and
produce exactly the bytes of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.prepare.driver import prepare

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"

RUN = """
import sys
from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.prepare.driver import prepare
corpus, out = sys.argv[1], sys.argv[2]
data = DataConfig(datasets=[DatasetSpec(name="s", paths=[corpus])], output_dir=out, seq_len=64,
                  val_fraction=0.05, read_chunk_bytes=16_000, shard_target_bytes=8192)
prepare(data, TokenizerConfig(vocab_size=400, train_text_bytes=100_000), progress=False,
        executor="local")
"""


def configs(corpus: Path, out: Path) -> tuple[DataConfig, TokenizerConfig]:
    data = DataConfig(datasets=[DatasetSpec(name="s", paths=[str(corpus)])], output_dir=str(out),
                      seq_len=64, val_fraction=0.05, read_chunk_bytes=16_000,
                      shard_target_bytes=8192)
    return data, TokenizerConfig(vocab_size=400, train_text_bytes=100_000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "s.txt"
    path.write_bytes(CORPUS.read_bytes()[:250_000])
    return path


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, tok = configs(corpus, tmp_path_factory.mktemp("reference"))
    return prepare(data, tok, progress=False, executor="local")


def shard_bytes(manifest_path: Path) -> dict[str, bytes]:
    manifest = json.loads(manifest_path.read_text())
    return {s["path"]: (manifest_path.parent / s["path"]).read_bytes()
            for d in manifest["datasets"].values() for split in d["splits"].values()
            for s in split["shards"]}


def kill_when(out: Path, phase: str, count: int, corpus: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(corpus), str(out)], env=env)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob(f"_work/*/done/{phase}/*.json"))) >= count:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize(("phase", "count"), [("clean", 3), ("encode", 2), ("write", 20)])
def test_killed_run_resumes_to_identical_shards(
    phase: str, count: int, corpus: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    kill_when(out, phase, count, corpus)
    # Shards are built in _work/<fp>/dataset/ and moved into `out` once all are written.
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("_work/*/dataset/s/*.tar")}
    if phase == "write":  # the newest marker's shard may not have been renamed yet
        assert len(written) >= count - 1
    data, tok = configs(corpus, out)
    manifest = prepare(data, tok, progress=False, executor="local")
    assert shard_bytes(manifest) == shard_bytes(reference)
    assert not list(out.glob("s/*.tmp*"))
    for name, mtime in written.items():  # finished shards were not rewritten
        assert (out / "s" / name).stat().st_mtime_ns == mtime
    first, again = json.loads(reference.read_text()), json.loads(manifest.read_text())
    assert first["datasets"]["s"]["splits"] == again["datasets"]["s"]["splits"]
    assert first["tokenizer"] == again["tokenizer"]


def test_writing_a_shard_in_small_blocks_gives_the_same_bytes(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmforge.pipeline.prepare import phases

    monkeypatch.setattr(phases, "_WRITE_BLOCK_WINDOWS", 3)
    data, tok = configs(corpus, tmp_path / "blocks")
    data.shard_target_bytes = 100_000  # ~48 windows per shard: many blocks per shard
    data_ref, _ = configs(corpus, tmp_path / "one_block")
    data_ref.shard_target_bytes = 100_000
    monkeypatched = shard_bytes(prepare(data, tok, progress=False, executor="local"))
    monkeypatch.setattr(phases, "_WRITE_BLOCK_WINDOWS", 2048)
    single = shard_bytes(prepare(data_ref, tok, progress=False, executor="local"))
    assert monkeypatched == single and len(single) > 2
