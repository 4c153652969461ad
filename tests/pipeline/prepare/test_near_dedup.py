"""Near-duplicate removal (`data.near_dedup`): the MinHash/LSH arithmetic, the distributed
components, and `prepare` on a corpus with planted near-duplicates.

The corpus is made here: random documents of random words, and copies of some of them
changed by word edits, an inserted passage or reordered paragraphs. The expected clusters
come from an independent computation: Python sets of 5-word tuples and an all-pairs
Jaccard, then a union-find, keeping each cluster's first document in input order.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import webdataset as wds

from lmforge.pipeline.config import DataConfig, DatasetSpec, NearDedupConfig, TokenizerConfig
from lmforge.pipeline.prepare import components, minhash
from lmforge.pipeline.prepare.driver import prepare

THRESHOLD = 0.8


# -- the planted corpus and its independent ground truth --------------------------------

def ngram_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words)} if len(words) < n else {tuple(words[i:i + n])
                                                  for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = ngram_set(a), ngram_set(b)
    return len(x & y) / len(x | y)


def plant(rng: random.Random) -> dict[str, list[str]]:
    """Two datasets of documents; about a third have a near-duplicate planted later (some
    across datasets), a few have a variant well under the threshold."""
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(4000)]

    def paragraphs() -> list[list[str]]:
        return [[rng.choice(vocab) for _ in range(rng.randint(50, 70))] for _ in range(4)]

    def text(paras: list[list[str]]) -> str:
        return "\n\n".join(" ".join(p) for p in paras)

    def edited(paras: list[list[str]], k: int) -> list[list[str]]:
        out = [list(p) for p in paras]
        for _ in range(k):
            p = rng.randrange(len(out))
            out[p][rng.randrange(len(out[p]))] = rng.choice(vocab)
        return out

    def inserted(paras: list[list[str]], k: int) -> list[list[str]]:
        out = [list(p) for p in paras]
        p = rng.randrange(len(out))
        at = rng.randrange(len(out[p]))
        out[p][at:at] = [rng.choice(vocab) for _ in range(k)]
        return out

    def reordered(paras: list[list[str]]) -> list[list[str]]:
        return [paras[1], paras[0], paras[3], paras[2]]

    web, books = [], []
    for i in range(40):
        base = paragraphs()
        (web if i % 2 else books).append(text(base))
        kind = i % 8
        if kind == 0:
            variant = edited(base, 2)  # J ≈ 0.92
        elif kind == 1:
            variant = inserted(base, 3)  # J ≈ 0.97
        elif kind == 2:
            variant = reordered(base)  # J ≈ 0.90
        elif kind == 3:  # a chain: a copy of a copy, ≥ 0.8 from the one before, not the first
            middle = edited(base, 3)
            web.append(text(middle))
            variant = edited(middle, 3)
        elif kind == 4:
            variant = edited(base, 16)  # J ≈ 0.5: not a duplicate
        else:
            continue
        (books if i % 3 == 0 else web).append(text(variant))
    web.append(books[0])  # an exact duplicate: exact dedup's, not near-dedup's
    rng.shuffle(web)
    return {"books": books, "web": web}


def expected_removed(docs: list[str]) -> dict[int, int]:
    """Removed document index -> its cluster's kept (first) index, by all-pairs Jaccard.
    Exact duplicates go first (exact dedup keeps the first occurrence)."""
    parent = list(range(len(docs)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    first = {}
    exact = {i for i, d in enumerate(docs) if first.setdefault(d, i) != i}
    live = [i for i in range(len(docs)) if i not in exact]
    for i, j in itertools.combinations(live, 2):
        if jaccard(docs[i], docs[j]) >= THRESHOLD:
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)
    return {i: root(i) for i in live if root(i) != i}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    docs = plant(random.Random(7))
    root = tmp_path_factory.mktemp("planted")
    half = len(docs["web"]) // 2
    files = {"books": [docs["books"]], "web": [docs["web"][:half], docs["web"][half:]]}
    for name, parts in files.items():
        for k, part in enumerate(parts):
            lines = "".join(json.dumps({"text": t}) + "\n" for t in part)
            (root / f"{name}-{k}.jsonl").write_text(lines)
    ordered = docs["books"] + docs["web"]  # input order: datasets, then files, then lines
    return {"root": root, "docs": ordered, "n_books": len(docs["books"]),
            "removed": expected_removed(ordered)}


def configs(root: Path, out: Path, chunk: int = 4096, **data_kw) -> tuple[DataConfig,
                                                                          TokenizerConfig]:
    data = DataConfig(
        datasets=[DatasetSpec(name="books", paths=[str(root / "books-*.jsonl")]),
                  DatasetSpec(name="web", paths=[str(root / "web-*.jsonl")])],
        output_dir=str(out), seq_len=64, val_fraction=0.0, read_chunk_bytes=chunk,
        shard_target_bytes=30_000, near_dedup=True, **data_kw)
    return data, TokenizerConfig(vocab_size=600, train_text_bytes=200_000)


def decoded(manifest_path: Path) -> set[str]:
    manifest = json.loads(manifest_path.read_text())
    sp = spm.SentencePieceProcessor(model_file=str(manifest_path.parent / "tokenizer.model"))
    docs = set()
    for dataset in manifest["datasets"].values():
        urls = [str(manifest_path.parent / s["path"]) for s in dataset["splits"]["train"]["shards"]]
        stream = np.concatenate([s["tokens.npy"] for s in
                                 wds.WebDataset(urls, shardshuffle=False).decode()])
        stream = stream[stream != manifest["tokenizer"]["pad_id"]]
        ends = np.flatnonzero(stream == manifest["tokenizer"]["eos_id"])
        docs |= {sp.decode(d[:-1].tolist()) for d in np.split(stream, ends + 1)[:-1]}
    return docs


@pytest.fixture(scope="module")
def one_worker(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, tok = configs(planted["root"], tmp_path_factory.mktemp("one") / "data")
    return prepare(data, tok, progress=False, executor="local")


def test_planted_corpus_has_the_variants_it_claims(planted: dict) -> None:
    docs, removed = planted["docs"], planted["removed"]
    to_kept = sorted(jaccard(docs[i], docs[k]) for i, k in removed.items())
    assert len(removed) == 25  # 5 per 8 bases: edit, insert, reorder, the chain's two copies
    assert 0.7 < to_kept[0] < to_kept[4] < THRESHOLD < to_kept[5]  # the chains' ends
    similar = [jaccard(a, b) for a, b in itertools.combinations(docs, 2)]
    assert sum(0.5 < s < 0.65 for s in similar) == 5  # the far variants, kept
    assert not [s for s in similar if 0.65 <= s < 0.7 or 0.25 < s <= 0.5]


def test_removes_the_planted_clusters_keeping_the_first_of_each(
    planted: dict, one_worker: Path
) -> None:
    docs, removed = planted["docs"], planted["removed"]
    kept = {d for i, d in enumerate(docs) if i not in removed}
    assert decoded(one_worker) == kept
    stats = json.loads((one_worker.parent / "stats.json").read_text())
    near = stats["near_dedup"]
    assert stats["dedup"]["removed_docs"] == 1
    assert near["removed_docs"] == len(removed)
    books = sum(1 for i in removed if i < planted["n_books"])
    assert near["datasets"] == {
        "books": {"removed_docs": books, "removed_bytes": sum(
            len(docs[i]) for i in removed if i < planted["n_books"])},
        "web": {"removed_docs": len(removed) - books, "removed_bytes": sum(
            len(docs[i]) for i in removed if i >= planted["n_books"])}}
    assert near["settings"] == {"ngram": 5, "bands": 14, "rows": 8, "threshold": 0.8, "seed": 1}
    # Global ids count the documents kept by cleaning, in input order: here all of them.
    for example in near["examples"]["books"] + near["examples"]["web"]:
        i, k = example["removed_doc"], example["kept_doc"]
        assert removed[i] == k and docs[i].startswith(example["removed"])
        assert example["jaccard"] == pytest.approx(jaccard(docs[i], docs[k]), abs=1e-4)
    manifest = json.loads(one_worker.read_text())
    assert manifest["stats"]["near_dedup"]["removed_docs"] == len(removed)


def test_two_ray_workers_and_other_chunks_give_the_same_bytes(
    planted: dict, one_worker: Path, ray_cluster, tmp_path: Path
) -> None:
    # Other read chunks too (3 instead of 24): other chunk numbers, the same document ids.
    data, tok = configs(planted["root"], tmp_path / "data", chunk=40_000, num_workers=2)
    two = prepare(data, tok, progress=False)
    assert two.read_bytes() == one_worker.read_bytes()
    first = json.loads((one_worker.parent / "stats.json").read_text())["near_dedup"]
    again = json.loads((two.parent / "stats.json").read_text())["near_dedup"]
    assert first == again


RUN = """
import sys
sys.path.insert(0, sys.argv[3])
from test_near_dedup import configs
from pathlib import Path
from lmforge.pipeline.prepare.driver import prepare
prepare(*configs(Path(sys.argv[1]), Path(sys.argv[2])), progress=False, executor="local")
"""


def kill_when(root: Path, out: Path, phase: str, count: int) -> None:
    """Run prepare in a process of its own and SIGKILL it once `count` items of `phase`
    are done (the `_work/*/done/<phase>/` markers), as test_resume.py does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(root), str(out), here], env=env)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob(f"_work/*/done/{phase}/*.json"))) >= count:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before {phase} could be hit"


