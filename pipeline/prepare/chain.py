"""The chain of steps a read chunk goes through: `data.clean.steps` in order (basic cleaning,
curation rules, user steps by import path), then decontamination when evaluation files are
given; and the removed samples the chain kept, redacted.

A user step is ``package.module:Attribute``: a `steps.Step` subclass (built with
``name=<import path>`` and the keyword arguments of ``data.clean.step_args[<import path>]``)
or a function ``text -> str | None`` (None removes the document; the same arguments follow the
text). It runs, and is counted, like every built-in step; its module must be importable on
every worker (installed, or on PYTHONPATH where Ray starts).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.pipeline.config import CleanConfig, DataConfig
from lmforge.pipeline.prepare.decontaminate import Decontaminate
from lmforge.pipeline.prepare.language import LanguageFilter
from lmforge.pipeline.prepare.pii import PiiStep, redact
from lmforge.pipeline.prepare.quality import (
    C4Filter,
    FineWebFilter,
    GopherQuality,
    GopherRepetition,
)
from lmforge.pipeline.prepare.steps import Removed, Step, basic_step

DECONTAMINATE = "decontaminate"  # the step name of decontamination (after the chain)


@dataclass
class FunctionStep(Step):
    """A user function ``text -> str | None`` as a step."""

    function: Callable[..., str | None] | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def transform(self, text: str) -> str | Removed | None:
        assert self.function is not None
        return self.function(text, **self.args)


def load_user_step(path: str, args: dict[str, Any]) -> Step:
    """The step a user's import path names, built with `args`.

    Raises:
        ValueError: ``data.clean.steps: '<path>': ...`` when the module cannot be imported,
            the attribute is neither a Step subclass nor a function, or `args` do not fit it.
    """
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises when imported
        raise ValueError(f"data.clean.steps: '{path}': cannot import {module_name} "
                         f"({type(err).__name__}: {err}); is it installed, or on PYTHONPATH "
                         "of every worker?") from err
    target = getattr(module, attribute, None)
    if isinstance(target, type) and issubclass(target, Step):
        try:
            return target(name=path, **args)
        except TypeError as err:
            raise ValueError(f"data.clean.step_args: '{path}': {err}; give the arguments "
                             f"{attribute} takes") from err
    if callable(target) and not isinstance(target, type):
        return FunctionStep(name=path, function=target, args=dict(args))
    raise ValueError(f"data.clean.steps: '{path}': {module_name} has no Step subclass or "
                     f"function named {attribute!r}")


def _step(name: str, clean: CleanConfig) -> Step:
    basic = basic_step(name, clean)
    if basic is not None:
        return basic
    rules: dict[str, Callable[[], Step]] = {
        "gopher_quality": lambda: GopherQuality(name=name, config=clean.gopher_quality),
        "gopher_repetition": lambda: GopherRepetition(name=name,
                                                      config=clean.gopher_repetition),
        "c4": lambda: C4Filter(name=name, config=clean.c4),
        "fineweb": lambda: FineWebFilter(name=name, config=clean.fineweb),
        "language": lambda: LanguageFilter(name=name, config=clean.language),
        "pii": lambda: PiiStep(name=name, config=clean.pii),
    }
    if name in rules:
        return rules[name]()
    return load_user_step(name, clean.step_args.get(name, {}))


def build_chain(data: DataConfig) -> list[Step]:
    """Fresh steps (zeroed counts) for one read chunk, in the order they run.

    Raises:
        ValueError: A user step cannot be loaded, a word list or evaluation file cannot be
            read, or a language code is unknown (naming the key).
    """
    steps = [_step(name, data.clean) for name in data.clean.steps]
    if data.decontaminate.eval_files:
        steps.append(Decontaminate(name=DECONTAMINATE, config=data.decontaminate))
    return steps


def removed_samples(steps: list[Step]) -> dict[str, list[dict[str, Any]]]:
    """The removed documents the steps kept as samples, by rule, with e-mail and IP
    addresses redacted (stats.json is read by people and logged to MLflow)."""
    return {rule: [{**sample, "text": redact(sample["text"])} for sample in samples]
            for step in steps for rule, samples in step.samples.items()}
