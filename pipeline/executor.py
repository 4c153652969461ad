"""Who runs the phase items: in-process (unit tests) or Ray (local or an existing cluster).

Both executors expose the same calls: `map(fn, items, ...)` for phases made of plain
items (results in item order); `encode_stream(fn, items, ctx)` for the tokenizer phase, which
under Ray is a Ray Data `map_batches` over an actor pool (each actor loads the
sentencepiece model once) yielding results as they finish; and `submit`/`collect` for
shard writes that run while encoding goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.pipeline.phases import WorkContext
from lmforge.pipeline.tokenizer import DocumentEncoder

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
        self, fn: Callable[..., dict], items: list[Any], ctx: WorkContext
    ) -> Iterator[dict]:
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


class EncodeActor:
    """Ray Data actor: holds one sentencepiece model, encodes whole read tasks."""

    def __init__(self, fn: Callable[..., dict], ctx: WorkContext) -> None:
        self.fn, self.ctx = fn, ctx
        self.encoder = DocumentEncoder(ctx.tokenizer_model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        results = []
        for index, item in zip(batch["index"], batch["item"], strict=True):
            try:
                result = self.fn(pickle.loads(item), self.ctx, self.encoder)
            except ValueError as err:  # bad input or config: hand it to the driver as is
                result = {"error": pickle.dumps(err).hex()}
            results.append(json.dumps({**result, "node": node, "index": int(index)}))
        return {"result": np.array(results, dtype=object)}


class PhaseWorker:
    """A Ray actor that runs phase items (clean, dedup, sample) and shard writes.

    One pool of them serves every phase: a Ray task per item would need fresh worker
    processes for each phase and run (Ray culls idle workers while the encoder actors
    run), and each costs ~1 s of CPU to start.
    """

    def run(self, fn: Callable[..., Any], item: Any, *args: Any) -> Any:
        return fn(item, *args)


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
    """Runs phase items and shard writes on a pool of `PhaseWorker` actors, and the encode
    phase as Ray Data `map_batches` on an actor pool.

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
        # Encoders must not take every CPU or the Ray Data input task starves (FACTS.md).
        self.actor_cpus = min(1.0, max(0.05, (cpus - 0.5) / self.workers))
        self.pool: list[Any] = []
        self._nodes: list[str] = []  # node id of each pool actor
        self._load: list[int] = []  # calls in flight on each pool actor

    def _node_cpus(self) -> dict[str, float]:
        nodes = sorted(
            (n["NodeID"], n["Resources"].get("CPU", 0.0))
            for n in self.ray.nodes() if n.get("Alive")
        )
        return {node: cpus for node, cpus in nodes if cpus > 0} or {nodes[0][0]: 1.0}

    def _grow_pool(self, size: int) -> None:
        """Start phase workers until there are `size`, placed over the nodes in proportion
        to their CPUs. They reserve no CPU, so they stay beside the encoders; the executor
        bounds how many items run at once."""
        if len(self.pool) >= size:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        wanted = spread_over_nodes(self._node_cpus(), size)
        for node in dict.fromkeys(wanted):  # in node order
            missing = wanted.count(node) - self._nodes.count(node)
            for _ in range(max(0, missing)):
                placement = NodeAffinitySchedulingStrategy(node, soft=True)
                # Not restarted: a failed item fails the phase, and a rerun resumes it.
                actor = self.ray.remote(num_cpus=0, scheduling_strategy=placement,
                                        max_restarts=0)(PhaseWorker)
                self.pool.append(actor.remote())
                self._nodes.append(node)
                self._load.append(0)

    def _shrink_pool(self, size: int) -> None:
        """Stop phase workers beyond `size`, keeping one on every node that has one (only
        between phases: `submit` handles hold pool positions)."""
        if len(self.pool) <= size or any(self._load):
            return
        first_on_node: dict[str, int] = {}
        for i, node in enumerate(self._nodes):
            first_on_node.setdefault(node, i)
        others = [i for i in range(len(self.pool)) if i not in first_on_node.values()]
        keep = sorted([*first_on_node.values(), *others[: max(0, size - len(first_on_node))]])
        for i in set(range(len(self.pool))) - set(keep):
            self.pool[i].__ray_terminate__.remote()
        self.pool = [self.pool[i] for i in keep]
        self._nodes = [self._nodes[i] for i in keep]
        self._load = [self._load[i] for i in keep]

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
        self.pool, self._nodes, self._load = [], [], []

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
        self, fn: Callable[..., dict], items: list[Any], ctx: WorkContext
    ) -> Iterator[dict]:
        """`fn(item, ctx, encoder)` for every item, by Ray Data `map_batches` on an actor pool
        of `workers` actors, yielding each result as soon as it is done.

        A ValueError in `fn` (bad input in strict mode, a config problem) is raised here as
        itself, with its file:line message, rather than wrapped in Ray's task errors; when
        several items fail, the earliest in item order.
        """
        if not items:
            return
        # The shard writers: the phase workers already running (one per node is enough
        # beside the encoders), or new ones starting up alongside the encoders.
        writers = self.phase_workers()
        self._shrink_pool(writers)
        self._grow_pool(writers)
        from ray.data import ActorPoolStrategy, DataContext

        data_context = DataContext.get_current()
        bars, data_context.enable_progress_bars = data_context.enable_progress_bars, False
        data_context.print_on_execution_start = False
        # By default Ray Data hands items to whichever actors are up: on a small job the
        # first actor can finish everything before the others (on other nodes) have started.
        # The pool is sized to what the cluster has, so wait for all of it.
        min_actors_wait = data_context.wait_for_min_actors_s
        data_context.wait_for_min_actors_s = _POOL_START_TIMEOUT_S
        dataset = self.ray.data.from_items(
            [{"item": pickle.dumps(item), "index": i} for i, item in enumerate(items)],
            override_num_blocks=len(items),
        )
        with warnings.catch_warnings():
            # max_restarts still goes through the deprecated **ray_remote_args (Ray 2.60); a
            # restartable actor would make Ray log an error about its constructor argument.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            encoded = dataset.map_batches(
                EncodeActor,
                fn_constructor_kwargs={"fn": fn, "ctx": ctx},
                batch_size=1,
                compute=ActorPoolStrategy(size=min(self.workers, len(items))),
                num_cpus=self.actor_cpus,
                # A failed actor is not restarted: the phase is resumable, rerun instead.
                max_restarts=0,
            )
        # Ray Data logs execution banners at INFO/WARNING; our own bar says enough.
        data_logger = logging.getLogger("ray.data")
        level = data_logger.level
        data_logger.setLevel(logging.ERROR)
        try:
            failed = _FirstError()  # after a bad item, results are no longer handed on
            with _bar(len(items), "encode", self.progress) as bar:
                for row in encoded.iter_rows():
                    result = json.loads(row["result"])
                    index = result.pop("index")
                    error = None
                    if "error" in result:
                        error = pickle.loads(bytes.fromhex(result["error"]))
                    if error is None and not failed:
                        yield result
                        bar.update()
                    failed.finish(index, error)
                    failed.raise_when_settled()
        except self.ray.exceptions.GetTimeoutError as err:
            raise RuntimeError(
                f"encode: the {min(self.workers, len(items))} encoder actors did not all start "
                f"within {_POOL_START_TIMEOUT_S} s ({err}); check that every Ray node is alive "
                "(`ray status`) or set data.num_workers to what the cluster can hold"
            ) from err
        finally:
            data_logger.setLevel(level)
            data_context.enable_progress_bars = bars
            data_context.wait_for_min_actors_s = min_actors_wait


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use a running Ray if initialised; else connect to `address`, or start a local Ray.

    Ray is shut down on exit only if this function started or connected it.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True)
    except ConnectionError as err:
        raise ValueError(
            f"ray_address: cannot connect to Ray at {address!r} ({err}); start the cluster "
            "or set data.ray_address to null for a local Ray"
        ) from err
    try:
        yield
    finally:
        ray.shutdown()
