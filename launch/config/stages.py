"""The stage graph of a run (``stages:``) and its hooks (``hooks:``, ``hook_failure:``).

A config with ``stages:`` is a list of training phases run in order by ``lmforge run``
(``launch/stages/runner.py``)::

    stages:
      - name: pretrain               # unique, [A-Za-z0-9_-]
      - name: anneal
        train: {max_steps: 40, lr_schedule: wsd}
        init: {optimizer: keep}      # init.source defaults to the previous stage's weights
      - name: sft
        data: {task: {kind: sft, train: [configs/tasks/shakespeare_sft.jsonl]}}
        train: {objective: sft}
        compare_from_scratch: true   # also fine-tune from random weights and compare

The top level is a complete config (usually the first stage's); every stage deep-merges its
section keys onto it (mappings merge key by key, lists and scalars replace), so a stage
states only what changes. :func:`expand_stages` turns a config into one :class:`Stage` per
entry, each with an ordinary :class:`RunConfig` that the existing prepare/train/export
commands run unchanged:

- its run directory is ``<run_dir>/stages/<ii>-<name>`` (config.yaml, checkpoints, export);
- a stage that sets ``data`` without ``data.output_dir`` prepares into ``<stage dir>/data``;
  a stage's ``data.task`` replaces the top level's ``data.datasets`` (and the other way round),
  either replaces an inherited ``data.mix``; a ``data.mix`` stage prepares nothing (a stage
  that only reweights lists the same sources with new weights);
- stages after the first use the first stage's tokenizer (``tokenizer.model_path``), unless
  they read the first stage's prepared data itself;
- ``init.source`` of stage i>0 defaults to ``previous``: the previous stage's final checkpoint;
- ``hooks`` are the top level's followed by the stage's own;
- MLflow: every stage logs to the job's tracking store (a child run of the job's run).

Errors name the stage's key and line: ``cfg.yaml:14: stages[1].train.lr: must be positive``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.launch.config.typed_yaml import ConfigError, Where, build, deep_merge, located_error

if TYPE_CHECKING:
    from lmforge.launch.config.run_config import RunConfig

BUILTIN_HOOKS = ("export", "register", "submit_next")
"""Hooks lmforge provides by name (see ``launch/stages/builtin_hooks.py``)."""
HOOK_EVENTS = ("on_stage_start", "on_stage_end", "on_eval", "on_checkpoint", "on_export")
"""The events a hook can receive."""
STAGE_KEYS = ("name", "hooks", "compare_from_scratch")
"""Keys of a stage that are not config sections."""
# Top-level keys a stage cannot change: they describe the job, not one stage.
JOB_KEYS = ("run_dir", "stages", "hook_failure")
PREVIOUS = "previous"
"""``init.source`` value naming the previous stage's final checkpoint."""
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}$")


