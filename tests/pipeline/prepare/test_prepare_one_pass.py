"""The one-pass path (no dedup, tokenizer given: read, clean and encode in the encoders)
against the multi-pass path (clean, dedup and encode as separate phases), in-process and on
a real local Ray, and strict-mode bad input raised from inside Ray workers with its file and
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.prepare.driver import prepare
from lmforge.pipeline.prepare.readers import BadInputError

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("in")
    paragraphs = [p for p in CORPUS.read_text()[:90_000].split("\n\n") if p.strip()]
    # Distinct paragraphs only: with no duplicates, dedup on or off keeps the same documents.
    unique = list(dict.fromkeys(paragraphs))
    (root / "a.txt").write_text("\n\n".join(unique[:200]) + "\n")
    lines = [json.dumps({"text": t}) for t in unique[200:]]
    lines.insert(7, "{not json")
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    (root / "bad.txt").write_bytes(b"fine\n\nbroken \xc3\x28 utf8\n")
    return {"root": root}


def configs(root: Path, out: Path, **data_kw) -> tuple[DataConfig, TokenizerConfig]:
    data = DataConfig(
        datasets=[DatasetSpec(name="a", paths=[str(root / "a.txt"), str(root / "bad.txt")]),
                  DatasetSpec(name="b", paths=[str(root / "b.jsonl")], txt_unit="line")],
        output_dir=str(out), seq_len=32, val_fraction=0.1, read_chunk_bytes=8192,
        shard_target_bytes=20_000, num_workers=2, **data_kw,
    )
    return data, TokenizerConfig(vocab_size=400, train_text_bytes=60_000)


@pytest.fixture(scope="module")
def multi_pass(inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multi-pass path (dedup on) trains the tokenizer the one-pass runs then reuse."""
    data, tok = configs(inputs["root"], tmp_path_factory.mktemp("multi_pass"))
    return prepare(data, tok, progress=False, executor="local")


def one_pass_configs(inputs: dict, multi_pass: Path, out: Path, **kw):
    data, tok = configs(inputs["root"], out, dedup=False, **kw)
    tok.model_path = str(multi_pass.parent / "tokenizer.model")
    return data, tok


def shards(manifest_path: Path) -> dict[str, bytes]:
    manifest = json.loads(manifest_path.read_text())
    return {s["path"]: (manifest_path.parent / s["path"]).read_bytes()
            for d in manifest["datasets"].values() for split in d["splits"].values()
            for s in split["shards"]}


def check_same_as_multi_pass(one_pass: Path, multi_pass: Path) -> None:
    assert shards(one_pass) == shards(multi_pass) and len(shards(multi_pass)) > 4
    a, b = (json.loads((p.parent / "stats.json").read_text()) for p in (one_pass, multi_pass))
    assert a["datasets"] == b["datasets"]  # read and kept documents and bytes
    assert a["steps"] == b["steps"]
    assert a["bad_input"] == b["bad_input"]
    assert a["bad_input"]["counts"] == {"malformed_json": 1, "invalid_utf8": 1}
    assert "clean+encode" in a["seconds"] and "clean" not in a["seconds"]
    assert b["dedup"]["removed_docs"] == 0


def test_one_pass_in_process_gives_the_multi_pass_shards(
    inputs: dict, multi_pass: Path, tmp_path: Path
) -> None:
    data, tok = one_pass_configs(inputs, multi_pass, tmp_path / "out")
    check_same_as_multi_pass(prepare(data, tok, progress=False, executor="local"), multi_pass)


def test_one_pass_on_ray_gives_the_multi_pass_shards_and_resumes(
    ray_cluster, inputs: dict, multi_pass: Path, tmp_path: Path
) -> None:
    data, tok = one_pass_configs(inputs, multi_pass, tmp_path / "out", keep_work=True)
    manifest = prepare(data, tok, progress=False)
    check_same_as_multi_pass(manifest, multi_pass)
    # Drop the manifest, half the encode markers and every written shard: the rerun redoes
    # only that and gives the same bytes (finished chunks come from their markers, with
    # their clean counts).
    before = shards(manifest)
    manifest.unlink()
    markers = sorted((tmp_path / "out" / "_work").glob("*/done/encode/*.json"))
    for marker in markers[::2]:
        marker.unlink()
    for marker in (tmp_path / "out" / "_work").glob("*/done/write/*.json"):
        marker.unlink()
    again = prepare(data, tok, progress=False)
    assert shards(again) == before
    check_same_as_multi_pass(again, multi_pass)


@pytest.mark.parametrize("dedup", [False, True], ids=["one_pass", "multi_pass"])
def test_strict_mode_error_from_a_ray_worker_names_file_and_line(
    ray_cluster, inputs: dict, multi_pass: Path, tmp_path: Path, dedup: bool
) -> None:
    data, tok = one_pass_configs(inputs, multi_pass, tmp_path / "strict", strict=True)
    data.dedup = dedup
    with pytest.raises(BadInputError, match=r"bad\.txt:3: invalid_utf8.*data\.strict=false"):
        prepare(data, tok, progress=False)
    assert not (tmp_path / "strict" / "manifest.json").exists()
