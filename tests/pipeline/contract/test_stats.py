"""stats.json's typed reader: what launch logs, and a clear error for a damaged file."""

from __future__ import annotations

import json

import pytest

from lmforge.pipeline.contract.stats import PrepareStats


def test_a_folder_without_stats_reads_as_none(tmp_path) -> None:
    assert PrepareStats.read(tmp_path) is None


def test_reads_the_keys_launch_logs(tmp_path) -> None:
    (tmp_path / "stats.json").write_text(json.dumps({
        "datasets": {"web": {"read_docs": 10, "read_bytes": 900, "clean_docs": 8,
                             "clean_bytes": 700}},
        "dedup": {"removed_docs": 2, "removed_bytes": 50},
        "bad_input": {"counts": {"bad_utf8": 1}, "examples": []},
        "tokens": {"web": {"train": 600, "val": 40}},
        "throughput": {"tokens_per_s": 320.0, "input_bytes_per_s": 450.0},
        "files": {"stats": "stats.json", "plots": ["plots/a.png"]},
    }))
    stats = PrepareStats.read(tmp_path)
    assert stats.datasets["web"].read_docs == 10 and stats.datasets["web"].clean_docs == 8
    assert stats.dedup_removed_docs == 2 and stats.bad_input == {"bad_utf8": 1}
    assert stats.tokens == {"web": {"train": 600, "val": 40}}
    assert stats.throughput == {"tokens_per_s": 320.0, "input_bytes_per_s": 450.0}
    assert stats.plot_paths == [tmp_path / "plots" / "a.png"]


@pytest.mark.parametrize("text", ["{not json", '{"tokens": {"web": {"train": "many"}}}', "[]"])
def test_a_damaged_stats_file_is_named_with_what_to_do(tmp_path, text) -> None:
    (tmp_path / "stats.json").write_text(text)
    with pytest.raises(ValueError, match=r"stats\.json.*re-run `lmforge prepare`"):
        PrepareStats.read(tmp_path)
