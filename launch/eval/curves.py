"""A run's curves as one PNG, and its task scores as summary lines.

The PNG (``RunDir.curves``, also an MLflow artifact) has one panel per family of metrics,
each against tokens seen: train and validation loss; bits per byte of each validation
dataset; each task's ``acc`` (and ``acc_norm``), with its chance level dashed. The values
come from the run's ``metrics.jsonl`` (exact floats, written by rank 0), so the picture needs
no MLflow. Drawn with matplotlib's ``Figure`` on the Agg canvas (no pyplot, no display).
"""

from __future__ import annotations

import bisect
import io
import json
from pathlib import Path

from lmforge.pipeline.durable import write_atomic


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` (each a ``step`` and metrics); [] when absent."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _tokens_at(records: list[dict[str, float]]):
    """step → tokens seen, from the logged ``train/tokens_seen`` (linear in between; the
    last known rate past the end)."""
    known = sorted({int(r["step"]): r["train/tokens_seen"] for r in records
                    if "train/tokens_seen" in r}.items())
    steps = [s for s, _ in known]

    def tokens(step: int) -> float:
        if not known:
            return float(step)
        i = bisect.bisect_left(steps, step)
        if i < len(known) and steps[i] == step:
            return known[i][1]
        (s0, t0), (s1, t1) = (known[max(i - 1, 0)], known[min(i, len(known) - 1)]) \
            if len(known) > 1 else ((0, 0.0), known[0])
        if s1 == s0:
            s0, t0 = 0, 0.0
        return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)

    return tokens


def _series(records: list[dict[str, float]], key: str, tokens) -> tuple[list, list]:
    points = [(tokens(int(r["step"])), r[key]) for r in records if key in r]
    return [x for x, _ in points], [y for _, y in points]


def write_curves(metrics_jsonl: Path, out: Path, title: str = "") -> Path | None:
    """Draws the run's curves into ``out`` (see the module docstring); None when the run
    logged nothing yet."""
    records = read_metrics(metrics_jsonl)
    if not records:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({k for r in records for k in r})
    bpb = [k for k in keys if k.startswith("val/") and k.endswith("/bpb")]
    tasks = sorted({k.split("/")[1] for k in keys if k.startswith("eval/")
                    and k.endswith("/acc")})
    panels = 1 + bool(bpb) + len(tasks)
    fig = Figure(figsize=(5 * min(panels, 3), 3.4 * -(-panels // 3)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(-(-panels // 3), min(panels, 3), squeeze=False).ravel()
    tokens = _tokens_at(records)
    ax = axes[0]
    for key, label in (("train/loss", "train"), ("val/loss", "validation")):
        x, y = _series(records, key, tokens)
        if x:
            ax.plot(x, y, marker="o" if key == "val/loss" else None, markersize=3, label=label)
    ax.set_title("loss (nats per token)")
    ax.legend(fontsize=7)
    at = 1
    if bpb:
        ax = axes[at]
        at += 1
        for key in bpb:
            ax.plot(*_series(records, key, tokens), marker="o", markersize=3,
                    label=key.removeprefix("val/").removesuffix("/bpb"))
        ax.set_title("validation bits per byte")
        ax.legend(fontsize=7)
    for task in tasks:
        ax = axes[at]
        at += 1
        for metric in ("acc", "acc_norm"):
            x, y = _series(records, f"eval/{task}/{metric}", tokens)
            if x:
                ax.plot(x, y, marker="o", markersize=3, label=metric)
        chance = [r[f"eval/{task}/chance"] for r in records if f"eval/{task}/chance" in r]
        if chance:
            ax.axhline(chance[-1], linestyle="--", color="grey", label="chance")
        ax.set_ylim(0, 1)
        ax.set_title(f"{task}")
        ax.legend(fontsize=7)
    for ax in axes[:panels]:
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
    for ax in axes[panels:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80, metadata={"Software": None})
    write_atomic(out, png.getvalue())
    return out


def score_lines(metrics: dict[str, float]) -> list[str]:
    """One line per task of a run's final metrics: its scores and chance level, e.g.
    ``next_line   acc 0.4100  acc_norm 0.3900  (chance 0.25)``; and each dataset's bpb."""
    lines = []
    tasks = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/")})
    for task in tasks:
        values = {k.split("/")[2]: v for k, v in metrics.items()
                  if k.startswith(f"eval/{task}/")}
        chance = values.pop("chance", None)
        shown = "  ".join(f"{name} {values[name]:.4f}" for name in
                          ("acc", "acc_norm", "acc_bytes", "loglikelihood") if name in values)
        note = f"  (chance {chance:.2f})" if chance is not None else \
            "  (chance ~0: exact greedy tokens)" if "loglikelihood" in values else ""
        lines.append(f"{task:<16} {shown}{note}")
    for key in sorted(k for k in metrics if k.startswith("val/") and k.endswith("/bpb")):
        name = key.removeprefix("val/").removesuffix("/bpb")
        lines.append(f"{name:<16} bpb {metrics[key]:.4f}")
    return lines