def test_killed_in_near_dedup_reruns_to_identical_bytes(
    planted: dict, one_worker: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data"
    kill_when(planted["root"], out, "near_sign", 3)  # mid-way through the chunks
    assert not list(out.glob("_work/*/done/near_pairs/*.json"))
    kill_when(planted["root"], out, "near_cc", 1)  # after a components round
    assert not list(out.glob("_work/*/done/near_removed/*.json"))
    manifest = prepare(*configs(planted["root"], out), progress=False, executor="local")
    assert manifest.read_bytes() == one_worker.read_bytes()
    for shard in one_worker.parent.glob("*/train-*.tar"):
        assert (out / shard.relative_to(one_worker.parent)).read_bytes() == shard.read_bytes()
    first = json.loads((one_worker.parent / "stats.json").read_text())["near_dedup"]
    assert json.loads((out / "stats.json").read_text())["near_dedup"] == first


# -- the pieces -------------------------------------------------------------------------

def test_shingles_are_the_word_ngram_sets() -> None:
    texts = ["The cat, the CAT! sat on the mat today", "two words", "", "... ;;"]
    hashes, offsets = minhash.shingles(texts, 5)
    # Words: the cat the cat sat on the mat today (9) → 5 five-word n-grams, all distinct;
    # "two words" is one shingle; no words, no shingles.
    assert np.diff(offsets).tolist() == [5, 1, 0, 0]
    # Word boundaries: punctuation splits words, case does not matter.
    same, _ = minhash.shingles(["the cat the cat sat on the mat today"], 5)
    assert (same == hashes[offsets[0]:offsets[1]]).all()


def test_jaccard_and_minhash_estimate_agree_with_sets() -> None:
    rng = random.Random(3)
    words = [f"w{rng.randrange(10_000)}" for _ in range(400)]
    a = " ".join(words)
    b = " ".join(words[:300] + [f"x{i}" for i in range(100)])
    hashes, offsets = minhash.shingles([a, b], 5)
    exact = minhash.jaccard_pairs(hashes, offsets, np.array([0]), np.array([1]))[0]
    assert exact == pytest.approx(jaccard(a, b), abs=1e-12)
    fa, fb = minhash.hash_parameters(1024, 0)
    sig = minhash.signatures(*minhash.ngram_hashes([a, b], 5), fa, fb)
    # 1024 functions: the estimate's standard error is sqrt(J(1-J)/1024) ≈ 0.015.
    assert (sig[0] == sig[1]).mean() == pytest.approx(exact, abs=0.05)


def test_lsh_s_curve_at_the_defaults() -> None:
    # 1 - (1 - s^8)^14 by hand: s = 0.8 → 1 - 0.83223^14 = 0.9235; s = 0.5 → 0.0533.
    assert minhash.candidate_probability(0.8, 14, 8) == pytest.approx(0.9235, abs=1e-4)
    assert minhash.candidate_probability(0.5, 14, 8) == pytest.approx(0.0533, abs=1e-4)


def test_distributed_components_match_union_find_for_any_partitioning() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 400, 300).astype(np.uint64)
    b = rng.integers(0, 400, 300).astype(np.uint64)
    a = np.concatenate([a, np.arange(500, 560, dtype=np.uint64)])  # a long path
    b = np.concatenate([b, np.arange(501, 561, dtype=np.uint64)])
    parent = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = root(x), root(y)
        parent[max(rx, ry)] = min(rx, ry)
    expected = {x: root(x) for x in parent if root(x) != x}
    for parts in (1, 3, 7):
        rows = components.edge_rows(a, b)
        quiet, step = 0, 0
        while quiet < 2:
            step += 1
            fn = components.large_star if step % 2 else components.small_star
            outs, changed = [], 0
            for p in range(parts):
                mine = components.distinct_rows([rows[rows["node"] % np.uint64(parts) == p]])
                out, n = fn(mine)
                outs.append(out)
                changed += n
            rows = np.concatenate(outs)
            quiet = quiet + 1 if changed == 0 else 0
        leaves, centres = components.leaves(components.distinct_rows([rows]))
        assert dict(zip(leaves.tolist(), centres.tolist(), strict=True)) == expected


