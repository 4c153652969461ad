"""The run configuration (``launch/config/``).

Owns: the sections launch/ defines (``sections.py``), typed YAML loading with overrides and
located errors (``typed_yaml.py``), :class:`RunConfig` and its loader (``run_config.py``),
the DeepSpeed JSON generated from the sections (``deepspeed.py``), and the check of a run
config against a prepared dataset (``dataset_check.py``).

Nothing else of lmforge: the data/tokenizer sections, the dataset contract, the model section.
May import: lmforge.pipeline.config, lmforge.pipeline.contract, lmforge.pipeline.durable,
    lmforge.model.config, lmforge.model.presets, lmforge.model.hf_classes,
    lmforge.model.hf_config, lmforge.model.rope, torch
"""

from lmforge.launch.config.eval_section import EvalConfig, EvalTaskSpec
from lmforge.launch.config.run_config import (
    CONFIG_FILE,
    OBJECTIVE_OF_FAMILY,
    OBJECTIVES_OF_FAMILY,
    PREPARE_SECTIONS,
    TASK_OBJECTIVES,
    RunConfig,
    load_config,
    load_resolved,
)
from lmforge.launch.config.sections import (
    DeepSpeedConfig,
    ExportConfig,
    GenerateConfig,
    InitConfig,
    LaunchConfig,
    TrackingConfig,
    TrainableConfig,
    TrainConfig,
)
from lmforge.launch.config.typed_yaml import ConfigError

__all__ = [
    "CONFIG_FILE",
    "OBJECTIVES_OF_FAMILY",
    "OBJECTIVE_OF_FAMILY",
    "PREPARE_SECTIONS",
    "TASK_OBJECTIVES",
    "ConfigError",
    "DeepSpeedConfig",
    "EvalConfig",
    "EvalTaskSpec",
    "ExportConfig",
    "InitConfig",
    "LaunchConfig",
    "RunConfig",
    "GenerateConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainableConfig",
    "load_config",
    "load_resolved",
]
