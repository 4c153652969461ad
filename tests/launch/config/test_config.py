"""Config loading: precedence, typed checks, and errors that name file, line and key."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.launch.config import ConfigError, TrainConfig, load_config
from lmforge.launch.config.deepspeed import build_deepspeed_config
from lmforge.launch.config.run_config import RunConfig
from lmforge.launch.config.typed_yaml import deep_merge
from lmforge.launch.rundir import RunDir, StageInfo
from lmforge.model import parameter_count

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "tiny.yaml"



def deepspeed_json(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON as `lmforge --dry-run` shows it (backend from this machine)."""
    return build_deepspeed_config(cfg.train, cfg.deepspeed, cfg.world_size,
                                  cfg.launch.resolved_backend())

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = """\
name: t
data:
  datasets:
    - name: d
      paths: [corpus.txt]
  output_dir: out
  seq_len: 64
tokenizer:
  vocab_size: 512
model:
  preset: tiny
"""


def test_tiny_config_resolves_and_round_trips(tmp_path):
    cfg = load_config(TINY)
    assert cfg.model.vocab_size == cfg.tokenizer.vocab_size == 2048
    assert cfg.model.d_model == 128 and cfg.model.position == "rope"
    assert cfg.global_batch_size == 16 == cfg.train.global_batch_size
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_precedence_defaults_file_overrides(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  max_steps: 40\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["--train.max_steps=7", "--model.n_layers=2", "--train.lr=3e-4"])
    assert cfg.train.max_steps == 7  # override beats file
    assert cfg.train.lr == pytest.approx(3e-4)  # "3e-4" is a YAML string; converted to float
    assert cfg.model.n_layers == 2  # override beats preset
    assert cfg.model.d_model == 128  # preset beats default
    assert cfg.train.warmup_steps == TrainConfig().warmup_steps  # default
    assert cfg.data.datasets[0].paths == ["corpus.txt"]


def test_override_into_list_item(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["--data.datasets.0.weight=2.5"])
    assert cfg.data.datasets[0].weight == 2.5


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:13: train.max_step: unknown key" in message
    assert "did you mean 'max_steps'" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r":12: trian: unknown key; did you mean 'train'"):
        load_config(write(tmp_path, MINIMAL + "trian:\n  max_steps: 5\n"))


@pytest.mark.parametrize("text,expected", [
    ("sample:\n  prompts: [a]\n", r":12: sample: unknown key; did you mean 'generate'"),
    ("train:\n  sample_every: 5\n", r":13: train.sample_every: unknown key; did you mean "
                                     r"'generate_every'"),
    ("", r":10: tokenizer.sample_bytes: unknown key; did you mean 'train_text_bytes'"),
])
def test_a_renamed_key_is_named_with_its_new_name(tmp_path, text, expected):
    # "sample" means a training sample only: generation and the tokenizer's text were renamed.
    config = MINIMAL.replace("vocab_size: 512", "vocab_size: 512\n  sample_bytes: 5000") + text
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, config if not text else MINIMAL + text))


def test_wrong_type_names_key(tmp_path):
    text = MINIMAL + "train:\n  max_steps: 5\n  micro_batch_size: big\n"
    expected = r"run.yaml:14: train.micro_batch_size: expected int, got 'big'"
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text))


def test_bad_literal_lists_choices(tmp_path):
    expected = r"train.precision \(set by --train.precision=...\): must be one of 'fp32', 'bf16'"
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, MINIMAL), ["--train.precision=fp8"])


def test_override_error_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_steps \(set by --train.max_steps=...\)"):
        load_config(write(tmp_path, MINIMAL), ["--train.max_steps=many"])


def test_inconsistent_global_batch(tmp_path):
    text = MINIMAL + "train:\n  micro_batch_size: 4\n  global_batch_size: 12\n"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert "train.global_batch_size: 12 != micro_batch_size 4 x grad_accum_steps 1 x world" in str(
        err.value
    )


def test_post_init_error_is_prefixed_with_section(tmp_path):
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: train.lr: must be positive"):
        load_config(write(tmp_path, MINIMAL + "train:\n  lr: -1.0\n"))


def test_nested_section_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.datasets.0.weight \(set by .*\): 0.0 must be > 0"):
        load_config(write(tmp_path, MINIMAL), ["--data.datasets.0.weight=0"])