@dataclass
class HookSpec:
    """A hook with settings (the long form of a ``hooks:`` entry)."""

    name: str
    """An import path ``package.module:function`` (or ``:CallbackSubclass``), or a built-in:
    ``export``, ``register`` or ``submit_next``."""
    events: list[str] = field(default_factory=list)
    """Events the hook receives; empty means all of them."""
    args: dict[str, Any] = field(default_factory=dict)
    """Settings of a built-in hook (``submit_next``: target, config, flags, overrides)."""

    def __post_init__(self) -> None:
        check_hook_name(self.name, "name")
        for event in self.events:
            if event not in HOOK_EVENTS:
                raise ValueError(f"events: unknown event '{event}'; known: "
                                 f"{', '.join(HOOK_EVENTS)}")
        if self.name == "submit_next":
            target = self.args.get("target")
            if target not in ("local", "slurm", "ray"):
                raise ValueError(f"args: submit_next needs args.target local, slurm or ray, "
                                 f"got {target!r}")
            if not isinstance(self.args.get("config"), str):
                raise ValueError("args: submit_next needs args.config, the next job's config "
                                 "YAML")
            for key in ("flags", "overrides"):
                value = self.args.get(key, [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"args: submit_next args.{key} must be a list of strings")
            unknown = set(self.args) - {"target", "config", "flags", "overrides"}
            if unknown:
                raise ValueError(f"args: unknown submit_next setting(s) {sorted(unknown)}; "
                                 "known: target, config, flags, overrides")
        elif self.args:
            raise ValueError(f"args: hook '{self.name}' takes no args")


def check_hook_name(name: str, key: str = "hooks") -> None:
    """Refuses a hook name that is neither a built-in nor ``package.module:attribute``."""
    if name in BUILTIN_HOOKS or _IMPORT_PATH.match(name):
        return
    raise ValueError(
        f"{key}: '{name}' is not a hook; give an import path like mypackage.hooks:notify or "
        f"a built-in: {', '.join(BUILTIN_HOOKS)}"
    )


def hook_spec(entry: str | HookSpec) -> HookSpec:
    """The long form of a ``hooks:`` entry."""
    return entry if isinstance(entry, HookSpec) else HookSpec(name=entry)


def check_hooks(hooks: list[str | HookSpec], registered_model: str | None) -> None:
    """Checks a ``hooks:`` list (names, and what built-ins need).

    Raises:
        ValueError: ``"hooks: what is wrong; what to do"``.
    """
    for entry in hooks:
        check_hook_name(entry if isinstance(entry, str) else entry.name)
        spec = hook_spec(entry)
        if spec.name == "submit_next" and not isinstance(entry, HookSpec):
            raise ValueError("hooks: submit_next needs settings; write it as "
                             "{name: submit_next, args: {target: slurm, config: next.yaml}}")
        if spec.name == "register" and not registered_model:
            raise ValueError("hooks: register needs tracking.registered_model, the name of the "
                             "MLflow registered model to add versions to; set it")


@dataclass
class Stage:
    """One stage of the graph, ready to run."""

    index: int
    """Position in ``stages:`` (0-based)."""
    name: str
    """The stage's name."""
    config: RunConfig
    """The stage's complete config (``run_dir`` is the stage directory)."""
    compare_from_scratch: bool = False
    """Also train this stage from random weights and print both validation metrics."""

    @property
    def dir(self) -> Path:
        """The stage's run directory, ``<run_dir>/stages/<ii>-<name>``."""
        return Path(self.config.run_dir)

    def from_scratch(self) -> RunConfig:
        """The same stage from random weights, in ``<stage dir>/from_scratch`` (no export,
        no hooks)."""
        cfg = self.config
        changes: dict[str, Any] = {
            "run_dir": str(self.dir / "from_scratch"),
            "name": f"{cfg.name}-from_scratch",
            "export": dataclasses.replace(cfg.export, enabled=False),
            "hooks": [],
        }
        init = getattr(cfg, "init", None)
        if init is not None:
            resets = {k: "reset" for k in ("optimizer", "schedule", "loader")
                      if hasattr(init, k)}
            changes["init"] = dataclasses.replace(init, source=None, **resets)
        return dataclasses.replace(cfg, **changes)


def stage_dir(run_dir: str | Path, index: int, name: str) -> Path:
    """``<run_dir>/stages/<ii>-<name>`` (absolute)."""
    return Path(run_dir).resolve() / "stages" / f"{index:02d}-{name}"


def expand_stages(cfg: RunConfig, where: Where | None = None) -> list[Stage]:
    """One :class:`Stage` per ``stages:`` entry of ``cfg`` (empty without stages).

    Args:
        cfg: The job's config (its top level is the base every stage merges onto).
        where: Locations of the YAML keys (from the loader) for messages.

    Raises:
        ConfigError: A stage is invalid; names ``stages[i].<key>`` and its line.
    """
    config_class = type(cfg)  # RunConfig, without importing the module that imports this one
    where = where or Where()
    if not cfg.stages:
        return []
    base = cfg.to_dict()
    for key in JOB_KEYS:
        base.pop(key, None)
    base["stages"] = []
    sections = {f.name for f in dataclasses.fields(config_class)} - set(JOB_KEYS) - {"name"}
    has_init = "init" in sections
    names: list[str] = []
    first_data: dict[str, Any] | None = None
    first_tokenizer: dict[str, Any] = {}
    stages = []
    for index, raw in enumerate(cfg.stages):
        at = _StageWhere(where, index, raw if isinstance(raw, dict) else {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{where(('stages', str(index)))}: expected a mapping with a name "
                              f"and the sections the stage changes, got {raw!r}")
        name = raw.get("name")
        if not isinstance(name, str) or not _STAGE_NAME.match(name):
            raise ConfigError(f"{at(('name',))}: {name!r} is not a stage name; use 1-64 "
                              "letters, digits, '_' or '-'")
        if name in names:
            raise ConfigError(f"{at(('name',))}: '{name}' is used by stages[{names.index(name)}] "
                              "too; give each stage its own name")
        names.append(name)
        for key in raw:
            if key not in STAGE_KEYS and key not in sections:
                hint = ("; set it at the top level" if key in JOB_KEYS
                        else f"; known: {', '.join(sorted(set(STAGE_KEYS) | sections))}")
                raise ConfigError(f"{at((key,))}: a stage cannot set '{key}'{hint}")
        directory = stage_dir(cfg.run_dir, index, name)
        merged = deep_merge(base, {k: v for k, v in raw.items() if k not in STAGE_KEYS})
        merged["name"] = f"{cfg.name}-{name}"
        merged["run_dir"] = str(directory)
        own_train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
        if "max_steps" in own_train and "max_tokens" not in own_train:
            merged["train"]["max_tokens"] = None  # the stage's own length in steps wins
        own_hooks = raw.get("hooks") or []
        if not isinstance(own_hooks, list):
            raise ConfigError(f"{at(('hooks',))}: expected a list of hooks, got {own_hooks!r}")
        for j, entry in enumerate(own_hooks):  # checked here, to name the stage's own key
            if isinstance(entry, dict):
                build(HookSpec, entry, ("hooks", str(j)), at)
            else:
                try:
                    check_hook_name(str(entry), "hooks")
                except ValueError as err:
                    raise located_error(err, (), at) from err
        merged["hooks"] = [_plain(h) for h in cfg.hooks] + list(own_hooks)
        if "model" in raw and isinstance(raw["model"], dict) and "preset" in raw["model"]:
            from lmforge.model.presets import PRESETS

            model = dict(raw["model"])
            preset = model.pop("preset")
            if preset not in PRESETS:
                raise ConfigError(f"{at(('model', 'preset'))}: unknown preset '{preset}'")
            merged["model"] = {**PRESETS[preset], **model}
        _stage_data(merged, raw, directory)
        if first_data is None:
            first_data, first_tokenizer = merged["data"], merged.get("tokenizer") or {}
        else:
            _later_tokenizer(merged, raw, first_data, first_tokenizer, index)
        if has_init:
            _resolve_init(merged, raw, index, stages, at)
        if "tracking" not in raw or "uri" not in (raw.get("tracking") or {}):
            merged.setdefault("tracking", {})["uri"] = _job_tracking_uri(cfg)
        compare = raw.get("compare_from_scratch", False)
        if not isinstance(compare, bool):
            raise ConfigError(f"{at(('compare_from_scratch',))}: expected true or false, "
                              f"got {compare!r}")
        stage_cfg = build(config_class, merged, (), at)
        try:
            stage_cfg.check_training()
            check_hooks(stage_cfg.hooks, stage_cfg.tracking.registered_model)
        except ValueError as err:
            raise located_error(err, (), at) from err
        stages.append(Stage(index, name, stage_cfg, compare))
    return stages


def _plain(hook: str | HookSpec) -> Any:
    return hook if isinstance(hook, str) else dataclasses.asdict(hook)


def _stage_data(merged: dict[str, Any], raw: dict[str, Any], directory: Path) -> None:
    """A stage's own data: its shards in the stage directory, task data replacing datasets."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    out = merged["data"]
    if "output_dir" not in data:
        out["output_dir"] = str(directory / "data")
    if "task" in data and "datasets" not in data:
        out["datasets"] = []
    if "datasets" in data and "task" not in data and "task" in out:
        out["task"] = None
    if ("datasets" in data or "task" in data) and "mix" not in data:
        out["mix"] = []  # the stage's own data replaces a data.mix it would inherit


def _later_tokenizer(merged: dict[str, Any], raw: dict[str, Any],
                     first_data: dict[str, Any], first_tokenizer: dict[str, Any],
                     index: int) -> None:
    """Stage i>0 tokenizes with the first stage's tokenizer (same vocabulary, same ids): the
    copy in the first stage's dataset folder (its tokenizer.model, or, for a Hugging Face
    tokenizer, the folder itself, which holds tokenizer.json and its config)."""
    if merged["data"].get("mix"):
        return  # prepares nothing: its sources carry their tokenizer (checked to be one)
    if Path(merged["data"]["output_dir"]).resolve() == Path(first_data["output_dir"]).resolve():
        return  # the first stage's own prepared data: its tokenizer section must stay as is
    if (raw.get("tokenizer") or {}).get("model_path"):
        return
    first = Path(first_data["output_dir"]).resolve()
    if first_data.get("mix"):  # the first stage's sources: the first one's tokenizer copy
        path = Path(first_data["mix"][0]["path"])
        first = (path.parent if path.suffix == ".json" else path).resolve()
        if not (first / "tokenizer.model").is_file():  # a Hugging Face tokenizer's folder
            merged["tokenizer"]["model_path"] = str(first)
            return
    source = str(first_tokenizer.get("model_path") or "")
    hf = bool(source) and (Path(source).is_dir() or source.endswith(".json"))
    merged["tokenizer"]["model_path"] = str(first if hf else first / "tokenizer.model")


def _resolve_init(merged: dict[str, Any], raw: dict[str, Any], index: int,
                  earlier: list[Stage], at: Where) -> None:
    """``init.source``: ``previous`` (the default after the first stage) becomes the previous
    stage's checkpoints folder (its newest complete checkpoint is the stage's final one)."""
    init = merged.setdefault("init", {}) or {}
    merged["init"] = init
    own = raw.get("init") if isinstance(raw.get("init"), dict) else {}
    if index > 0 and "source" not in own:
        init["source"] = PREVIOUS
    if init.get("source") != PREVIOUS:
        return
    if index == 0:
        raise ConfigError(f"{at(('init', 'source'))}: the first stage has no previous stage; "
                          "give a checkpoint or Hugging Face folder, or null for random init")
    init["source"] = str(earlier[-1].dir / "checkpoints")


def _job_tracking_uri(cfg: RunConfig) -> str | None:
    """Stages log to the job's tracking store (its sqlite file when ``tracking.uri`` is unset)."""
    if cfg.tracking.uri is not None:
        return cfg.tracking.uri
    return f"sqlite:///{Path(cfg.run_dir).resolve() / 'mlflow.db'}"


class _StageWhere(Where):
    """Locations inside stage ``index``: a key the stage sets is ``stages[i].key`` at its
    line; a key inherited from the top level is named there, with the stage."""

    def __init__(self, where: Where, index: int, raw: dict[str, Any]) -> None:
        prefix = ("stages", str(index))
        texts = {k: v for k, v in where.texts.items() if k[:1] != ("stages",)}
        texts.update({k[2:]: v for k, v in where.texts.items() if k[:2] == prefix})
        super().__init__(where.source, where.lines, where.overridden, texts)
        self.index = index
        self.raw = raw

    def __call__(self, path: tuple[str, ...]) -> str:
        i = self.index
        if _sets(self.raw, path) or not path:
            text = super().__call__(("stages", str(i), *path))
            return text.replace(f"stages.{i}", f"stages[{i}]", 1)
        name = self.raw.get("name", i)
        return f"{super().__call__(path)} (in stage {i} '{name}')"


def _sets(raw: Any, path: tuple[str, ...]) -> bool:
    """Whether the stage's own mapping holds ``path`` (or a prefix of it, e.g. a list)."""
    node = raw
    for key in path:
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return False
    return True

