"""What evaluation inside training costs the tiny run: `lmforge run configs/tiny.yaml` with
its `eval:` section (the bundled tasks, bits per byte) vs the same run without it.

    .venv/bin/python benchmarks/eval.py [--quick] [--pairs N]

The data is prepared once first (both runs then skip `prepare`), then the two runs alternate
(without, with) `--pairs` times, each a whole `lmforge run` (start-up, training at the default
`train.eval_every`, export, samples) in its own run directory. Prints
`BENCH {"metric": "eval_overhead_tiny", ...}`: median over pairs of (wall with eval) / (wall
without) - 1 (lower is better, goal <= 0.10). `--quick` trains 100 steps instead of 300 (one
evaluation, at the end). The detail also gives the seconds rank 0 spent scoring tasks (its
log lines) over the plain run's wall (`scoring_share`): on a loaded shared machine the two
walls move by more than evaluation costs, that share much less.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
NO_EVAL = ["--eval.tasks={}", "--eval.bpb=false"]


def lmforge_run(run_dir: Path, data: Path, extra: list[str]) -> tuple[float, float]:
    """Wall seconds of one `lmforge run` of the tiny config, and the seconds its rank 0
    spent scoring `eval.tasks` (the log lines `eval.tasks: N examples scored in S s`)."""
    command = [sys.executable, "-m", "lmforge.launch.cli", "run", str(TINY),
               f"--run_dir={run_dir}", f"--data.output_dir={data}",
               "--tracking.experiment=bench-eval", *extra]
    began = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(f"lmforge run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    scored = re.findall(r"eval\.tasks: \d+ examples scored in ([\d.]+) s",
                        proc.stdout + proc.stderr)
    return wall, sum(map(float, scored))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 steps instead of 300")
    parser.add_argument("--pairs", type=int, default=1, help="(without, with) runs to time")
    args = parser.parse_args()
    steps = ["--train.max_steps=100"] if args.quick else []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        data = Path(tmp) / "data"
        prepare = subprocess.run(
            [sys.executable, "-m", "lmforge.launch.cli", "prepare", str(TINY),
             f"--data.output_dir={data}"], cwd=REPO, capture_output=True, text=True)
        if prepare.returncode != 0:
            sys.exit(f"lmforge prepare failed:\n{prepare.stderr[-3000:]}")
        without, with_eval, scoring, evaluated = [], [], [], {}
        for pair in range(args.pairs):
            without.append(lmforge_run(Path(tmp) / f"plain{pair}", data, steps + NO_EVAL)[0])
            run = Path(tmp) / f"eval{pair}"
            wall, seconds = lmforge_run(run, data, steps)
            with_eval.append(wall)
            scoring.append(seconds)
            evaluated = json.loads((run / "train_summary.json").read_text())["val_metrics"]
            print(f"pair {pair}: without eval {without[-1]:.1f} s, with eval "
                  f"{with_eval[-1]:.1f} s (task scoring {seconds:.1f} s of it)", flush=True)
    overhead = statistics.median(w / p - 1 for w, p in zip(with_eval, without, strict=True))
    scores = {k: round(v, 4) for k, v in evaluated.items()
              if k.startswith("eval/") or k.endswith("/bpb")}
    print("BENCH " + json.dumps({
        "metric": "eval_overhead_tiny", "value": round(overhead, 4), "goal": 0.10,
        "detail": {"wall_ratio": round(overhead + 1, 4),
                   "wall_without_s": [round(x, 1) for x in without],
                   "wall_with_s": [round(x, 1) for x in with_eval],
                   "task_scoring_s": [round(x, 1) for x in scoring],
                   # load-proof: scoring time over the plain run's wall, same machine state
                   "scoring_share": round(statistics.median(
                       s / w for s, w in zip(scoring, without, strict=True)), 4),
                   "steps": 100 if args.quick else 300, "scores_at_end": scores}}))


if __name__ == "__main__":
    main()