def test_unknown_preset(tmp_path):
    expected = r"model.preset \(set by .*\): unknown preset 'gpt5'; known: .*tiny"
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, MINIMAL), ["--model.preset=gpt5"])


def test_missing_file():
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("does/not/exist.yaml")


def test_deepspeed_json_generated_from_typed_config():
    cfg = load_config(TINY, ["--deepspeed.zero_stage=3", "--train.grad_accum_steps=2",
                             "--train.global_batch_size=32"])
    ds = deepspeed_json(cfg)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32
    assert ds["bf16"] == {"enabled": True}
    assert "optimizer" not in ds and "scheduler" not in ds


def test_user_deepspeed_json_conflicts_are_reported(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5}))
    cfg = load_config(TINY, [f"--deepspeed.config_file={user}"])
    with pytest.raises(ConfigError) as err:
        deepspeed_json(cfg)
    assert "zero_optimization.stage: JSON has 3, config gives 2" in str(err.value)
    assert "gradient_clipping: JSON has 0.5, config gives 1.0" in str(err.value)


def test_user_deepspeed_json_and_raw_overrides_merge(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "round_robin_gradients": True},
                                "train_batch_size": "auto"}))
    cfg = load_config(TINY, [f"--deepspeed.config_file={user}",
                             "--deepspeed.overrides={wall_clock_breakdown: true}"])
    ds = deepspeed_json(cfg)
    assert ds["zero_optimization"]["round_robin_gradients"] is True
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["wall_clock_breakdown"] is True


def test_dry_run_prints_config_params_and_deepspeed_json():
    out = subprocess.run(
        [sys.executable, "-m", "lmforge.launch.cli", "run", str(TINY), "--dry-run",
         "--model.n_layers=2"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout
    cfg = load_config(TINY, ["--model.n_layers=2"])
    assert f"# parameters: {parameter_count(cfg.model):,}" in out
    assert "n_layers: 2" in out
    ds_json = json.loads(out.split("# DeepSpeed config\n", 1)[1].split("\n# ", 1)[0])
    assert ds_json == deepspeed_json(cfg)


def test_cli_config_error_exits_2_with_message(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  max_step: 5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launch.cli", "train", str(path)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 2
    assert "train.max_step: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], False),  # no process group and no CUDA here: gloo
        (["--launch.backend=nccl"], True),
        (["--deepspeed.overlap_comm=true", "--deepspeed.reduce_scatter=true"], True),
    ],
)
def test_comm_overlap_and_reduce_scatter_follow_the_backend_unless_set(overrides, expected):
    ds = deepspeed_json(load_config(TINY, overrides))
    assert ds["zero_optimization"]["overlap_comm"] is expected
    assert ds["zero_optimization"]["reduce_scatter"] is expected


def test_adamw_uses_the_fused_kernel_and_keeps_decay_groups():
    import torch

    from lmforge.launch.train.optim import build_optimizer

    cfg = load_config(TINY)
    model = cfg.model.build()
    optimizer = build_optimizer(model, cfg.train)
    assert optimizer.defaults["fused"] is True
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    # One step equals the unfused implementation's within float rounding.
    reference = torch.optim.AdamW(
        [{"params": [p.detach().clone() for p in g["params"]],
          "weight_decay": g["weight_decay"]} for g in optimizer.param_groups],
        lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps, foreach=False,
    )
    for group, ref_group in zip(optimizer.param_groups, reference.param_groups, strict=True):
        for p, q in zip(group["params"], ref_group["params"], strict=True):
            p.grad = torch.full_like(p, 0.5)
            q.grad = torch.full_like(q, 0.5)
    optimizer.step()
    reference.step()
    for group, ref_group in zip(optimizer.param_groups, reference.param_groups, strict=True):
        for p, q in zip(group["params"], ref_group["params"], strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("written", ["off", "no", "yes", "on", "123", "0123", "1.10", "true"])
def test_str_field_takes_unquoted_text_literally(tmp_path, written):
    from_file = load_config(write(tmp_path, MINIMAL.replace("name: t", f"name: {written}")))
    from_flag = load_config(write(tmp_path, MINIMAL), [f"--name={written}"])
    assert from_file.name == from_flag.name == written
    assert load_config(write(tmp_path, from_file.to_yaml())).name == written  # resolved config


def test_override_text_replaces_the_file_text_and_null_stays_none(tmp_path):
    text = MINIMAL.replace("name: t", "name: 123\nrun_dir: null").replace(
        "vocab_size: 512", "vocab_size: 512\n  model_path: ~")
    cfg = load_config(write(tmp_path, text), ["--name=off"])
    assert cfg.name == "off"
    assert cfg.run_dir == "runs/off" and cfg.tokenizer.model_path is None
    cfg = load_config(write(tmp_path, MINIMAL), ["--data.datasets=[{name: no, paths: [1.50]}]"])
    assert cfg.data.datasets[0].name == "no" and cfg.data.datasets[0].paths == ["1.50"]


@pytest.mark.parametrize("word", ["off", "on", "yes", "no", "Yes", "OFF"])
def test_bool_field_accepts_only_true_or_false(tmp_path, word):
    expected = rf"model.bias \(set by --model.bias=...\): '{word.lower()}' is ambiguous for a " \
               r"bool; write true or false"
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, MINIMAL), [f"--model.bias={word}"])
    text = MINIMAL + f"  bias: {word}\n"
    with pytest.raises(ConfigError, match=r"run.yaml:12: model.bias: .* write true or false"):
        load_config(write(tmp_path, text))
    assert load_config(write(tmp_path, MINIMAL), ["--model.bias=false"]).model.bias is False
    assert load_config(write(tmp_path, MINIMAL + "  bias: True\n")).model.bias is True


