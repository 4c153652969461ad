"""RayExecutor on a real local Ray (2 CPUs): phase items run `num_workers` at a time on one
pool of phase workers; placement over nodes follows their CPUs."""

from __future__ import annotations

import os
import time

import pytest

from lmforge.pipeline.executor import RayExecutor, spread_over_nodes


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, *_ in spans] + [(end, -1) for _, end, _ in spans])
    running = peak = 0
    for _, step in events:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("workers", [1, 2])
def test_phase_items_run_at_most_num_workers_at_once(ray_cluster, workers: int) -> None:
    def item(seconds: float) -> tuple[float, float, int]:  # a closure: pickled by value
        start = time.time()
        time.sleep(seconds)
        return start, time.time(), os.getpid()

    executor = RayExecutor(num_workers=workers, progress=False)
    try:
        first = executor.map(item, [0.3] * 4, "test")
        second = executor.map(item, [0.3] * 4, "test")
    finally:
        executor.close()
    assert [len(r) for r in (first, second)] == [4, 4]
    # Two CPUs, so one-CPU Ray tasks would run two at a time even with num_workers=1.
    assert max(_max_overlap(first), _max_overlap(second)) <= workers
    # Both phases ran on the same `workers` processes: no process start per phase.
    assert len({pid for *_, pid in first + second}) == workers
    if workers == 1:
        assert first[-1][1] - first[0][0] >= 4 * 0.3  # one after another


def test_shard_writers_are_the_phase_workers_already_running(ray_cluster) -> None:
    executor = RayExecutor(num_workers=2, progress=False)
    try:
        executor.map(lambda _: os.getpid(), [0, 1], "test")
        assert len(executor.pool) == 2
        executor._shrink_pool(executor.phase_workers())  # what the encode phase does
        assert len(executor.pool) == 1  # one node, two encoders: one writer
        pid = executor.collect([executor.submit(lambda _: os.getpid(), 0)], "test")[0]
        assert pid in executor.map(lambda _: os.getpid(), [0], "test")
    finally:
        executor.close()


def test_workers_are_spread_over_nodes_by_cpus() -> None:
    assert spread_over_nodes({"a": 1, "b": 1}, 2) == ["a", "b"]
    assert spread_over_nodes({"a": 4, "b": 1}, 5) == ["a"] * 4 + ["b"]
    assert spread_over_nodes({"a": 4, "b": 2}, 3) == ["a", "a", "b"]
    assert spread_over_nodes({"a": 1, "b": 1}, 1) == ["a"]  # ties go to the first node
    assert spread_over_nodes({"a": 3, "b": 3, "c": 2}, 4) == ["a", "a", "b", "c"]
    for count in range(1, 12):
        assert len(spread_over_nodes({"a": 3, "b": 5, "c": 1}, count)) == count


def test_the_earliest_bad_item_is_reported_whichever_fails_first(ray_cluster) -> None:
    def item(index: int) -> int:
        if index == 1:  # the earliest bad item fails last
            time.sleep(0.5)
            raise ValueError("item 1: bad")
        if index == 2:
            raise ValueError("item 2: bad")
        return index

    executor = RayExecutor(num_workers=2, progress=False)
    try:
        with pytest.raises(ValueError, match="item 1: bad"):
            executor.map(item, [0, 1, 2, 3, 4], "test")
    finally:
        executor.close()
