"""A trainer hands the loader the `DatasetManifest` it read: the loader reads no manifest.json
(the validation loader is built at every evaluation) and streams what the path would give."""

from __future__ import annotations

from shard_fixtures import write_shards

from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader

SHARDS = {"web": {"train": [5, 7], "val": [4, 6]}}


def test_the_manifest_object_streams_what_its_path_gives_without_reading_it(tmp_path):
    shards = write_shards(tmp_path, SHARDS, seq_len=16)
    config = LoaderConfig(return_keys=True, shuffle_buffer=4)
    by_path = [b["keys"] for b in ShardLoader(shards.manifest, "val", 2, config=config,
                                              infinite=False)]
    manifest = DatasetManifest.read(shards.manifest)
    shards.manifest.unlink()  # any re-read would now fail
    for _ in range(2):  # two evaluations, two loaders
        loader = ShardLoader(manifest, "val", 2, config=config, infinite=False)
        assert [b["keys"] for b in loader] == by_path
    assert sorted(k for keys in by_path for k in keys) == sorted(shards.keys("val"))
