"""ShardLoader on bad shards (strict and lenient) and on fsspec URLs."""

from __future__ import annotations

import itertools
import logging

import fsspec
import pytest
from shard_fixtures import write_shards

from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardError, ShardLoader

SHARDS = {"web": {"train": [5, 7, 3, 9], "val": [4, 6, 3]}}  # 24 train, 13 val


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path, SHARDS, seq_len=8)


def make(shards, split="train", batch=2, rank=0, world=1, **config) -> ShardLoader:
    cfg = LoaderConfig(return_keys=True, shuffle_buffer=6, **config)
    return ShardLoader(shards.manifest, split, batch, rank=rank, world_size=world,
                       config=cfg, infinite=split == "train")


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def scramble(path) -> None:
    data = bytearray(path.read_bytes())
    data[1536:1600] = b"\xff" * 64  # lands in a tar header or an .npy header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, scramble, lambda p: p.unlink()])
@pytest.mark.parametrize("workers", [0, 2])
def test_strict_mode_raises_naming_the_shard(shards, damage, workers):
    bad = shards.shards["web/train"][1]
    damage(bad)
    with pytest.raises(ShardError, match=f"shard {bad}.*data.loader.strict=false"):
        list(itertools.islice(make(shards, num_workers=workers), 12))


def test_lenient_mode_skips_warns_counts_and_keeps_ranks_in_step(shards, caplog):
    bad = shards.shards["web/train"][1]
    truncate(bad)
    bad_keys = {k for k in shards.keys("train") if k.startswith("web-train-000001-")}
    caplog.set_level(logging.WARNING, logger="lmforge.pipeline.loader.shard_loader")
    loaders = [make(shards, rank=r, world=2, strict=False, num_workers=2) for r in range(2)]
    rows = [[k for b in itertools.islice(ldr, 6) for k in b["keys"]] for ldr in loaders]
    assert len(rows[0]) == len(rows[1]) == 12  # one epoch of 24 positions over 2 ranks
    seen = set(rows[0] + rows[1])
    assert not seen & bad_keys
    assert seen == shards.keys("train") - bad_keys  # substitutes repeat samples, lose none
    assert sum(ldr.skipped_samples for ldr in loaders) == len(bad_keys)
    for ldr in loaders:
        assert list(ldr.bad_shards) == [str(bad)]
    assert str(bad) in caplog.text and "skipping unreadable shard" in caplog.text


def test_lenient_resume_replays_the_same_substitutes(shards):
    truncate(shards.shards["web/train"][3])  # 9 of 24 samples, more than a window of 6
    whole = make(shards, strict=False)
    full = [b["keys"] for b in itertools.islice(whole, 20)]
    first = make(shards, strict=False)
    head = [b["keys"] for b in itertools.islice(first, 7)]
    resumed = make(shards, strict=False, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    assert head + [b["keys"] for b in itertools.islice(resumed, 13)] == full
    assert first.skipped_samples + resumed.skipped_samples == whole.skipped_samples >= 9


def test_a_malformed_sample_is_skipped_alone(shards):
    path = shards.shards["web/train"][2]  # 3 samples
    key = "web-train-000002-00000001"
    data = bytearray(path.read_bytes())
    starts = shards.doc_starts[key]
    payload = data.index(b"\x93NUMPY", data.index(f"{key}.doc_starts.npy".encode()))
    data[payload + 128 : payload + 132] = (7).to_bytes(4, "little")  # doc_starts[0] = 7
    path.write_bytes(bytes(data))
    assert starts[0] == 0
    # Without checksums (on by default, they would refuse the whole shard) the sample's own
    # check still catches it, which is what a shard written bad with a matching sha256 meets.
    with pytest.raises(ShardError, match=f"sample {key} doc_starts must ascend from 0"):
        list(itertools.islice(make(shards, verify_checksums=False), 12))
    loader = make(shards, strict=False, verify_checksums=False)
    seen = {k for b in itertools.islice(loader, 12) for k in b["keys"]}
    assert seen == shards.keys("train") - {key}
    assert loader.skipped_samples == 1 and list(loader.bad_shards) == [str(path)]


def test_lenient_validation_masks_the_bad_shard_and_stays_even(shards):
    bad = shards.shards["web/val"][0]
    bad.unlink()
    loaders = [make(shards, "val", 2, r, 2, strict=False) for r in range(2)]
    batches = [list(ldr) for ldr in loaders]
    assert len(batches[0]) == len(batches[1]) == 4
    keys = [k for ranks in batches for b in ranks for k in b["keys"] if k]
    assert sorted(keys) == sorted(k for k in shards.keys("val") if "-000000-" not in k)
    masked = sum(int((b["labels"] == -100).all(dim=1).sum()) for r in batches for b in r)
    assert masked == 4 + 3  # the 4 samples of the missing shard + 3 padding rows


def test_checksum_mismatch_is_caught_by_default_on_first_read(shards):
    path = shards.shards["web/train"][0]
    data = bytearray(path.read_bytes())
    data[-2000] ^= 1  # flips a token bit: the tar structure stays valid
    path.write_bytes(bytes(data))
    list(itertools.islice(make(shards, shuffle=False, verify_checksums=False), 3))
    with pytest.raises(ShardError, match="sha256 does not match"):
        list(itertools.islice(make(shards, shuffle=False), 3))  # verify_checksums: default on


def test_fsspec_url_streams_the_same_batches(shards, tmp_path):
    memory = fsspec.filesystem("memory")  # process-global: use a folder of our own
    folder = f"/loader-{tmp_path.name}"
    for path in tmp_path.rglob("*"):
        if path.is_file():
            memory.pipe(f"{folder}/{path.relative_to(tmp_path)}", path.read_bytes())
    cfg = LoaderConfig(return_keys=True, shuffle_buffer=6, num_workers=0)
    remote = ShardLoader(f"memory://{folder}", "train", 3, config=cfg)
    local = ShardLoader(shards.manifest, "train", 3, config=cfg)
    for a, b in zip(itertools.islice(remote, 10), itertools.islice(local, 10), strict=True):
        assert a["keys"] == b["keys"]
        assert a["input_ids"].equal(b["input_ids"]) and a["labels"].equal(b["labels"])
    memory.rm(folder, recursive=True)


def test_missing_manifest_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="no manifest here; run `lmforge prepare`"):
        ShardLoader(tmp_path, "train", 2)