def test_settings_are_checked_with_the_key_named() -> None:
    spec = [DatasetSpec(name="a", paths=["x"])]
    assert DataConfig(datasets=spec, near_dedup=True).near_dedup == NearDedupConfig()
    assert DataConfig(datasets=spec).near_dedup is False
    with pytest.raises(ValueError, match=r"^threshold: 1.5 must be in \(0, 1\]"):
        NearDedupConfig(threshold=1.5)
    with pytest.raises(ValueError, match="^bands: 0 must be >= 1"):
        NearDedupConfig(bands=0)
    with pytest.raises(ValueError, match="^bands: 64 × rows 32"):
        NearDedupConfig(bands=64, rows=32)


def test_yaml_settings_name_the_key(tmp_path: Path) -> None:
    from lmforge.launch.config.run_config import load_config
    from lmforge.launch.config.typed_yaml import ConfigError

    tiny = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    assert load_config(tiny, ["--data.near_dedup=true"]).data.near_dedup == NearDedupConfig()
    cfg = load_config(tiny, ["--data.near_dedup={bands: 10, rows: 5}"])
    assert (cfg.data.near_dedup.bands, cfg.data.near_dedup.rows) == (10, 5)
    with pytest.raises(ConfigError, match=r"data\.near_dedup\.bandz.*did you mean 'bands'"):
        load_config(tiny, ["--data.near_dedup={bandz: 10}"])
    with pytest.raises(ConfigError, match=r"data\.near_dedup\.threshold.*must be in \(0, 1\]"):
        load_config(tiny, ["--data.near_dedup={threshold: 2}"])
    with pytest.raises(ConfigError, match=r"data\.near_dedup.*'yes' is ambiguous"):
        load_config(tiny, ["--data.near_dedup=yes"])
