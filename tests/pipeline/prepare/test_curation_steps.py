"""Language identification, PII replacement, decontamination, user steps by import path, the
chain they make, and their config keys (errors name the key)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmforge.launch.config import ConfigError, load_config
from lmforge.pipeline.config import (
    CleanConfig,
    DataConfig,
    DatasetSpec,
    DecontaminateConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    PiiConfig,
)
from lmforge.pipeline.prepare.chain import build_chain, removed_samples
from lmforge.pipeline.prepare.decontaminate import Decontaminate, eval_digest
from lmforge.pipeline.prepare.language import LanguageFilter, detect_language
from lmforge.pipeline.prepare.pii import PiiStep, redact, replace_pii
from lmforge.pipeline.prepare.removals import merge_samples, removal_table
from lmforge.pipeline.prepare.results import BadInput, CleanResult, DedupResult, DocCounts
from lmforge.pipeline.prepare.steps import Document, Removed, Step, run_steps

EN = "The quick brown fox jumps over the lazy dog while the farmer watches from his porch. "
DE = ("Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer von seiner "
      "Veranda zusieht. ")


def docs(*texts: str) -> list[Document]:
    return [Document(t, "mem.txt", i + 1) for i, t in enumerate(texts)]


def verdict(step: Step, text: str) -> str:
    result = step.transform(text)
    return result.rule if isinstance(result, Removed) else "kept"


# -- language ---------------------------------------------------------------------------


def test_language_keeps_listed_languages_above_the_score() -> None:
    step = LanguageFilter(name="language")  # keep en, score >= 0.65
    assert verdict(step, EN * 3) == "kept"
    assert verdict(step, DE * 3) == "other_language"
    assert verdict(step, "12345 678 90") == "undetermined"
    mostly, barely = EN * 4 + DE, EN * 2 + DE
    assert detect_language(mostly)[0] == detect_language(barely)[0] == "en"
    assert detect_language(mostly)[1] >= 0.65 > detect_language(barely)[1]
    assert verdict(step, mostly) == "kept" and verdict(step, barely) == "low_score"
    both = LanguageFilter(name="language", config=LanguageConfig(["en", "de"], 0.5))
    assert verdict(both, DE * 3) == "kept"


def test_language_survives_text_cld2_refuses() -> None:
    assert detect_language(EN * 2 + "\x85\x00\ud800")[0] == "en"


def test_language_codes_are_checked_against_the_model() -> None:
    with pytest.raises(ValueError, match="clean.language.keep_languages: \\['xq'\\]"):
        LanguageFilter(name="language", config=LanguageConfig(["en", "xq"]))
    with pytest.raises(ValueError, match="keep_languages:"):
        LanguageConfig(["English"])


# -- PII --------------------------------------------------------------------------------


def test_pii_replaces_email_and_public_ip_addresses_and_counts_them() -> None:
    text = ("Write to jane.doe+news@mail.example.org or ops@example.com; the server is at "
            "8.8.8.8. Home router 192.168.1.1 stays, as does version 1.2.3.4.5 and 12:30:45; "
            "v6 2001:4860:4860::8888 goes.")
    new, emails, ips = replace_pii(text, PiiConfig())
    assert (emails, ips) == (2, 2)
    assert new == ("Write to <EMAIL> or <EMAIL>; the server is at <IP>. Home router "
                   "192.168.1.1 stays, as does version 1.2.3.4.5 and 12:30:45; v6 <IP> goes.")
    step = PiiStep(name="pii")
    out = step(docs(text, "nothing personal here"))
    assert out[0].text == new and out[1].text == "nothing personal here"
    assert step.stats.rules == {"email": {"modified_docs": 1, "replaced": 2},
                                "ip": {"modified_docs": 1, "replaced": 2}}
    assert step.stats.modified_docs == 1 and step.stats.removed_docs == 0


def test_redact_replaces_private_addresses_too() -> None:
    assert redact("me@host.io at 10.0.0.1, not 999.1.1.1") == "<EMAIL> at <IP>, not 999.1.1.1"


# -- decontamination --------------------------------------------------------------------

QUESTION = "Which planet in our solar system is known as the red planet because of its color"
ANSWER = "Mars is the fourth planet from the sun and it looks red because of iron oxide dust"


@pytest.fixture
def eval_files(tmp_path: Path) -> list[str]:
    task = tmp_path / "mmlu_astro.jsonl"
    task.write_text(json.dumps({"context": QUESTION, "choices": ["Venus", ANSWER], "gold": 1})
                    + "\n\n" + json.dumps({"context": "too short to match", "target": "x"})
                    + "\n")
    passage = tmp_path / "lambada.txt"
    passage.write_text("the old lighthouse keeper climbed the winding stairs every night to "
                       "light the great lamp for the ships\n")
    return [str(task), str(passage)]


def test_documents_sharing_a_13_gram_are_removed_per_eval_file(eval_files) -> None:
    step = Decontaminate(name="decontaminate", config=DecontaminateConfig(eval_files))
    words = QUESTION.split()
    thirteen = "Quiz: " + " ".join(words[2:15]).upper() + "?! Then more words follow."
    twelve = "Quiz: " + " ".join(words[2:14]) + " -- and something else entirely here."
    lighthouse = ("Yes: the old lighthouse keeper climbed the winding stairs every night, to "
                  "light the")
    out = step(docs(thirteen, twelve, lighthouse, ANSWER.replace("Mars", "MARS!")))
    assert [d.text for d in out] == [twelve]
    assert step.stats.rules == {
        "mmlu_astro": {"removed_docs": 2, "removed_bytes": len(thirteen) + len(ANSWER) + 1},
        "lambada": {"removed_docs": 1, "removed_bytes": len(lighthouse)}}
    index = step._indexes[0]
    assert (index.texts, index.short_texts) == (5, 3)  # 3 texts under 13 words
    eight = Decontaminate(name="decontaminate", config=DecontaminateConfig(eval_files, 8))
    assert verdict(eight, " ".join(words[:8])) == "mmlu_astro"


def test_eval_digest_follows_the_file_contents(eval_files, tmp_path: Path) -> None:
    before = eval_digest(DecontaminateConfig(eval_files))
    changed = tmp_path / "changed.jsonl"
    changed.write_text(Path(eval_files[0]).read_text().replace("red planet", "blue planet"))
    assert eval_digest(DecontaminateConfig([str(changed), eval_files[1]])) != before


def test_a_malformed_eval_file_is_named_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "fine"}\n{oops\n')
    with pytest.raises(ValueError, match=f"eval_files: {bad}, line 2: not JSON"):
        Decontaminate(name="decontaminate", config=DecontaminateConfig([str(bad)]))


# -- user steps and the chain -----------------------------------------------------------


def drop_shouting(text: str, limit: float = 0.5) -> str | None:
    """A user step as a function: removes documents mostly in capitals."""
    letters = [c for c in text if c.isalpha()]
    return None if letters and sum(c.isupper() for c in letters) / len(letters) > limit \
        else text


@dataclass
class StripSignature(Step):
    """A user step as a Step subclass: drops everything after a signature marker."""

    marker: str = "--"

    def transform(self, text: str) -> str | Removed:
        head = text.split(self.marker)[0].rstrip()
        return head if head else Removed("only_signature")


def data_config(tmp_path: Path, **clean) -> DataConfig:
    return DataConfig(datasets=[DatasetSpec(name="web", paths=[str(tmp_path)])],
                      clean=CleanConfig(**clean))


def test_user_steps_by_import_path_run_and_count_like_built_in_ones(tmp_path: Path) -> None:
    module = Path(__file__).stem
    data = data_config(
        tmp_path,
        steps=["strip_control", f"{module}:StripSignature", f"{module}:drop_shouting", "pii"],
        step_args={f"{module}:StripSignature": {"marker": "~~"},
                   f"{module}:drop_shouting": {"limit": 0.6}})
    steps = build_chain(data)
    assert [s.name for s in steps] == data.clean.steps
    out = run_steps(steps, docs("Hello there ~~ Bob, bob@example.com", "~~ only",
                                "BUY NOW AT a@b.com", "Mostly Fine Text"))
    assert [d.text for d in out] == ["Hello there", "Mostly Fine Text"]
    assert steps[1].stats.rules == {"only_signature": {"removed_docs": 1, "removed_bytes": 7}}
    assert steps[2].stats.removed_docs == 1
    samples = removed_samples(steps)
    assert samples[f"{module}:drop_shouting"] == [
        {"source": "mem.txt", "line": 3, "offset": 0, "text": "BUY NOW AT <EMAIL>"}]
    assert list(samples) == [f"{module}:StripSignature.only_signature",
                             f"{module}:drop_shouting"]


@pytest.mark.parametrize(("step", "args", "message"), [
    ("no_such_pkg.filters:Drop", {}, "cannot import no_such_pkg.filters"),
    ("json:nothing_here", {}, "json has no Step subclass or function named 'nothing_here'"),
    ("lmforge.pipeline.prepare.steps:LengthFilter", {"min_letters": 3},
     "unexpected keyword argument 'min_letters'"),
])
def test_a_user_step_that_cannot_load_is_named(tmp_path, step, args, message) -> None:
    data = data_config(tmp_path, steps=[step], step_args={step: args} if args else {})
    key = "step_args" if args else "steps"
    with pytest.raises(ValueError, match=f"^data.clean.{key}: '{step}': .*{message}"):
        build_chain(data)


def test_rule_settings_are_checked_and_unknown_names_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^steps: unknown step 'gopher_qualty'"):
        CleanConfig(steps=["gopher_qualty"])
    with pytest.raises(ValueError, match="^step_args: 'a.b:C' is not a user step"):
        CleanConfig(step_args={"a.b:C": {}})
    with pytest.raises(ValueError, match="^max_top_ngram_char_fraction: key 'two'"):
        GopherRepetitionConfig(max_top_ngram_char_fraction={"two": 0.2})
    assert GopherRepetitionConfig(max_top_ngram_char_fraction={2: 0.2}) \
        .max_top_ngram_char_fraction == {"2": 0.2}
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  datasets: [{{name: web, paths: ['{tmp_path}/*.txt']}}]\n"
        "  clean:\n    steps: [gopher_quality, c4]\n"
        "    gopher_quality: {min_words: 20, min_wordz: 3}\n")
    with pytest.raises(ConfigError, match="run.yaml:5: data.clean.gopher_quality.min_wordz: "
                                          "unknown key; did you mean 'min_words'"):
        load_config(config, sections=("data", "tokenizer"))
    config.write_text(config.read_text().replace(", min_wordz: 3", "") +
                      "  decontaminate: {eval_files: [evals/mmlu.jsonl], ngram: 0}\n")
    with pytest.raises(ConfigError, match="data.decontaminate.ngram: 0 must be >= 1"):
        load_config(config, sections=("data", "tokenizer"))
    config.write_text(config.read_text().replace("ngram: 0", "ngram: 8"))
    data = load_config(config, sections=("data", "tokenizer")).data
    assert (data.clean.gopher_quality.min_words, data.decontaminate.ngram) == (20, 8)


# -- the removal table ------------------------------------------------------------------


def test_removal_table_keeps_pipeline_order_across_chunks_and_datasets() -> None:
    def clean(chunk: int, dataset: str, quality_rules: dict, samples: dict) -> CleanResult:
        steps = {"length": {"removed_docs": 1, "removed_bytes": 5, "modified_docs": 0},
                 "gopher_quality": {"removed_docs": sum(r["removed_docs"]
                                                        for r in quality_rules.values()),
                                    "removed_bytes": sum(r["removed_bytes"]
                                                         for r in quality_rules.values()),
                                    "modified_docs": 0, "rules": quality_rules}}
        return CleanResult(chunk, dataset, DocCounts(10, 100), steps, DocCounts(5, 50),
                           BadInput(), removed_samples=samples)

    # Results arrive out of read order; the table follows read order and keeps each step's
    # rules together, then dedup, then near dedup.
    chunks = [clean(1, "b", {"stop_words": {"removed_docs": 1, "removed_bytes": 7}},
                    {"length": [{"text": "x"}] * 3}),
              clean(0, "a", {"word_count": {"removed_docs": 2, "removed_bytes": 9}},
                    {"length": [{"text": "y"}] * 3})]
    dedup = [DedupResult(0, 2, 30, {"0": 1, "1": 1}, {"0": 10, "1": 20})]
    near = {"datasets": {"a": {"removed_docs": 4, "removed_bytes": 40}}}
    table = removal_table(chunks, dedup, near)
    assert [(e["rule"], e["removed_docs"], e["removed_bytes"]) for e in table] == [
        ("length", 2, 10), ("gopher_quality.word_count", 2, 9),
        ("gopher_quality.stop_words", 1, 7), ("dedup", 2, 30), ("near_dedup", 4, 40)]
    assert table[3]["datasets"] == {"a": {"removed_docs": 1, "removed_bytes": 10,
                                          "modified_docs": 0},
                                    "b": {"removed_docs": 1, "removed_bytes": 20,
                                          "modified_docs": 0}}
    samples = merge_samples(chunks)["length"]  # read order (chunk 0 first), at most 5
    assert [s["dataset"] for s in samples] == ["a", "a", "a", "b", "b"]
