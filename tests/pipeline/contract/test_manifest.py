"""DatasetManifest: exact JSON round trips, errors that name the file and key, special ids,
and one shard format shared by the writer and the loader."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

from lmforge.pipeline.config import LoaderConfig
from lmforge.pipeline.contract.dataset_manifest import (
    DatasetInfo,
    DatasetManifest,
    ManifestError,
    ShardInfo,
    SplitInfo,
    TokenizerInfo,
)
from lmforge.pipeline.contract.shard_format import (
    DOC_STARTS_MEMBER,
    MANIFEST_FILE,
    TOKENS_MEMBER,
    sample_key,
    shard_file_name,
    token_dtype,
)
from lmforge.pipeline.loader import shard as loader_shard
from lmforge.pipeline.loader.shard_loader import ShardLoader
from lmforge.pipeline.prepare.shards import ShardWriter


def special(piece: str, id_: int) -> dict:
    return {"piece": piece, "id": id_}


def tokenizer_section(**changes) -> dict:
    section = {
        "file": "tokenizer.model", "sha256": "ab" * 32, "vocab_size": 300, "type": "bpe",
        "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
        "special_tokens": {
            "pad": special("<pad>", 0), "unk": special("<unk>", 1), "bos": special("<s>", 2),
            "eos": special("</s>", 3), "mask": special("<mask>", 4), "sep": special("<sep>", 5),
            "extra": [special("<tool>", 7), special("<call>", 6)],
        },
        "byte_fallback": True,
    }
    return {**section, **changes}


def manifest_dict() -> dict:
    """A manifest in the layout `prepare` writes (key order included)."""
    shard = {"path": "web/train-000000.tar", "samples": 3, "tokens": 25, "bytes": 10240,
             "sha256": "cd" * 32}
    return {
        "version": 1, "seq_len": 8, "token_dtype": "uint16", "tokenizer": tokenizer_section(),
        "datasets": {
            "web": {"weight": 2, "sources": ["/in/a.txt"], "splits": {
                "train": {"samples": 3, "tokens": 25, "padding_tokens": 2, "shards": [shard]},
                "val": {"samples": 0, "tokens": 0, "padding_tokens": 0, "shards": []},
            }},
            "books": {"weight": 0.5, "sources": [], "splits": {}},
        },
        "fingerprint": "f" * 64,
        "stats": {"tokens": {"web": {"train": 25, "val": 0}}, "dedup": {"removed_docs": 1}},
    }


def write_json(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(raw, indent=2) + "\n")
    return path


def test_read_then_write_gives_the_same_bytes(tmp_path: Path) -> None:
    source = write_json(tmp_path / "a", manifest_dict())
    manifest = DatasetManifest.read(tmp_path / "a")  # by folder
    assert manifest.location == str(source)
    assert manifest.datasets["web"].weight == 2 and manifest.datasets["books"].weight == 0.5
    assert manifest.datasets["web"].splits["train"].shards[0].bytes == 10240
    assert [t.piece for t in manifest.tokenizer.extra_special_tokens] == ["<tool>", "<call>"]
    assert list(manifest.tokenizer.special_tokens) == ["pad", "unk", "bos", "eos", "mask", "sep"]
    target = tmp_path / "b" / MANIFEST_FILE
    manifest.write(target)
    assert target.read_bytes() == source.read_bytes()
    assert manifest.location == str(target) and not list(target.parent.glob("*.tmp*"))
    again = DatasetManifest.read(target)  # by file
    assert again == manifest
    assert json.dumps(again.to_dict()) == json.dumps(manifest_dict())  # key order too


def test_a_built_manifest_writes_the_prepare_layout(tmp_path: Path) -> None:
    raw = manifest_dict()
    shards = [ShardInfo(**s) for s in raw["datasets"]["web"]["splits"]["train"]["shards"]]
    built = DatasetManifest(
        seq_len=8, token_dtype="uint16",
        tokenizer=TokenizerInfo.from_dict(tokenizer_section()),
        datasets={
            "web": DatasetInfo(2, ["/in/a.txt"], {"train": SplitInfo(3, 25, 2, shards),
                                                  "val": SplitInfo(0, 0, 0, [])}),
            "books": DatasetInfo(0.5, [], {}),
        },
        fingerprint="f" * 64, stats=raw["stats"],
    )
    built.write(tmp_path)  # an existing folder: manifest.json inside it
    assert (tmp_path / MANIFEST_FILE).read_text() == json.dumps(raw, indent=2) + "\n"


def test_special_ids_and_mask_id() -> None:
    tokenizer = TokenizerInfo.from_dict(tokenizer_section())
    assert tokenizer.mask_id == 4
    assert tokenizer.special_ids() == (0, 1, 2, 3, 4, 5, 6, 7)
    # No mask piece, no pad piece (-1), and a user piece that shares the eos id.
    plain = TokenizerInfo.from_dict(tokenizer_section(
        pad_id=-1, special_tokens={"eos": special("</s>", 3), "sep": special("<sep>", 9),
                                   "extra": [special("<x>", 3)]},
    ))
    assert plain.mask_id is None
    assert plain.special_ids() == (1, 2, 3, 9)


def test_a_hand_written_special_tokens_section_may_leave_out_extra() -> None:
    tokenizer = TokenizerInfo.from_dict(
        tokenizer_section(special_tokens={"mask": special("<mask>", 4)}))
    assert tokenizer.extra_special_tokens == [] and tokenizer.mask_id == 4


def _drop(raw: dict, *keys: str) -> None:
    for key in keys[:-1]:
        raw = raw[key]
    del raw[keys[-1]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(version=2), "manifest version 2, this lmforge reads 1"),
        (lambda m: m.update(token_dtype="int8"), "key 'token_dtype' is 'int8', expected one of"),
        (lambda m: _drop(m, "tokenizer", "eos_id"), "key 'tokenizer.eos_id' is missing"),
        (lambda m: _drop(m, "fingerprint"), "key 'fingerprint' is missing"),
        (lambda m: m.update(seq_len="8"), "key 'seq_len' should be an integer, got '8'"),
        (lambda m: m.update(seq_len=True), "key 'seq_len' should be an integer"),
        (lambda m: m["datasets"]["web"]["splits"]["train"]["shards"][0].update(bytes=1.5),
         r"key 'datasets\.web\.splits\.train\.shards\[0\]\.bytes' should be an integer"),
        (lambda m: m["datasets"]["web"].update(weight="heavy"),
         r"key 'datasets\.web\.weight' should be a number"),
        (lambda m: m["tokenizer"]["special_tokens"].update(mask=4),
         r"key 'tokenizer\.special_tokens\.mask' should be an object"),
        # An empty checksum used to turn verification off (issue 21).
        (lambda m: m["datasets"]["web"]["splits"]["train"]["shards"][0].update(sha256=""),
         r"key 'datasets\.web\.splits\.train\.shards\[0\]\.sha256' is empty"),
        (lambda m: m["tokenizer"].update(sha256=" "), r"key 'tokenizer\.sha256' is empty"),
    ],
)
def test_bad_manifests_name_the_file_and_the_key(tmp_path: Path, change, message: str) -> None:
    raw = copy.deepcopy(manifest_dict())
    change(raw)
    path = write_json(tmp_path, raw)
    with pytest.raises(ManifestError, match=message) as err:
        DatasetManifest.read(path)
    assert str(err.value).startswith(f"{path}: ")
    assert str(err.value).endswith("run `lmforge prepare` again")


def test_missing_or_unparsable_manifest_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest here; run `lmforge prepare` first"):
        DatasetManifest.read(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"version": 1,')
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON .*prepare` again"):
        DatasetManifest.read(tmp_path / MANIFEST_FILE)
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="the top level should be an object"):
        DatasetManifest.read(tmp_path)
    assert issubclass(ManifestError, ValueError)


def test_folder_and_tokenizer_path_for_local_paths_and_urls(tmp_path: Path) -> None:
    local = DatasetManifest.read(write_json(tmp_path / "d", manifest_dict()))
    assert local.folder == str(tmp_path / "d")
    assert local.tokenizer_path == f"{tmp_path / 'd'}/tokenizer.model"
    assert DatasetManifest.path_in(tmp_path / "d") == tmp_path / "d" / MANIFEST_FILE
    memory = fsspec.filesystem("memory")
    folder = f"/manifest-{tmp_path.name}"
    memory.pipe(f"{folder}/{MANIFEST_FILE}", json.dumps(manifest_dict()).encode())
    try:
        remote = DatasetManifest.read(f"memory://{folder}/")
        assert remote.location == f"memory://{folder}/{MANIFEST_FILE}"
        assert remote.folder == f"memory://{folder}"
        assert remote.tokenizer_path == f"memory://{folder}/tokenizer.model"
        assert remote.datasets == local.datasets
    finally:
        memory.rm(folder, recursive=True)


def test_the_loader_reads_what_the_writer_writes(tmp_path: Path) -> None:
    # The loader finds members by the suffixes the writer names them with.
    assert loader_shard.TOKENS == f".{TOKENS_MEMBER}".encode()
    assert loader_shard.DOC_STARTS == f".{DOC_STARTS_MEMBER}".encode()
    seq_len, vocab = 8, 70_000  # a vocabulary past 16 bits: uint32 tokens
    dtype = token_dtype(vocab)
    rng = np.random.default_rng(0)
    samples = rng.integers(4, vocab, (5, seq_len + 1)).astype(dtype)
    starts = [np.array([0], np.int32), np.array([0, 3], np.int32)] * 2 + [np.zeros(1, np.int32)]
    writer = ShardWriter(tmp_path / "web" / shard_file_name("train", 0), tmp_path)
    writer.write([sample_key("web", "train", 0, i) for i in range(5)], samples, starts, 45)
    shard = writer.close()
    assert shard.path == "web/train-000000.tar"
    (tmp_path / "tokenizer.model").write_bytes(b"the tokenizer")
    manifest = DatasetManifest(
        seq_len=seq_len, token_dtype=dtype,
        tokenizer=TokenizerInfo.from_dict(tokenizer_section(
            vocab_size=vocab, sha256=hashlib.sha256(b"the tokenizer").hexdigest())),
        datasets={"web": DatasetInfo(1.0, [], {"train": SplitInfo(5, 45, 0, [shard])})},
        fingerprint="", stats={},
    )
    manifest.write(DatasetManifest.path_in(tmp_path))
    config = LoaderConfig(shuffle=False, return_keys=True, verify_checksums=True)
    loader = ShardLoader(tmp_path, "train", 5, config=config, infinite=False)
    batch = next(iter(loader))
    assert batch["keys"] == [sample_key("web", "train", 0, i) for i in range(5)]
    assert batch["input_ids"].tolist() == samples[:, :-1].astype(np.int64).tolist()
    assert batch["segment_ids"][1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_training_refuses_a_tokenizer_that_is_not_the_recorded_one(tmp_path: Path) -> None:
    # The manifest's tokenizer sha256 was recorded but never checked (issue 21): tokens
    # encoded with one tokenizer were trained and exported with another.
    test_the_loader_reads_what_the_writer_writes(tmp_path)
    config = LoaderConfig(shuffle=False, verify_checksums=True)
    (tmp_path / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(ManifestError, match=r"tokenizer\.model: sha256 [0-9a-f]{12}… is not "
                       r"the [0-9a-f]{12}… .*manifest\.json records.*prepare` again"):
        ShardLoader(tmp_path, "train", 5, config=config, infinite=False)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer\.model: cannot read"):
        ShardLoader(tmp_path, "train", 5, config=config, infinite=False)
    # A shard entry without a checksum is an error when verifying, not a skipped check.
    manifest = DatasetManifest.read(tmp_path)
    url = f"{manifest.folder}/web/train-000000.tar"
    with pytest.raises(loader_shard.ShardError, match="records no sha256"):
        loader_shard.ShardReader(url, 5, 8, manifest.token_dtype, sha256="", verify=True)
