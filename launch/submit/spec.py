"""What every submit target shares: the job's config, templates and the MLflow run.

A submitted job never sees the user's YAML or overrides: ``lmforge submit`` resolves them
once, adjusts the ``launch`` section to the requested allocation (so batch-size checks fail
here, before anything is queued) and writes ``<run_dir>/submit/<work>-config.yaml`` (see
``RunDir.job_config``). The job reads that file, on any machine, from the same working
directory.
"""

from __future__ import annotations

import dataclasses
import re
import string
from pathlib import Path

from lmforge.launch.config import RunConfig
from lmforge.launch.config.stages import expand_stages
from lmforge.launch.redact import redact_text
from lmforge.launch.rundir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM_TEMPLATES = REPO_ROOT / "slurm"
WORK = ("prepare", "train", "all")
"""What a submitted job does (``--job``): prepare the data, train, or both in turn."""


class JobTemplate(string.Template):
    """``{{ name }}`` placeholders, so that bash's own ``$VAR`` and ``$@`` stay untouched."""

    delimiter = "{{"
    pattern = r"""
    \{\{(?:
        (?P<escaped>(?!))                       # no escape: templates never need a literal
      | \s*(?P<named>[a-z_][a-z0-9_]*)\s*\}\}
      | (?P<braced>(?!))
      | (?P<invalid>)
    )
    """


def render_template(path: Path, values: dict[str, object]) -> str:
    """Fills a template file; a placeholder without a value is an error naming both.

    Args:
        path: The template (e.g. ``slurm/train.sbatch``).
        values: Placeholder name → value (converted with ``str``).

    Raises:
        KeyError: A placeholder in the template has no value.
    """
    template = JobTemplate(path.read_text(encoding="utf-8"))
    missing = set(_placeholders(template.template)) - set(values)
    if missing:
        raise KeyError(f"{path}: no value for placeholder(s) {sorted(missing)}")
    return template.substitute({k: str(v) for k, v in values.items()})


def _placeholders(text: str) -> list[str]:
    return re.findall(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}", text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_job_value(what: str, value: object, directive: bool = False) -> str:
    """A value that goes into a job script or job spec, refused when it could change it.

    Every value is one line of printable text: a newline would end an ``#SBATCH`` line (the
    rest becoming a command, and the directives after it ignored). Values of ``#SBATCH``
    lines also hold no whitespace or quotes, which sbatch would split on.

    Args:
        what: the flag or key the value came from, named in the error.
        value: the value.
        directive: whether it goes into an ``#SBATCH`` line.

    Raises:
        ValueError: naming ``what`` and the offending character.
    """
    text = str(value)
    bad = _CONTROL.search(text)
    if bad:
        raise ValueError(
            f"{what}: {text!r} contains the control character {bad.group()!r}; job script "
            "values must be one line of printable text"
        )
    if directive and re.search(r"[\s'\"]", text):
        raise ValueError(
            f"{what}: {text!r} contains whitespace or a quote, which an #SBATCH line cannot "
            "hold; remove it"
        )
    return text


def resolve_in(path: str | Path, workdir: Path) -> Path:
    """A config path as the job sees it: relative paths resolve against its working dir."""
    path = Path(path)
    return (path if path.is_absolute() else workdir / path).resolve()


def with_allocation(cfg: RunConfig, nnodes: int, nproc_per_node: int) -> RunConfig:
    """The config with ``launch`` set to the allocation; re-validates batch sizes.

    Raises:
        ValueError: The allocation does not fit the config (e.g. ``train.global_batch_size``).
    """
    launch = dataclasses.replace(cfg.launch, nnodes=nnodes, nproc_per_node=nproc_per_node)
    cfg = dataclasses.replace(cfg, launch=launch)
    try:
        cfg.check_training()
        expand_stages(cfg)  # every stage fits the allocation too
        return cfg
    except ValueError as err:
        raise ValueError(
            f"{err} (for {nnodes} node(s) x {nproc_per_node} process(es) per node; "
            "set --train.global_batch_size to match, or to null)"
        ) from err


def mlflow_line(cfg: RunConfig, run_dir: Path, run_id: str | None) -> str:
    """One line saying where the job's metrics go."""
    if not cfg.tracking.enabled:
        return "off (tracking.enabled=false)"
    uri = redact_text(cfg.tracking.uri or f"sqlite:///{RunDir.of(run_dir).mlflow_db}")
    run = run_id or "created when the job starts"
    return f"{uri}  experiment '{cfg.tracking.experiment}'  run {run}"
