"""A Hugging Face folder as ``init.source``: the model section comes from its config.json,
and the data's tokenizer must be its tokenizer.

Applied by the config loader before the sections are built, so ``--dry-run`` and
``lmforge train`` refuse a source lmforge cannot represent (naming the config.json key)
before any process starts; and by the dataset check, before training, for the tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.launch.config.typed_yaml import ConfigError, Where, to_plain
from lmforge.model.hf_config import model_config_from_hf

if TYPE_CHECKING:
    from lmforge.pipeline.contract.dataset_manifest import DatasetManifest

log = logging.getLogger("lmforge.config")

FREE_MODEL_KEYS = ("dropout", "init", "init_std", "pad_vocab_to_multiple_of", "multiple_of",
                   "num_labels")
"""Model keys a run may set beside a Hugging Face source: they change training or the
initialisation of new parts (a classification head), never what the source's weights mean."""


def hf_source_folder(source: Any) -> Path | None:
    """The folder ``init.source`` names when it is a Hugging Face folder (has config.json)."""
    if not isinstance(source, str) or not source.strip() or source == "previous":
        return None
    folder = Path(source).expanduser()
    return folder if (folder / "config.json").is_file() else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _refuse_missing_source(source: Any, data: dict[str, Any], where: Where) -> None:
    """A source that does not exist where the model section must come from it (the config
    has none) is named now: otherwise ``--dry-run`` would print the default model."""
    if not isinstance(source, str) or not source.strip() or source == "previous" \
            or data.get("model") or Path(source).expanduser().exists():
        return
    raise ConfigError(
        f"{where(('init', 'source'))}: {source} does not exist, and this config has "
        "no model: section (it comes from the source's config.json). Put the Hugging Face "
        f"model folder there (config.json, *.safetensors, tokenizer files); for the demo "
        f"configs/tiny-continue.yaml make a stand-in with `python configs/make_open_model.py "
        f"{source}`")


def model_from_hf_source(data: dict[str, Any], where: Where) -> dict[str, Any]:
    """``data`` (a raw run config) with its model section read from ``init.source``'s
    config.json when that is a Hugging Face folder; unchanged otherwise.

    Raises:
        ConfigError: The config.json holds what lmforge cannot represent (naming its key), or
            a ``model.<key>`` set in the run config contradicts it.
    """
    init = data.get("init")
    source = init.get("source") if isinstance(init, dict) else None
    folder = hf_source_folder(source)
    if folder is None:
        _refuse_missing_source(source, data, where)
        return data
    config_file = folder / "config.json"
    at = where(("init", "source"))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{at}: {config_file} is not a readable config.json ({err})") from err
    try:
        derived = to_plain(model_config_from_hf(config))
    except ValueError as err:
        raise ConfigError(f"{at}: {config_file}: {err}") from err
    own = data.get("model") or {}
    if not isinstance(own, dict):
        return data  # the section builder reports the wrong type
    preset = own.get("preset")
    from_preset: set[str] = set()
    if preset is not None:  # a preset is fine where it describes the source
        from lmforge.model.presets import PRESETS

        if preset not in PRESETS:
            return data  # the loader names the unknown preset
        from_preset = set(PRESETS[preset]) - set(own)
        own = {**PRESETS[preset], **{k: v for k, v in own.items() if k != "preset"}}
    for key, value in own.items():
        if key in FREE_MODEL_KEYS or key == "hf_config" or key not in derived or value is None:
            continue  # None: "derive it"; an unknown key is named by the section builder
        if not _same(value, derived[key]):
            named = ("model", "preset") if key in from_preset else ("model", key)
            origin = f" (model.preset {preset} sets it)" if key in from_preset else ""
            raise ConfigError(
                f"{where(named)}: model.{key}={value!r}{origin} contradicts init.source's "
                f"config.json ({config_file} gives model.{key}={derived[key]!r}); remove it: "
                "with a Hugging Face source the model section comes from its config.json")
    model = {**derived, **{k: v for k, v in own.items() if k in FREE_MODEL_KEYS}}
    return {**data, "model": model}


def source_tokenizer_problems(source: str | None, manifest: DatasetManifest,
                              data: str) -> list[str]:
    """How the data's tokenizer differs from a Hugging Face source's (empty when it is the
    same, by every file's sha256, or when the source ships no tokenizer.json)."""
    folder = hf_source_folder(source)
    if folder is None:
        return []
    if not (folder / "tokenizer.json").is_file():
        log.warning("init.source: %s has no tokenizer.json; lmforge cannot check that %s was "
                    "encoded with the tokenizer the model was trained with", folder, data)
        return []
    from lmforge.pipeline.contract.dataset_tokenizer import tokenizer_mismatches

    problems = tokenizer_mismatches(folder, manifest.tokenizer, key="init.source")
    if problems:
        problems.append(f"init.source: the data must be encoded with the source's tokenizer: "
                        f"prepare {data} with tokenizer.model_path={folder}")
    return problems
