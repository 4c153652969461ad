"""`prepare` in-process (LocalExecutor): several datasets and formats, dedup across
datasets, bad input reported in stats, plots, a reused tokenizer, and config changes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import webdataset as wds

from lmforge.pipeline.config import DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.prepare.driver import prepare

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("in")
    paragraphs = [p for p in CORPUS.read_text()[:80_000].split("\n\n") if p.strip()]
    books = paragraphs[:300]
    web = paragraphs[300:500] + books[:10]  # 10 documents also in "books": removed by dedup
    (root / "books").mkdir()
    (root / "books" / "a.txt").write_text("\n\n".join(books[:150]) + "\n")
    (root / "books" / "b.txt.gz").write_bytes(gzip.compress("\n\n".join(books[150:]).encode()))
    (root / "books" / "empty.txt").write_text("")
    lines = [json.dumps({"text": t}) for t in web[:100]]
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"body": "no text field"}))
    (root / "web.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": web[100:]}), root / "web.parquet", row_group_size=40)
    (root / "bad.txt").write_bytes(b"ok doc\n\nbroken \xc3\x28 utf8\n")
    return {"root": root, "books": books, "web": web}


def configs(inputs: dict, out: Path, **data_kw) -> tuple[DataConfig, TokenizerConfig]:
    root = inputs["root"]
    data = DataConfig(
        datasets=[
            DatasetSpec(name="books", paths=[str(root / "books" / "*"), str(root / "bad.txt")],
                        weight=3.0),
            DatasetSpec(name="web", paths=[str(root / "web.*")], weight=1.0, txt_unit="line"),
        ],
        output_dir=str(out), seq_len=32, val_fraction=0.1, read_chunk_bytes=8192,
        shard_target_bytes=20_000, **data_kw,
    )
    return data, TokenizerConfig(vocab_size=400, train_text_bytes=50_000)


def decode(manifest_path: Path, dataset: str) -> list[str]:
    manifest = json.loads(manifest_path.read_text())
    sp = spm.SentencePieceProcessor(model_file=str(manifest_path.parent / "tokenizer.model"))
    docs = []
    for split in ("train", "val"):
        urls = [str(manifest_path.parent / s["path"])
                for s in manifest["datasets"][dataset]["splits"][split]["shards"]]
        stream = np.concatenate([s["tokens.npy"] for s in
                                 wds.WebDataset(urls, shardshuffle=False).decode()])
        stream = stream[stream != manifest["tokenizer"]["pad_id"]]
        ends = np.flatnonzero(stream == manifest["tokenizer"]["eos_id"])
        docs += [sp.decode(d[:-1].tolist()) for d in np.split(stream, ends + 1)[:-1]]
    return docs


@pytest.fixture(scope="module")
def prepared(inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, tok = configs(inputs, tmp_path_factory.mktemp("out"))
    return prepare(data, tok, progress=False, executor="local")


def test_datasets_weights_and_dedup_across_datasets(prepared: Path, inputs: dict) -> None:
    manifest = json.loads(prepared.read_text())
    assert {n: d["weight"] for n, d in manifest["datasets"].items()} == {"books": 3.0, "web": 1.0}
    assert len(manifest["datasets"]["books"]["sources"]) == 4
    books = decode(prepared, "books")
    web = decode(prepared, "web")
    assert sorted(books) == sorted(inputs["books"] + ["ok doc"])
    assert sorted(web) == sorted(inputs["web"][:200])  # the 10 copies of books are gone
    stats = json.loads((prepared.parent / "stats.json").read_text())
    assert stats["dedup"]["removed_docs"] == 10
    assert stats["datasets"]["web"]["clean_docs"] == 210


def test_the_prepared_manifest_reads_back_and_writes_the_same_bytes(
    prepared: Path, tmp_path: Path
) -> None:
    manifest = DatasetManifest.read(prepared)
    raw = json.loads(prepared.read_text())
    assert manifest.fingerprint == raw["fingerprint"] and manifest.seq_len == 32
    assert manifest.tokenizer_path == str(prepared.parent / "tokenizer.model")
    assert manifest.tokenizer.mask_id == raw["tokenizer"]["special_tokens"]["mask"]["id"] == 4
    assert manifest.tokenizer.special_ids() == (0, 1, 2, 3, 4, 5)
    books = manifest.datasets["books"].splits["train"]
    assert books.tokens == sum(s.tokens for s in books.shards) > 0
    manifest.write(tmp_path / "manifest.json")
    assert (tmp_path / "manifest.json").read_bytes() == prepared.read_bytes()


def test_bad_input_is_reported_with_file_and_line(prepared: Path) -> None:
    stats = json.loads((prepared.parent / "stats.json").read_text())
    assert stats["bad_input"]["counts"] == {
        "invalid_utf8": 1, "malformed_json": 1, "missing_text_field": 1, "empty_file": 1}
    where = {(e["kind"], Path(e["file"]).name, e["line"]) for e in stats["bad_input"]["examples"]}
    assert where == {("invalid_utf8", "bad.txt", 3), ("malformed_json", "web.jsonl", 6),
                     ("missing_text_field", "web.jsonl", 10), ("empty_file", "empty.txt", 0)}
    manifest = json.loads(prepared.read_text())
    assert manifest["stats"]["bad_input"] == stats["bad_input"]["counts"]


def test_stats_count_every_step_and_plots_exist(prepared: Path) -> None:
    stats = json.loads((prepared.parent / "stats.json").read_text())
    read = sum(d["read_docs"] for d in stats["datasets"].values())
    assert read == 300 + 1 + 210
    for step in stats["steps"].values():
        assert step["kept_docs"] + step["removed_docs"] == read
    tokens = sum(sum(s.values()) for s in stats["tokens"].values())
    assert sum(stats["doc_tokens_log2_hist"]) == read - stats["dedup"]["removed_docs"]
    assert tokens > 0 and stats["throughput"]["tokens_per_s"] > 0
    for plot in stats["files"]["plots"]:
        assert (prepared.parent / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reused_tokenizer_and_changed_config_rewrite_the_dataset(
    prepared: Path, inputs: dict, tmp_path: Path
) -> None:
    model = tmp_path / "given.model"
    model.write_bytes((prepared.parent / "tokenizer.model").read_bytes())
    data, tok = configs(inputs, tmp_path / "out", dedup=False)
    tok.model_path = str(model)
    first = json.loads(prepare(data, tok, progress=False, executor="local").read_text())
    assert first["tokenizer"]["sha256"] == json.loads(prepared.read_text())["tokenizer"]["sha256"]
    assert len(decode(tmp_path / "out" / "manifest.json", "web")) == 210  # no dedup
    data.seq_len = 64  # a config change: the old manifest and shards are replaced
    second = json.loads(prepare(data, tok, progress=False, executor="local").read_text())
    assert second["seq_len"] == 64 and second["fingerprint"] != first["fingerprint"]
    on_disk = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.tar")}
    listed = {s["path"] for d in second["datasets"].values() for sp in d["splits"].values()
              for s in sp["shards"]}
    assert on_disk == listed
    assert not (tmp_path / "out" / "_work").exists()


def test_strict_mode_stops_with_file_and_line(inputs: dict, tmp_path: Path) -> None:
    from lmforge.pipeline.prepare.readers import BadInputError

    data, tok = configs(inputs, tmp_path / "strict", strict=True)
    with pytest.raises(BadInputError, match=r"bad\.txt:3: invalid_utf8.*data\.strict=false"):
        prepare(data, tok, progress=False, executor="local")
    assert not (tmp_path / "strict" / "manifest.json").exists()
