"""Connected components of a graph too big for one node: alternating large-star and
small-star rounds over edges partitioned by node (Kiveris et al., "Connected Components in
MapReduce and Beyond", SoCC 2014).

The graph is held as directed rows ``(node, other)``, each undirected edge twice, and a
round's work item sees only the rows of the nodes of one partition (``node % partitions``):
every node's neighbourhood, nothing else. Per node ``u`` with neighbours ``N(u)``:

- large-star: ``m = min(N(u) ∪ {u})``; each neighbour ``v > u`` is linked to ``m`` instead;
- small-star: ``m = min({v ∈ N(u): v < u} ∪ {u})``; each smaller neighbour and ``u`` itself
  are linked to ``m``.

Both keep the components and shrink their depth; when a large-star round and a small-star
round in a row change nothing, every component is a star whose centre is its smallest node,
and each other node has exactly one smaller neighbour: the centre. The smallest node does
not depend on the partitions, the round order or the workers, so neither does the result.
Each function here works on one partition's rows and returns the rows it emits (both
directions) with the number of nodes it changed; the caller routes rows to partitions.
"""

from __future__ import annotations

import numpy as np

EDGE_ROW = np.dtype([("node", "<u8"), ("other", "<u8")])


def edge_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows of the undirected edges {a[i], b[i]}, both directions, self-loops left out."""
    keep = a != b
    a, b = a[keep], b[keep]
    rows = np.zeros(2 * len(a), EDGE_ROW)
    rows["node"] = np.concatenate([a, b])
    rows["other"] = np.concatenate([b, a])
    return rows


def _groups(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by (node, other): the index of each row's node group, and the first
    row of each group (which holds the node's smallest neighbour)."""
    firsts = np.flatnonzero(np.concatenate([[True], rows["node"][1:] != rows["node"][:-1]]))
    group = np.repeat(np.arange(len(firsts)), np.diff(np.append(firsts, len(rows))))
    return group, firsts


def large_star(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """One large-star step over a partition's distinct rows, sorted by (node, other).

    Returns:
        (rows emitted, both directions; nodes whose larger neighbours moved to a smaller
        centre).
    """
    if not len(rows):
        return np.zeros(0, EDGE_ROW), 0
    group, firsts = _groups(rows)
    centre = np.minimum(rows["node"][firsts], rows["other"][firsts])[group]
    larger = rows["other"] > rows["node"]
    moved = larger & (centre < rows["node"])
    changed = len(np.unique(rows["node"][moved]))
    return edge_rows(rows["other"][larger], centre[larger]), changed


def small_star(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """One small-star step over a partition's distinct rows, sorted by (node, other).

    Returns:
        (rows emitted, both directions; nodes that had more than one smaller neighbour).
    """
    smaller = rows[rows["other"] < rows["node"]]
    if not len(smaller):
        return np.zeros(0, EDGE_ROW), 0
    group, firsts = _groups(smaller)
    centre = smaller["other"][firsts]  # the smallest of the smaller neighbours
    sizes = np.diff(np.append(firsts, len(smaller)))
    nodes = np.concatenate([smaller["other"], smaller["node"][firsts]])
    centres = np.concatenate([centre[group], centre])
    return edge_rows(nodes, centres), int((sizes > 1).sum())


def distinct_rows(parts: list[np.ndarray]) -> np.ndarray:
    """The distinct rows of `parts`, sorted by (node, other)."""
    if not parts:
        return np.zeros(0, EDGE_ROW)
    return np.unique(np.concatenate(parts))


def leaves(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """After convergence: (nodes that have a smaller neighbour, that neighbour — the
    smallest node of their component), for a partition's distinct sorted rows."""
    smaller = rows[rows["other"] < rows["node"]]
    if len(np.unique(smaller["node"])) != len(smaller):
        raise RuntimeError("near_dedup: the components did not converge to stars; this is "
                           "a bug, please report it with the work folder (data.keep_work)")
    return smaller["node"].copy(), smaller["other"].copy()
