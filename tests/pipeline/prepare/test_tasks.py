"""Task data (`data.task`) through the pipeline: prepare (in-process and through Ray),
bad records with file:line, the SFT loss mask and packing, classify labels, seq2seq
targets, and the loader's task batches with an exact resume."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from lmforge.pipeline.config import DataConfig, DatasetSpec, TaskDataConfig, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.stats import PrepareStats
from lmforge.pipeline.loader.shard_loader import LoaderConfig, ShardLoader
from lmforge.pipeline.prepare.driver import prepare
from lmforge.pipeline.prepare.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[3]
TASKS = REPO / "configs" / "tasks"
CORPUS = REPO / "configs" / "corpora" / "tinyshakespeare.txt"
FILES = {"sft": "shakespeare_sft", "classify": "shakespeare_order",
         "seq2seq": "shakespeare_reverse"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TokenizerConfig:
    root = tmp_path_factory.mktemp("tok")
    text = root / "tokenizer_text.txt"
    text.write_text(CORPUS.read_text()[:200_000])
    train_tokenizer(text, TokenizerConfig(vocab_size=400), root / "tok.model")
    return TokenizerConfig(vocab_size=400, model_path=str(root / "tok.model"))


@pytest.fixture(scope="module")
def sp(tokenizer: TokenizerConfig) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=tokenizer.model_path)


@pytest.fixture(scope="module")
def subsets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """The first lines of each bundled task set: (train, val) files per kind."""
    root = tmp_path_factory.mktemp("subsets")
    out = {}
    for kind, name in FILES.items():
        pair = []
        for suffix, n in (("", 150), ("_val", 40)):
            lines = (TASKS / f"{name}{suffix}.jsonl").read_text().splitlines()[:n]
            path = root / f"{name}{suffix}.jsonl"
            path.write_text("\n".join(lines) + "\n")
            pair.append(path)
        out[kind] = tuple(pair)
    return out


def task_data(out: Path, kind: str, train: list[Path], val: list[Path] = (), **kw) -> DataConfig:
    task_kw = {k: kw.pop(k) for k in list(kw) if k in ("labels",)}
    return DataConfig(
        task=TaskDataConfig(kind=kind, train=[str(p) for p in train], val=[str(p) for p in val],
                            **task_kw),
        output_dir=str(out), **{"seq_len": 48, "shard_target_bytes": 20_000, **kw},
    )


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rows(manifest: Path, split: str, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    """Every sample of a split in shard order (a finite, unshuffled pass)."""
    loader = ShardLoader(manifest, split, batch, config=LoaderConfig(shuffle=False),
                         infinite=False)
    return list(loader)


@pytest.fixture(scope="module")
def prepared(tokenizer, subsets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prepared")
    return {
        kind: prepare(task_data(root / kind, kind, [train], [val]), tokenizer, progress=False,
                      executor="local")
        for kind, (train, val) in subsets.items()
    }


def shard_digests(manifest: Path) -> dict[str, str]:
    folder = manifest.parent / "task"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_every_kind_prepares_through_ray_as_in_process(ray_cluster, tokenizer, subsets,
                                                       prepared, tmp_path) -> None:
    for kind, (train, val) in subsets.items():
        data = task_data(tmp_path / kind, kind, [train], [val], num_workers=2,
                         read_chunk_bytes=4096)  # several read chunks
        manifest = prepare(data, tokenizer, progress=False, executor="ray")
        assert shard_digests(manifest) == shard_digests(prepared[kind])
        ours, theirs = DatasetManifest.read(manifest), DatasetManifest.read(prepared[kind])
        assert ours.task == theirs.task and ours.task.splits["train"].examples == 150


def test_manifest_states_the_task_and_round_trips(prepared) -> None:
    manifest = DatasetManifest.read(prepared["classify"])
    assert manifest.task.kind == "classify"
    assert manifest.task.labels == ["original", "shuffled"]  # sorted distinct train labels
    counts = manifest.task.splits["train"].label_counts
    assert sum(counts.values()) == manifest.task.splits["train"].examples == 150
    assert set(manifest.datasets) == {"task"}
    assert manifest.to_dict() == json.loads(prepared["classify"].read_text())
    stats = json.loads((prepared["classify"].parent / "stats.json").read_text())
    assert (stats["datasets"]["task"]["read_docs"], stats["datasets"]["task"]["clean_docs"]) \
        == (190, 190)
    typed = PrepareStats.read(prepared["classify"].parent)
    assert (typed.datasets["task"].read_docs, typed.datasets["task"].clean_docs) == (190, 190)
    assert typed.dedup_removed_docs == 0 and typed.plots == []
    assert sum(typed.tokens["task"].values()) == sum(
        s.tokens for s in manifest.datasets["task"].splits.values())
    assert DatasetManifest.read(prepared["sft"]).task.labels == []


def test_sft_loss_mask_and_packing_by_hand(tokenizer, sp, tmp_path) -> None:
    pairs = [("Continue: To be, or not\n", "to be: that is the question"),
             ("Continue: Now is the winter\n", "of our discontent"),
             ("Continue: Friends, Romans,\n", "countrymen, lend me your ears")]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    eos, pad = sp.eos_id(), sp.pad_id()
    prompts = [sp.encode(p) for p, _ in pairs]
    responses = [sp.encode(r) for _, r in pairs]
    lengths = [len(p) + len(r) + 1 for p, r in zip(prompts, responses, strict=True)]
    window = lengths[0] + lengths[1] + 1  # examples 0 and 1 fit with one pad; 2 does not
    manifest = prepare(task_data(tmp_path / "out", "sft", [path], [], seq_len=window - 1,
                                 val_fraction=0.0), tokenizer, progress=False, executor="local")
    (batch,) = rows(manifest, "train", batch=2)

    (p0, p1, p2), (r0, r1, r2) = prompts, responses
    ignore = [-100]
    first_tokens = p0 + r0 + [eos] + p1 + r1 + [eos]
    assert batch["input_ids"][0].tolist() == first_tokens
    assert batch["labels"][0].tolist() == (
        ignore * (len(p0) - 1) + r0 + [eos] + ignore * len(p1) + r1 + [eos] + ignore
    )
    assert batch["segment_ids"][0].tolist() == [0] * lengths[0] + [1] * lengths[1]
    assert batch["position_ids"][0].tolist() == (list(range(lengths[0]))
                                                 + list(range(lengths[1])))
    # The third example starts the second sample: never split across two.
    rest = window - 1 - lengths[2]
    assert batch["input_ids"][1].tolist() == p2 + r2 + [eos] + [pad] * rest
    assert batch["labels"][1].tolist() == (
        ignore * (len(p2) - 1) + r2 + [eos] + ignore * (rest + 1)
    )
    assert batch["segment_ids"][1].tolist() == [0] * (window - 1)


def test_sft_examples_never_cross_a_sample(prepared, subsets, sp) -> None:
    eos, pad = sp.eos_id(), sp.pad_id()
    expected = [sp.encode(r["prompt"]) + sp.encode(r["response"]) + [eos]
                for r in records(subsets["sft"][0])]
    found = []
    for batch in rows(prepared["sft"], "train"):
        for ids, segments, labels in zip(batch["input_ids"].tolist(),
                                         batch["segment_ids"].tolist(),
                                         batch["labels"].tolist(), strict=True):
            # A sample ends with the EOS of its last example or with padding.
            sample = ids + [eos if labels[-1] == eos else pad]
            segments.append(segments[-1])
            for s in range(segments[-1] + 1):
                found.append([t for t, g in zip(sample, segments, strict=True) if g == s])
            while found[-1] and found[-1][-1] == pad:
                found[-1].pop()
            if not found[-1]:
                found.pop()  # a padding row of the pass's last batch
    assert found == expected  # every segment is one whole example, in record order


def test_classify_labels_and_tokens(prepared, subsets, sp) -> None:
    labels = ["original", "shuffled"]
    want = records(subsets["classify"][1])
    got = rows(prepared["classify"], "val")
    flat = {k: torch.cat([b[k] for b in got]) for k in got[0]}
    assert flat["labels"][: len(want)].tolist() == [labels.index(r["label"]) for r in want]
    assert (flat["labels"][len(want):] == -100).all()  # padding rows of the last batch
    for i, record in enumerate(want):
        ids = [sp.bos_id()] + sp.encode(record["text"]) + [sp.eos_id()]
        assert flat["input_ids"][i, : len(ids)].tolist() == ids
        assert flat["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (48 - len(ids))


def test_seq2seq_source_and_target(prepared, subsets, sp) -> None:
    want = records(subsets["seq2seq"][0])
    got = rows(prepared["seq2seq"], "train")
    flat = {k: torch.cat([b[k] for b in got])[: len(want)] for k in got[0]}
    assert set(flat) == {"input_ids", "attention_mask", "target_ids"}
    for i, record in enumerate(want):
        source = sp.encode(record["source"]) + [sp.eos_id()]
        target = sp.encode(record["target"]) + [sp.eos_id()]
        assert flat["input_ids"][i].tolist() == source + [sp.pad_id()] * (48 - len(source))
        assert flat["target_ids"][i].tolist() == target + [sp.pad_id()] * (48 - len(target))
        assert flat["attention_mask"][i].sum() == len(source)


def test_loader_resume_equals_the_uninterrupted_run(prepared) -> None:
    for kind in ("sft", "classify"):
        def make(manifest: Path = prepared[kind]) -> ShardLoader:
            return ShardLoader(manifest, "train", 3, rank=1, world_size=2, seed=5,
                               config=LoaderConfig(shuffle_buffer=16))
        full = list(itertools.islice(make(), 12))
        first = make()
        head = list(itertools.islice(first, 5))
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for a, b in zip(full, head + list(itertools.islice(resumed, 7)), strict=True):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)


BAD_LINES = [
    b'{"text": "Speak, speak.", "label": "original"}',  # 1: fine
    b"{not json",  # 2
    b'{"text": "broken \xc3\x28", "label": "original"}',  # 3
    b"[1, 2]",  # 4
    b'{"label": "original"}',  # 5
    b'{"text": 5, "label": "original"}',  # 6
    b'{"text": "   ", "label": "original"}',  # 7
    b'{"text": "Speak.", "label": "maybe"}',  # 8
    b'{"text": "' + b"word " * 80 + b'", "label": "original"}',  # 9: over seq_len tokens
    b'{"text": "Resolved. resolved.", "label": "shuffled"}',  # 10: fine
]
BAD_KINDS = {2: "malformed_json", 3: "invalid_utf8", 4: "not_an_object", 5: "missing_field",
             6: "field_not_a_string", 7: "empty_field", 8: "unknown_label",
             9: "longer_than_seq_len"}


def test_bad_records_are_counted_with_file_and_line(tokenizer, tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "Continue: a\n", "response": "b"}) + "\n"
                   + json.dumps({"prompt": "Continue: a\n", "response": " "}) + "\n")
    manifest = prepare(task_data(tmp_path / "out", "classify", [path],
                                 labels=["original", "shuffled"], val_fraction=0.0),
                       tokenizer, progress=False, executor="local")
    stats = json.loads((manifest.parent / "stats.json").read_text())
    assert stats["bad_input"]["counts"] == {kind: 1 for kind in BAD_KINDS.values()}
    assert {(e["kind"], e["file"], e["line"]) for e in stats["bad_input"]["examples"]} == {
        (kind, str(path), line) for line, kind in BAD_KINDS.items()}
    assert DatasetManifest.read(manifest).task.splits["train"].examples == 2
    sft_manifest = prepare(task_data(tmp_path / "sft", "sft", [sft], val_fraction=0.0), tokenizer,
                           progress=False, executor="local")
    stats = json.loads((sft_manifest.parent / "stats.json").read_text())
    assert [(e["kind"], e["line"]) for e in stats["bad_input"]["examples"]] == [
        ("empty_field", 2)]


def test_strict_stops_at_the_first_bad_record(tokenizer, tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    data = task_data(tmp_path / "out", "classify", [path], labels=["original", "shuffled"],
                     strict=True)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: malformed_json"):
        prepare(data, tokenizer, progress=False, executor="local")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_val_fraction_splits_train_records_by_their_hash(tokenizer, subsets, tmp_path) -> None:
    train = subsets["sft"][0]
    manifest = prepare(task_data(tmp_path / "a", "sft", [train], val_fraction=0.2,
                                 read_chunk_bytes=2048),
                       tokenizer, progress=False, executor="local")
    again = prepare(task_data(tmp_path / "b", "sft", [train], val_fraction=0.2),
                    tokenizer, progress=False, executor="local")
    splits = DatasetManifest.read(manifest).task.splits
    assert splits["train"].examples + splits["val"].examples == 150
    assert 10 < splits["val"].examples < 50
    assert shard_digests(manifest) == shard_digests(again)  # chunking changes nothing


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TaskDataConfig(kind="sft"), "train: empty"),
        (lambda: TaskDataConfig(kind="sft", train=["a"], labels=["x", "y"]), "labels: only"),
        (lambda: TaskDataConfig(kind="classify", train=["a"], labels=["x", "x"]), "labels:"),
        (lambda: TaskDataConfig(kind="classify", train=["a"], text_field="label"),
         "label_field:"),
        (lambda: TaskDataConfig(kind="seq2seq", train=["a"], val=["a"]), "val:"),
        (lambda: DataConfig(datasets=[DatasetSpec(name="web", paths=["x"])],
                            task=TaskDataConfig(kind="sft", train=["a"])), "task:"),
    ],
)
def test_task_config_errors_name_the_key(build, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        build()


def test_task_prepare_needs_a_tokenizer_and_files(tokenizer, subsets, tmp_path) -> None:
    data = task_data(tmp_path, "sft", [subsets["sft"][0]])
    with pytest.raises(ValueError, match="^tokenizer.model_path: not set"):
        prepare(data, TokenizerConfig(vocab_size=400), progress=False, executor="local")
    data = task_data(tmp_path, "sft", [tmp_path / "missing*.jsonl"])
    with pytest.raises(ValueError, match="^task.train: no files match"):
        prepare(data, tokenizer, progress=False, executor="local")


def test_bundled_task_sets_are_what_make_tasks_makes(tmp_path) -> None:
    subprocess.run([sys.executable, str(TASKS / "make_tasks.py"), str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    for path in sorted(TASKS.glob("*.jsonl")):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
        assert path.stat().st_size < 300_000
    for split in ("", "_val"):
        labels = [r["label"] for r in records(TASKS / f"shakespeare_order{split}.jsonl")]
        assert labels.count("original") == labels.count("shuffled")  # majority rate 0.5
