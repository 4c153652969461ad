"""The stage graph's config: expansion of ``stages:`` into one RunConfig per stage, and the
errors that name ``stages[i].<key>`` with the file and line. No processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.launch.config import ConfigError, load_config
from lmforge.launch.config.stages import expand_stages

BASE = """\
name: job
run_dir: {run}
data:
  datasets: [{{name: d, paths: [x.txt]}}]
  output_dir: {run}/data
  seq_len: 32
tokenizer: {{vocab_size: 512}}
model: {{preset: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128}}
train: {{micro_batch_size: 4, max_steps: 10}}
tracking: {{experiment: e}}
hooks: [stage_hooks:record]
stages:
  - name: pretrain
  - name: anneal
    train:
      max_steps: 4
      lr_schedule: wsd
    init: {{optimizer: keep}}
  - name: other
    data:
      datasets: [{{name: e, paths: [y.txt]}}]
    hooks: [export]
"""


def write(tmp_path: Path, text: str = BASE) -> Path:
    path = tmp_path / "stages.yaml"
    path.write_text(text.format(run=tmp_path / "run"))
    return path


def test_expansion(tmp_path):
    cfg = load_config(write(tmp_path))
    stages = expand_stages(cfg)
    run = (tmp_path / "run").resolve()
    assert [s.name for s in stages] == ["pretrain", "anneal", "other"]
    assert [s.dir for s in stages] == [run / "stages/00-pretrain", run / "stages/01-anneal",
                                       run / "stages/02-other"]
    pre, anneal, other = (s.config for s in stages)
    # deep merge: the stage's keys change, the rest is the top level's
    assert (pre.train.max_steps, anneal.train.max_steps) == (10, 4)
    assert anneal.train.lr_schedule == "wsd" and anneal.train.micro_batch_size == 4
    # init: random for the first stage, the previous stage's checkpoints after it
    assert pre.init.source is None
    assert anneal.init.source == str(run / "stages/00-pretrain/checkpoints")
    assert anneal.init.optimizer == "keep"
    assert other.init.source == str(run / "stages/01-anneal/checkpoints")
    # a stage with its own data prepares into its directory with the first stage's tokenizer
    assert anneal.data.output_dir == pre.data.output_dir and anneal.tokenizer.model_path is None
    assert other.data.output_dir == str(run / "stages/02-other/data")
    assert other.tokenizer.model_path == str(Path(pre.data.output_dir).resolve()
                                             / "tokenizer.model")
    # hooks: the top level's, then the stage's; every stage logs to the job's store
    assert other.hooks == ["stage_hooks:record", "export"]
    assert {s.config.tracking.uri for s in stages} == {f"sqlite:///{run}/mlflow.db"}
    assert all(not s.config.stages for s in stages)
    scratch = stages[1].from_scratch()
    assert scratch.init.source is None and scratch.init.optimizer == "reset"
    assert scratch.run_dir == str(run / "stages/01-anneal/from_scratch")


def test_no_stages_is_unchanged(tmp_path):
    text = BASE.split("hooks:")[0]
    cfg = load_config(write(tmp_path, text))
    assert cfg.stages == [] and cfg.hooks == [] and expand_stages(cfg) == []


@pytest.mark.parametrize("override,key,message", [
    ("--stages.1.train.lr=-1", "stages[1].train.lr", "must be positive"),
    ("--stages.1.name=pretrain", "stages[1].name", "'pretrain' is used by stages[0] too"),
    ("--stages.1.name=a/b", "stages[1].name", "'a/b' is not a stage name"),
    ("--stages.0.init.source=previous", "stages[0].init.source", "the first stage has no"),
    ("--stages.2.hooks=[nope]", "stages[2].hooks", "'nope' is not a hook"),
    ("--hooks=[register]", "hooks", "register needs tracking.registered_model"),
])
def test_errors_name_the_stage_key(tmp_path, override, key, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path), [override])
    assert str(err.value).startswith(f"{key} (set by --") and message in str(err.value)


def test_errors_give_file_and_line(tmp_path):
    path = write(tmp_path, BASE.replace("lr_schedule: wsd", "lr_schedule: wavy"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:17: stages[1].train.lr_schedule: must be one of" in str(err.value)
    path = write(tmp_path, BASE.replace("    init: {{optimizer: keep}}\n",
                                        "    run_dir: elsewhere\n"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:18: stages[1].run_dir: a stage cannot set 'run_dir'" in str(err.value)
