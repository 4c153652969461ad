"""Run by test_callbacks.py as one training rank: a recording Callback on the real engine.

    python callback_probe.py CONFIG RUN_DIR OUT_JSON     (RANK, WORLD_SIZE, MASTER_* set)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed

from lmforge.launch.config import load_config
from lmforge.launch.config.dataset_check import config_for_dataset, read_prepared
from lmforge.launch.rundir import RunDir
from lmforge.launch.train.build import build_trainer
from lmforge.launch.train.callbacks import Callback


class Recorder(Callback):
    """Writes down every event with what it received."""

    def __init__(self) -> None:
        self.events: list[list] = []

    def on_train_start(self, trainer) -> None:
        self.events.append(["train_start", trainer.state.step])

    def on_step_end(self, trainer, result) -> None:
        self.events.append(["step_end", trainer.state.step, result.loss > 0, result.tokens])

    def on_eval(self, trainer, metrics) -> None:
        self.events.append(["eval", trainer.state.step, sorted(metrics)])

    def on_checkpoint(self, trainer, folder: Path) -> None:
        self.events.append(["checkpoint", trainer.state.step, folder.name,
                            (folder / "COMPLETE").is_file()])

    def on_train_end(self, trainer) -> None:
        self.events.append(["train_end", trainer.state.step])


def main(config: str, run_dir: str, out: str) -> None:
    cfg = load_config(Path(config), [f"--run_dir={run_dir}"])
    manifest = read_prepared(cfg.data)
    cfg = config_for_dataset(cfg, manifest)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    recorder = Recorder()
    trainer = build_trainer(cfg, manifest, RunDir.of(run_dir), [recorder])
    trainer.fit()
    Path(out).write_text(json.dumps(recorder.events))


if __name__ == "__main__":
    main(*sys.argv[1:4])
