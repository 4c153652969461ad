"""The curation rules through the real `prepare` on a local Ray: documents planted to fail
one rule each are counted under that rule and their dataset, in pipeline order, in
stats.json, its plots and MLflow.

Good documents are sentences of the demo corpus, one per line, checked in-process to pass
every rule unchanged; each planted document is a good one with one fault added by hand (a
German text, 20 words, "lorem ipsum", a curly brace, repeated lines, an e-mail address, a
13-word span of an evaluation file, an exact copy).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lmforge.launch.commands import log_prepared_dataset
from lmforge.launch.config.sections import TrackingConfig
from lmforge.launch.tracking import Tracker
from lmforge.pipeline.config import CleanConfig, DataConfig, DatasetSpec, TokenizerConfig
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.contract.stats import PrepareStats
from lmforge.pipeline.curation_config import DecontaminateConfig
from lmforge.pipeline.prepare.chain import build_chain
from lmforge.pipeline.prepare.driver import prepare
from lmforge.pipeline.prepare.steps import Document, run_steps

CORPUS = Path(__file__).resolve().parents[3] / "configs" / "corpora" / "tinyshakespeare.txt"
USER_STEP = "lmforge.pipeline.prepare.steps:LengthFilter"
STEPS = ["normalize", "strip_control", "language", "gopher_repetition", "gopher_quality", "c4",
         "fineweb", "pii", USER_STEP]
EVAL_SENTENCE = ("which of the following planets in our solar system has the largest number "
                 "of known moons orbiting it today")
GERMAN = ("Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer von seiner "
          "Veranda zusieht und an die Ernte des nächsten Jahres denkt. ") * 6


def candidate_docs() -> list[str]:
    """Documents of six sentences of the demo corpus, one sentence a line."""
    speeches = [" ".join(line for line in p.split("\n")[1:])
                for p in CORPUS.read_text()[:400_000].split("\n\n")]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(speeches))]
    sentences = [s for s in sentences if s.endswith((".", "!", "?")) and len(s) > 40]
    return ["\n".join(sentences[i : i + 6]) for i in range(0, len(sentences) - 6, 6)]


def passes_unchanged(data: DataConfig, text: str) -> bool:
    out = run_steps(build_chain(data), [Document(text)])
    return len(out) == 1 and out[0].text == text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("curation")
    evals = root / "moons_quiz.jsonl"
    evals.write_text(json.dumps({"context": EVAL_SENTENCE, "choices": ["Saturn", "Mars"]}) + "\n")
    probe = configs(root, evals, root / "unused")[0]
    good = [t for t in candidate_docs()[:400] if passes_unchanged(probe, t)]
    assert len(good) >= 80, len(good)
    web, forum = good[:45], good[45:80]
    planted = {
        "web": [
            *[GERMAN + str(i) for i in range(3)],  # language.other_language
            *[" ".join(web[i].split()[:20]) + "." for i in range(2)],  # gopher_quality
            web[2] + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",  # c4
            web[3] + "\nLorem ipsum is what printers fill a page with.",  # c4
            web[4] + "\nThe code said function() { return 1; } and stopped.",  # c4
            web[5] + "\nAsk them, in writing, at " + EVAL_SENTENCE + ".",  # decontaminate
            web[6], web[7],  # exact copies: dedup
        ],
        "forum": [
            "\n".join(forum[i].split("\n")[:3] * 3) for i in range(2)  # gopher_repetition
        ] + [GERMAN + "forum"],
    }
    # Two good documents carry an e-mail address (pii replaces it; nothing is removed).
    web[10] += "\nYou may always write to jane.doe@example.com for the rest of it."
    web[11] += "\nYou may always write to ops@example.org for the rest of it."
    for name, docs in (("web", web), ("forum", forum)):
        with open(root / f"{name}.jsonl", "w") as f:
            for text in docs + planted[name]:
                f.write(json.dumps({"text": text}) + "\n")
    return {"root": root, "evals": evals, "good": {"web": web, "forum": forum},
            "planted": planted}


def configs(root: Path, evals: Path, out: Path) -> tuple[DataConfig, TokenizerConfig]:
    data = DataConfig(
        datasets=[DatasetSpec(name="web", paths=[str(root / "web.jsonl")]),
                  DatasetSpec(name="forum", paths=[str(root / "forum.jsonl")])],
        output_dir=str(out), seq_len=32, val_fraction=0.1, num_workers=2,
        read_chunk_bytes=8192,  # several read chunks per dataset: counts are summed over them
        shard_target_bytes=20_000,
        clean=CleanConfig(steps=STEPS, step_args={USER_STEP: {"min_chars": 100}}),
        decontaminate=DecontaminateConfig(eval_files=[str(evals)]),
    )
    return data, TokenizerConfig(vocab_size=400, train_text_bytes=60_000)


@pytest.fixture(scope="module")
def prepared(ray_cluster, corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, tok = configs(corpus["root"], corpus["evals"], tmp_path_factory.mktemp("out"))
    return prepare(data, tok, progress=False)


def test_every_removal_is_counted_per_rule_and_dataset_in_pipeline_order(
        prepared: Path, corpus: dict) -> None:
    stats = json.loads((prepared.parent / "stats.json").read_text())
    table = {e["rule"]: e for e in stats["removed"]}
    removed = {rule: {name: c["removed_docs"] for name, c in e["datasets"].items()
                      if c["removed_docs"]}
               for rule, e in table.items() if e["removed_docs"]}
    assert removed == {
        "language.other_language": {"web": 3, "forum": 1},
        "gopher_repetition.duplicate_lines": {"forum": 2},
        "gopher_quality.word_count": {"web": 2},
        "c4.lorem_ipsum": {"web": 2},
        "c4.curly_brace": {"web": 1},
        "decontaminate.moons_quiz": {"web": 1},
        "dedup": {"web": 2},
    }
    german = len((GERMAN + "0").encode())
    assert table["language.other_language"]["removed_bytes"] == 3 * german + len(
        (GERMAN + "forum").encode())
    assert table["pii.email"]["modified_docs"] == 2
    assert stats["steps"]["pii"]["rules"]["email"] == {"modified_docs": 2, "replaced": 2}
    # Pipeline order: the chain as configured (each step's rules together), then dedup.
    steps = list(dict.fromkeys(e["step"] for e in stats["removed"]))
    assert steps == [*STEPS, "decontaminate", "dedup"]
    read = sum(len(corpus["good"][n]) + len(corpus["planted"][n]) for n in ("web", "forum"))
    assert sum(d["read_docs"] for d in stats["datasets"].values()) == read
    kept = read - sum(e["removed_docs"] for e in stats["removed"])
    assert sum(stats["doc_tokens_log2_hist"]) == kept


def test_removed_samples_are_redacted_and_plots_written(prepared: Path) -> None:
    stats = json.loads((prepared.parent / "stats.json").read_text())
    samples = stats["removed_samples"]
    assert {s["dataset"] for s in samples["language.other_language"]} == {"web", "forum"}
    assert all(s["text"].startswith("Der schnelle") for s in samples["language.other_language"])
    assert samples["decontaminate.moons_quiz"][0]["source"].endswith("web.jsonl")
    assert not any("@example." in s["text"] for found in samples.values() for s in found)
    for plot in ("plots/removed_docs_per_rule.png", "plots/removed_bytes_per_rule.png"):
        assert plot in stats["files"]["plots"]
        assert (prepared.parent / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_removals_reach_mlflow_in_pipeline_order(prepared: Path, tmp_path: Path) -> None:
    typed = PrepareStats.read(prepared.parent)
    assert [r.rule for r in typed.removed][-2:] == ["decontaminate.moons_quiz", "dedup"]
    tracker = Tracker(TrackingConfig(system_metrics=False), tmp_path)
    run_id = tracker.start(run_name="curation", system_metrics=False)
    log_prepared_dataset(tracker, DatasetManifest.read(prepared.parent))
    assert tracker.close("FINISHED")
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.metrics
    index = [r.rule for r in typed.removed].index("language.other_language")
    assert metrics[f"prepare/removed/{index:02d}_language.other_language/docs"] == 4
    assert metrics[f"prepare/forum/removed/{index:02d}_language.other_language/docs"] == 1
    user = [r.rule for r in typed.removed].index(USER_STEP)
    assert f"prepare/removed/{user:02d}_{USER_STEP.replace(':', '_')}/docs" in metrics
