"""Who runs the phase items: in-process (unit tests) or Ray (local or an existing cluster).

Both executors expose the same calls: `map(fn, items, ...)` for phases made of plain
items (results in item order); `encode_stream(fn, items, ctx)` for the tokenizer phase,
yielding results as they finish (under Ray each worker loads the sentencepiece model once);
and `submit`/`collect` for shard writes that run while encoding goes on. Under Ray all of
them run on one pool of `PhaseWorker` actors.

The Ray they run on comes from `local_ray.ray_session` (a cluster, or a lean local Ray).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

from lmforge.pipeline.prepare.phases import WorkContext
from lmforge.pipeline.prepare.stats import load_plotting
from lmforge.pipeline.prepare.tokenizer import DocumentEncoder

# An encode item's result: a dataclass with a `node` field (results.EncodeResult,
# results.ExamplesResult) that a Ray worker fills in with its node id.
R = TypeVar("R")
_ENCODERS_PER_WRITER = 16
_POOL_START_TIMEOUT_S = 600


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=f"prepare {desc}", unit="item", disable=not enabled,
                dynamic_ncols=True, leave=True)


class LocalExecutor:
    """Runs every item in this process, in order (for tests and tiny corpora)."""

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress
        self.workers = 1

    def map(self, fn: Callable[..., Any], items: list[Any], desc: str, *args: Any) -> list[Any]:
        """Apply `fn(item, *args)` to every item."""
        results = []
        with _bar(len(items), desc, self.progress) as bar:
            for item in items:
                results.append(fn(item, *args))
                bar.update()
        return results

    def encode_stream(
        self, fn: Callable[..., R], items: list[Any], ctx: WorkContext
    ) -> Iterator[R]:
        """`fn(item, ctx, encoder)` for every item with one encoder, yielding each result."""
        encoder = DocumentEncoder(ctx.tokenizer_model) if items else None
        with _bar(len(items), "encode", self.progress) as bar:
            for item in items:
                yield fn(item, ctx, encoder)
                bar.update()

    def submit(self, fn: Callable[..., Any], item: Any, *args: Any) -> Any:
        """Run `fn(item, *args)` now; `collect` returns the results."""
        return fn(item, *args)

    def collect(self, handles: list[Any], desc: str) -> list[Any]:
        """Results of `submit` calls, in submission order."""
        return list(handles)


class _FirstError:
    """The error of the earliest failed item, in item order, raised once every item before
    it has finished: the user sees the corpus's first bad input (file:line) whichever
    worker happens to report first."""

    def __init__(self) -> None:
        self.errors: dict[int, Exception] = {}
        self.finished: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.errors)

    def finish(self, index: int, error: Exception | None = None) -> None:
        """Record that item `index` finished (with `error`, if it failed)."""
        self.finished.add(index)
        if error is not None:
            self.errors[index] = error

    def raise_when_settled(self) -> None:
        """Raise the earliest error once no earlier item is still running."""
        if self.errors:
            first = min(self.errors)
            if all(i in self.finished for i in range(first)):
                raise self.errors[first]


class PhaseWorker:
    """A Ray actor that runs phase items (clean, dedup, tokenizer text), encode items and
    shard writes.

    One pool of them serves every phase: a Ray remote function per item would need fresh
    worker processes for each phase and run, and each process costs ~1 s of CPU to start.
    For the encode phase each loads the sentencepiece model once, on its first encode item.

    A plain actor pool rather than Ray Data: the encode phase hands out a few dozen small
    items whose results are small dicts (the tokens go to disk), which needs none of Ray
    Data's blocks, while Ray Data costs every run `import ray.data` in the driver and in
    each encoder, three actors of its own (stats, autoscaling coordinator, actor
    locations) and encoders apart from the pool: ~3 s of wall time on 2 cores.
    """

    def __init__(self) -> None:
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        # The run's last step draws its plots here; the import is done by then.
        threading.Thread(target=load_plotting, daemon=True).start()
        self.encoder: DocumentEncoder | None = None
        self.model = ""

    def ready(self) -> bool:
        return True

    def run(self, fn: Callable[..., Any], item: Any, *args: Any) -> Any:
        return fn(item, *args)

    def encode(self, fn: Callable[..., R], item: Any, ctx: WorkContext) -> R:
        if self.encoder is None or self.model != ctx.tokenizer_model:
            self.encoder, self.model = DocumentEncoder(ctx.tokenizer_model), ctx.tokenizer_model
        return dataclasses.replace(fn(item, ctx, self.encoder), node=self.node)


def spread_over_nodes(node_cpus: dict[str, float], count: int) -> list[str]:
    """`count` workers placed over nodes in proportion to their CPUs (largest remainder,
    ties to the node listed first): the node of each worker, grouped by node."""
    total = sum(node_cpus.values())
    quotas = {node: count * cpus / total for node, cpus in node_cpus.items()}
    shares = {node: int(quota) for node, quota in quotas.items()}
    by_remainder = sorted(quotas, key=lambda node: shares[node] - quotas[node])
    for node in by_remainder[: count - sum(shares.values())]:
        shares[node] += 1
    return [node for node, share in shares.items() for _ in range(share)]


class RayExecutor:
    """Runs phase items, encode items and shard writes on one pool of `PhaseWorker`
    actors.

    Args:
        num_workers: Encoder actors and phase workers; 0 = one per CPU of the cluster.
        progress: Show a progress bar per phase.
    """

    def __init__(self, num_workers: int = 0, progress: bool = True) -> None:
        import ray

        self.ray = ray
        self.progress = progress
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self.workers = num_workers or max(1, int(cpus))
        # What each pool actor reserves: the pool (`workers` actors) leaves half a CPU of
        # the cluster to the driver and Ray's own processes.
        self.actor_cpus = min(1.0, max(0.05, (cpus - 0.5) / self.workers))
        self.pool: list[Any] = []
        self._nodes: list[str] = []  # node id of each pool actor
        self._load: list[int] = []  # calls in flight on each pool actor
        self._started: list[Any] = []  # a ref per pool actor, ready once it has started

    def _node_cpus(self) -> dict[str, float]:
        nodes = sorted(
            (n["NodeID"], n["Resources"].get("CPU", 0.0))
            for n in self.ray.nodes() if n.get("Alive")
        )
        return {node: cpus for node, cpus in nodes if cpus > 0} or {nodes[0][0]: 1.0}

    def _grow_pool(self, size: int) -> None:
        """Start phase workers until there are `size`, placed over the nodes in proportion
        to their CPUs, each reserving `actor_cpus`; the executor bounds how many items run
        at once."""
        if len(self.pool) >= size:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        wanted = spread_over_nodes(self._node_cpus(), size)
        for node in dict.fromkeys(wanted):  # in node order
            missing = wanted.count(node) - self._nodes.count(node)
            for _ in range(max(0, missing)):
                placement = NodeAffinitySchedulingStrategy(node, soft=True)
                # Not restarted: a failed item fails the phase, and a rerun resumes it.
                actor = self.ray.remote(num_cpus=self.actor_cpus, max_restarts=0,
                                        scheduling_strategy=placement)(PhaseWorker).remote()
                self.pool.append(actor)
                self._started.append(actor.ready.remote())
                self._nodes.append(node)
                self._load.append(0)

    def phase_workers(self) -> int:
        """How many shard writers: one per node, and one per 16 encoders at least.

        A writer packs and writes ~100 MB/s of tokens, an encoder produces ~3 MB/s, so one
        writer keeps up with many encoders; each extra process costs ~1 s of CPU to start.
        """
        nodes = len(self._node_cpus())
        return max(1, min(self.workers, max(nodes, -(-self.workers // _ENCODERS_PER_WRITER))))

    def close(self) -> None:
        """Stop the phase workers."""
        for actor in self.pool:
            actor.__ray_terminate__.remote()  # graceful; ray.kill makes Ray print a trace
        self.pool, self._nodes, self._load, self._started = [], [], [], []

    def _call(self, fn: Callable[..., Any], item: Any, *args: Any) -> tuple[Any, int]:
        index = min(range(len(self.pool)), key=self._load.__getitem__)
        self._load[index] += 1
        return self.pool[index].run.remote(fn, item, *args), index

    def map(self, fn: Callable[..., Any], items: list[Any], desc: str, *args: Any) -> list[Any]:
        """Apply `fn(item, *args)` to every item on `workers` phase workers, one item at a
        time each; each has a second item queued, so it starts the next one without waiting
        for the driver."""
        ray = self.ray
        self._grow_pool(self.workers)
        arg_refs = [ray.put(a) for a in args]
        results: list[Any] = [None] * len(items)
        pending: dict[Any, tuple[int, int]] = {}
        failed = _FirstError()  # after a bad item, no new items; the earliest error is raised
        next_item = 0
        with _bar(len(items), desc, self.progress) as bar:
            while (next_item < len(items) and not failed) or pending:
                while next_item < len(items) and not failed and min(self._load) < 2:
                    ref, worker = self._call(fn, items[next_item], *arg_refs)
                    pending[ref] = (next_item, worker)
                    next_item += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    item, worker = pending.pop(ref)
                    self._load[worker] -= 1
                    error = None
                    try:
                        results[item] = self._get(ref)
                    except ValueError as err:  # bad input or config, as raised by the item
                        error = err
                    failed.finish(item, error)
                    bar.update()
                failed.raise_when_settled()
        return results

    def _get(self, ref: Any) -> Any:
        """`ray.get`, re-raising a user-facing error (bad input, config) as itself."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, ValueError):
                raise err.cause from None
            raise

    def submit(self, fn: Callable[..., Any], item: Any, *args: Any) -> Any:
        """Queue `fn(item, *args)` on the least busy phase worker; `collect` gets results."""
        if not self.pool:  # else the phase workers already running write the shards
            self._grow_pool(self.phase_workers())
        return self._call(fn, item, *args)

    def collect(self, handles: list[Any], desc: str) -> list[Any]:
        """Results of `submit` calls, in submission order."""
        ray = self.ray
        refs = [ref for ref, _ in handles]
        results: dict[Any, Any] = {}
        pending = list(refs)
        with _bar(len(refs), desc, self.progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                results[done[0]] = self._get(done[0])
                bar.update()
        for _, worker in handles:
            self._load[worker] -= 1
        return [results[r] for r in refs]

    def encode_stream(
        self, fn: Callable[..., R], items: list[Any], ctx: WorkContext
    ) -> Iterator[R]:
        """`fn(item, ctx, encoder)` for every item on the `workers` phase workers (each
        loads the sentencepiece model once), yielding each result as soon as it is done.
        Shard writes submitted meanwhile run on the same workers, between encode items.

        Every worker has up to two encode items queued, so the items are shared over the
        whole pool even when some workers start later than others (on other nodes), and
        each starts its next item without waiting for the driver. A ValueError in `fn` (bad
        input in strict mode, a config problem) is raised here as itself, with its
        file:line message, rather than wrapped in Ray's `RayTaskError`; when several items
        fail, the earliest in item order.
        """
        if not items:
            return
        ray = self.ray
        self._grow_pool(self.workers)
        ctx_ref = ray.put(ctx)
        encoding = [0] * len(self.pool)  # encode items in flight per worker
        pending: dict[Any, tuple[int, int]] = {}
        failed = _FirstError()  # after a bad item, results are no longer handed on
        next_item = 0
        with _bar(len(items), "encode", self.progress) as bar:
            while (next_item < len(items) and not failed) or pending:
                while next_item < len(items) and not failed and min(encoding) < 2:
                    free = [i for i, n in enumerate(encoding) if n < 2]
                    worker = min(free, key=self._load.__getitem__)  # writes count too
                    encoding[worker] += 1
                    self._load[worker] += 1
                    ref = self.pool[worker].encode.remote(fn, items[next_item], ctx_ref)
                    pending[ref] = (next_item, worker)
                    next_item += 1
                done, _ = ray.wait(list(pending), num_returns=1, timeout=_POOL_START_TIMEOUT_S)
                if not done:
                    self._check_started()
                for ref in done:
                    item, worker = pending.pop(ref)
                    encoding[worker] -= 1
                    self._load[worker] -= 1
                    error = None
                    try:
                        result = self._get(ref)
                    except ValueError as err:  # bad input or config, raised by the item
                        error = err
                    if error is None and not failed:
                        yield result
                        bar.update()
                    failed.finish(item, error)
                failed.raise_when_settled()

    def _check_started(self) -> None:
        """After `_POOL_START_TIMEOUT_S` without a result: raise if some worker has not
        started (a cluster that cannot place the pool); else the items are just long."""
        done, _ = self.ray.wait(self._started, num_returns=len(self._started), timeout=0)
        if len(done) < len(self._started):
            raise RuntimeError(
                f"encode: {len(self._started) - len(done)} of the {len(self._started)} workers "
                f"did not start within {_POOL_START_TIMEOUT_S} s; check that every Ray node "
                "is alive (`ray status`) or set data.num_workers to what the cluster can hold"
            )