def test_max_tokens_sets_the_length_in_steps(tmp_path):
    # tiny.yaml: 8 sequences per process x 2 processes x 128 tokens = 2048 tokens per step.
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["--train.max_tokens=100000"])
    assert cfg.train.max_steps == 49  # ceil(100000 / 2048), by hand
    with pytest.raises(ConfigError, match="train.max_tokens .*must be at least 1"):
        load_config(REPO / "configs" / "tiny.yaml", ["--train.max_tokens=0"])
    # A stage's own max_steps is its length; a stage without one inherits the token length
    # (recomputed with its own seq_len).
    stages = ("--stages=[{name: a}, {name: b, train: {max_steps: 7}}, "
              "{name: c, data: {seq_len: 64}}]")
    from lmforge.launch.config.stages import expand_stages

    job = load_config(REPO / "configs" / "tiny.yaml", ["--train.max_tokens=100000", stages,
                                              f"--run_dir={tmp_path}"])
    steps = [s.config.train.max_steps for s in expand_stages(job)]
    assert steps == [49, 7, 98]  # ceil(100000 / 1024) = 98


def test_saved_config_is_readable_by_its_owner_only(tmp_path):
    """config.yaml holds the real values (issue 21): 0o600 whatever the umask, also when a
    world-readable file was there before."""
    cfg = load_config(TINY)
    path = tmp_path / "config.yaml"
    path.write_text("old")
    path.chmod(0o644)
    old_umask = os.umask(0o000)
    try:
        cfg.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config(path).to_dict() == cfg.to_dict()
    assert not list(tmp_path.glob("*.tmp*"))
    run = RunDir.of(tmp_path / "run")  # stage.json carries the tracking URI
    run.write_stage_info(StageInfo("a", 0, str(tmp_path), tracking_uri="http://u:pw@host"))
    assert stat.S_IMODE(run.stage_info.stat().st_mode) == 0o600
    assert run.read_stage_info().tracking_uri == "http://u:pw@host"


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"train": {"lr": 1e-3, "betas": [0.9, 0.95]}, "model": {"d": 64}, "x": {"y": 1}}
    top = {"train": {"lr": 3e-4, "betas": [0.8]}, "x": 5, "new": {"k": [1]}}
    merged = deep_merge(base, top)
    assert merged == {"train": {"lr": 3e-4, "betas": [0.8]}, "model": {"d": 64}, "x": 5,
                      "new": {"k": [1]}}
    merged["train"]["betas"].append(0.1)
    merged["model"]["d"] = 1
    merged["new"]["k"].append(2)
    assert base["train"]["betas"] == [0.9, 0.95] and base["model"]["d"] == 64  # inputs intact
    assert top["new"]["k"] == [1]
