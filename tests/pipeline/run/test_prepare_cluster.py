"""`prepare` unchanged on an existing two-node Ray cluster (both nodes on this machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.prepare.driver import prepare

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"


def configs(corpus: Path, out: Path, address: str | None) -> tuple[DataConfig, TokenizerConfig]:
    data = DataConfig(datasets=[DatasetSpec(name="s", paths=[str(corpus)])], output_dir=str(out),
                      seq_len=64, val_fraction=0.05, read_chunk_bytes=20_000,
                      shard_target_bytes=50_000, ray_address=address)
    return data, TokenizerConfig(vocab_size=400, train_text_bytes=100_000)


@pytest.mark.slow
def test_two_node_cluster_gives_the_same_shards_as_in_process(tmp_path: Path) -> None:
    corpus = tmp_path / "s.txt"
    corpus.write_bytes(CORPUS.read_bytes()[:150_000])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        data, tok = configs(corpus, tmp_path / "cluster", cluster.address)
        on_cluster = prepare(data, tok, progress=False)
        assert not ray.is_initialized()  # prepare connected, and disconnected afterwards
    finally:
        cluster.shutdown()
    data, tok = configs(corpus, tmp_path / "local", None)
    local = prepare(data, tok, progress=False, executor="local")
    stats = json.loads((on_cluster.parent / "stats.json").read_text())
    assert len(stats["encode_nodes"]) == 2  # encoder actors ran on both nodes
    a, b = json.loads(on_cluster.read_text()), json.loads(local.read_text())
    assert a["datasets"] == b["datasets"] and a["tokenizer"] == b["tokenizer"]
    for split in a["datasets"]["s"]["splits"].values():
        for shard in split["shards"]:
            assert (on_cluster.parent / shard["path"]).read_bytes() == (
                local.parent / shard["path"]).read_bytes()
