"""The DeepSpeed JSON, generated from the typed config.

The optimizer and LR schedule are built by lmforge (``launch/train/optim.py``) and handed to
``deepspeed.initialize`` as client objects, so the generated JSON carries no
``optimizer``/``scheduler`` blocks; a user JSON that has them is refused with a message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.launch.config.sections import DeepSpeedConfig, TrainConfig
from lmforge.launch.config.typed_yaml import ConfigError, deep_merge

# Keys whose values lmforge derives from the typed config; a user JSON may repeat them only
# with the same value.
_DERIVED = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)


def build_deepspeed_config(
    train: TrainConfig, ds: DeepSpeedConfig, world_size: int, backend: str,
    load_universal: bool = False,
) -> dict[str, Any]:
    """Builds the DeepSpeed config dict from the train and deepspeed sections.

    ``overlap_comm`` and ``reduce_scatter`` left unset follow the backend: on with NCCL,
    off with gloo. On CPU, DeepSpeed reduces synchronously either way; overlap only adds a
    copy and gloo's missing reduce-scatter becomes one reduce per rank (gpt2-124m, 2
    processes: backward 3.28 s with both on, 2.80 s with both off; benchmarks/engine.py).

    Args:
        train: The train section (batch sizes, clipping, precision).
        ds: The deepspeed section.
        world_size: Data-parallel processes (``launch.world_size``).
        backend: The torch.distributed backend training runs on (``nccl`` or ``gloo``;
            see ``LaunchConfig.resolved_backend``).
        load_universal: The run resumes from a checkpoint's universal copy (a resume on
            another world size; ``launch/train/checkpoint.py``).

    Returns:
        The dict passed to ``deepspeed.initialize(config=...)``.

    Raises:
        ConfigError: The user's DeepSpeed JSON conflicts with the typed config.
    """
    nccl = backend == "nccl"
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": nccl if ds.overlap_comm is None else ds.overlap_comm,
        "reduce_scatter": nccl if ds.reduce_scatter is None else ds.reduce_scatter,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.bucket_size,
        "allgather_bucket_size": ds.bucket_size,
    }
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.bucket_size
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": False}
    if ds.offload_params != "none":
        zero["offload_param"] = {"device": ds.offload_params, "pin_memory": False}
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.sequences_per_step(world_size),
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": _fp16_block(train.precision),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # lmforge logs; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": False,
    }
    if load_universal:
        generated["checkpoint"] = {"load_universal": True}
    if ds.config_file is not None:
        generated = _merge_user_json(generated, Path(ds.config_file))
    return deep_merge(generated, ds.overrides)


def _fp16_block(precision: str) -> dict[str, Any]:
    if precision != "fp16":
        return {"enabled": False}
    # Dynamic loss scaling: start high, halve on overflow, grow after 1000 clean steps.
    return {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }


def _merge_user_json(generated: dict[str, Any], path: Path) -> dict[str, Any]:
    try:
        user = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    for block in ("optimizer", "scheduler"):
        if block in user:
            raise ConfigError(
                f"{path}: '{block}' is set by lmforge from the train section "
                f"(train.lr, train.lr_schedule, ...); remove it from the DeepSpeed JSON"
            )
    conflicts = [
        f"{key}: JSON has {user[key]!r}, config gives {generated[key]!r}"
        for key in _DERIVED
        if key in user and user[key] != "auto" and user[key] != generated[key]
    ]
    conflicts += _conflicts(user, generated, ("zero_optimization", "stage"))
    conflicts += _conflicts(user, generated, ("bf16", "enabled"))
    conflicts += _conflicts(user, generated, ("fp16", "enabled"))
    if conflicts:
        raise ConfigError(
            f"{path}: conflicts with the typed config (change the YAML or the JSON):\n  "
            + "\n  ".join(conflicts)
        )
    merged = deep_merge(generated, {k: v for k, v in user.items() if v != "auto"})
    return merged


def _conflicts(user: dict, generated: dict, keys: tuple[str, str]) -> list[str]:
    block, key = keys
    if not isinstance(user.get(block), dict) or key not in user[block]:
        return []
    theirs, ours = user[block][key], generated[block][key]
    if theirs == "auto" or theirs == ours:
        return []
    return [f"{block}.{key}: JSON has {theirs!r}, config gives {ours!r}"]
