"""Phase results are dataclasses stored as JSON markers: they round-trip, and a marker of
another layout reads as "not done"."""

from __future__ import annotations

import json

from lmforge.pipeline import durable
from lmforge.pipeline.prepare.phases import read_result
from lmforge.pipeline.prepare.results import (
    BadInput,
    ChunkLabels,
    CleanResult,
    DedupResult,
    DocCounts,
    EncodeResult,
    ExampleSplit,
    ExamplesResult,
    SplitTokens,
)

BAD = BadInput({"bad_utf8": 1}, [{"kind": "bad_utf8", "file": "a.txt", "line": 3, "detail": ""}])
CLEAN = CleanResult(4, "web", DocCounts(10, 900), {"min_length": {"removed_docs": 2}},
                    DocCounts(8, 700), BAD, [0, 5, 8])
RESULTS = [
    CLEAN,
    DedupResult(1, 2, 60, {"4": 2}),
    EncodeResult(4, {"train": SplitTokens(7, 300), "val": SplitTokens(1, 40)}, [0, 3, 5]),
    EncodeResult(4, {"train": SplitTokens(7, 300)}, [1], clean=CLEAN, node="abc"),
    ExamplesResult(2, 12, {"train": ExampleSplit(10, 200, 0, {"pos": 6, "neg": 4})}, BAD),
    ChunkLabels(["neg", "pos"]),
]


def test_every_result_round_trips_through_its_json_marker(tmp_path) -> None:
    for i, result in enumerate(RESULTS):
        marker = tmp_path / f"{i}.json"
        durable.write_json(marker, result.to_dict())
        assert read_result(marker, type(result).from_dict) == result


def test_a_marker_of_another_layout_is_not_done_and_removed(tmp_path) -> None:
    marker = tmp_path / "000004.json"
    older = {**CLEAN.to_dict(), "task": 4}  # the layout before read chunks
    del older["chunk"]
    marker.write_text(json.dumps(older))
    assert read_result(marker, CleanResult.from_dict) is None
    assert not marker.exists()
