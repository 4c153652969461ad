"""Typed loading of YAML into config dataclasses, with errors that name file, line and key.

Each config section is a plain ``@dataclass`` whose fields carry type hints. This module
turns a YAML mapping into an instance, checking every key and type on the way, so a run
fails before any process starts. ``ValueError``s raised by a section's ``__post_init__``
are expected to start with the field name (``"n_heads: must divide d_model"``); they are
re-raised as :class:`ConfigError` with the section path and the YAML line prepended.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent."""


LineMap = dict[tuple[str, ...], int]
TextMap = dict[tuple[str, ...], str]
"""Key path -> the source text of an unquoted scalar, so a ``str`` field can take ``off``,
``123`` or ``1.10`` literally although YAML 1.1 reads them as ``False``, ``123``, ``1.1``."""

# YAML 1.1 booleans other than true/false: refused for a bool field (ambiguous, and YAML 1.2
# reads them as strings), taken as text for a str field.
_YAML11_BOOL_WORDS = {"y", "yes", "n", "no", "on", "off"}


def read_yaml(path: str | Path) -> tuple[dict[str, Any], LineMap, TextMap]:
    """Reads a YAML mapping, the line number of every key and the text of unquoted scalars.

    Args:
        path: The YAML file.

    Returns:
        The parsed mapping, a map from key path (tuple of keys) to 1-based line, and a map
        from key path to the source text of every unquoted scalar value.

    Raises:
        ConfigError: The file is missing, is not valid YAML, or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        data, node = parse_yaml(text, str(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}, {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    lines: LineMap = {}
    texts: TextMap = {}
    _collect(node, (), lines, texts)
    return data, lines, texts


# Keys renamed since a release, so an old config is told the new name: "sample" means a
# training sample only (text generation is "generate", the tokenizer's text "train_text_bytes").
RENAMED = {"sample": "generate", "sample_every": "generate_every",
           "sample_bytes": "train_text_bytes"}

# A config has hundreds of nodes; an alias bomb (each level an alias list of the one before,
# ~400 bytes for 10^9 nodes) is refused before anything walks or copies its expansion.
MAX_YAML_NODES = 100_000
# Configs nest a handful of levels. Deeper documents are refused by this count, not by
# whether Python's recursion limit happens to stop the parser first (libraries raise it:
# once torch._dynamo is imported, 3,000 nested lists parse).
MAX_YAML_DEPTH = 200


def parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parses one YAML document safely: composed once, refused when it would expand (aliases
    counted at every use) to more than :data:`MAX_YAML_NODES` nodes, is recursive, or nests
    deeper than the parser can go; then built from the same node with PyYAML's safe
    constructor (no Python objects). Returns the value and its node (None for an empty one).

    Raises:
        ConfigError: The document is too large once expanded, recursive or too deep.
        yaml.YAMLError: The text is not valid YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        if _expanded_size(node, {}, set(), source, depth=1) > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: the YAML expands to over {MAX_YAML_NODES:,} nodes through its "
                "aliases: write the values out instead of nesting aliases")
        return loader.construct_document(node), node
    except RecursionError as err:
        raise ConfigError(f"{source}: the YAML nests too deeply to read; flatten it") from err
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int],
                   source: str, depth: int) -> int:
    """Nodes in ``node`` once every alias is expanded, in time linear in the document (a node
    an alias reuses is counted from ``sizes``, not walked again); ``node`` is ``depth``
    levels deep (refused beyond :data:`MAX_YAML_DEPTH`)."""
    if depth > MAX_YAML_DEPTH:
        raise ConfigError(f"{source}, line {node.start_mark.line + 1}: the YAML nests too "
                          f"deeply to read (over {MAX_YAML_DEPTH} levels); flatten it")
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError(f"{source}, line {node.start_mark.line + 1}: a recursive YAML alias "
                          "(a node that contains itself); write the value out")
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    total = 1 + sum(_expanded_size(child, sizes, open_nodes, source, depth + 1)
                    for child in children)
    open_nodes.discard(key)
    sizes[key] = min(total, MAX_YAML_NODES + 1)  # "too many" is all the caller needs
    return sizes[key]


def _collect(
    node: yaml.Node | None, prefix: tuple[str, ...], lines: LineMap, texts: TextMap
) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            lines[key] = key_node.start_mark.line + 1
            _collect(value_node, key, lines, texts)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = (*prefix, str(index))
            lines[key] = item.start_mark.line + 1
            _collect(item, key, lines, texts)
    elif isinstance(node, yaml.ScalarNode) and node.style is None:
        texts[prefix] = node.value


class Where:
    """Formats the location of a key for messages: ``file:line: a.b.c`` or ``a.b.c (--a.b=…)``."""

    def __init__(
        self,
        source: str | None = None,
        lines: LineMap | None = None,
        overridden: set[tuple[str, ...]] | None = None,
        texts: TextMap | None = None,
    ) -> None:
        self.source = source
        self.lines = lines or {}
        self.overridden = overridden or set()
        self.texts = texts or {}

    def __call__(self, path: tuple[str, ...]) -> str:
        dotted = ".".join(path)
        for depth in range(len(path), 0, -1):
            if path[:depth] in self.overridden:
                return f"{dotted} (set by --{'.'.join(path[:depth])}=...)"
        for depth in range(len(path), 0, -1):
            line = self.lines.get(path[:depth])
            if line is not None and self.source:
                return f"{self.source}:{line}: {dotted}"
        return f"{self.source}: {dotted}" if self.source else dotted


def build(cls: type, data: Any, path: tuple[str, ...] = (), where: Where | None = None) -> Any:
    """Builds dataclass ``cls`` from a mapping, checking keys and types recursively.

    Args:
        cls: A dataclass type.
        data: The mapping (``None`` means all defaults).
        path: The key path of this section, for messages.
        where: Formats locations; defaults to plain dotted paths.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: An unknown key, a wrong type, a missing required field, or a
            ``__post_init__`` check failed.
    """
    where = where or Where()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where(path)}: expected a mapping of keys, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            hint = ([RENAMED[key]] if RENAMED.get(key) in fields
                    else difflib.get_close_matches(str(key), list(fields), n=1))
            more = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{where((*path, str(key)))}: unknown key{more}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(data[name], hints[name], (*path, name), where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where((*path, name))}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise located_error(err, path, where) from err


def located_error(err: Exception, path: tuple[str, ...], where: Where) -> ConfigError:
    """A ConfigError for a check's ``"<key>: message"``, located at the key under ``path``
    (its YAML line, or the override that set it)."""
    message = str(err)
    head, sep, rest = message.partition(":")
    if sep and head.replace("_", "").replace(".", "").isalnum() and " " not in head:
        return ConfigError(f"{where((*path, *head.split('.')))}:{rest}")
    return ConfigError(f"{where(path)}: {message}")


def convert(value: Any, hint: Any, path: tuple[str, ...], where: Where) -> Any:
    """Converts one YAML value to the type ``hint``, or raises a ConfigError naming it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return convert(value, option, path, where)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        # A mapping meant the dataclass option, anything else the scalar one: its own error
        # names the key or the word (`bool | NearDedupConfig` given a typo or `yes`).
        shaped = [err for option, err in zip(options, errors, strict=True)
                  if dataclasses.is_dataclass(option) == isinstance(value, Mapping)]
        if len(shaped) == 1:
            raise shaped[0]
        raise ConfigError(f"{where(path)}: expected {_name(hint)}, got {_show(value)}")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        text = where.texts.get(path)
        if text in args:  # an unquoted choice YAML 1.1 reads as a bool or number
            return text
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{where(path)}: must be one of {choices}, got {_show(value)}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where(path)}: expected a list, got {_show(value)}")
        (item,) = args or (Any,)
        return [convert(v, item, (*path, str(i)), where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where(path)}: expected a mapping, got {_show(value)}")
        _, item = args or (str, Any)
        return {str(k): convert(v, item, (*path, str(k)), where) for k, v in value.items()}
    return _scalar(value, hint, path, where)


def _scalar(value: Any, hint: Any, path: tuple[str, ...], where: Where) -> Any:
    text = where.texts.get(path)
    if hint is bool:
        word = (value if isinstance(value, str) else text or "").lower()
        if word in _YAML11_BOOL_WORDS:
            raise ConfigError(
                f"{where(path)}: {word!r} is ambiguous for a bool; write true or false"
            )
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no setting means anything with inf or nan
                raise ConfigError(f"{where(path)}: must be a finite number, got {_show(value)}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if text is not None and value is not None:  # unquoted off, 123, 1.10: as written
            return text
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"{where(path)}: unsupported config type {_name(hint)}")
    raise ConfigError(f"{where(path)}: expected {_name(hint)}, got {_show(value)}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def parse_override(arg: str, texts: TextMap | None = None) -> tuple[tuple[str, ...], Any]:
    """Parses ``--section.key=value`` into a key path and a YAML-typed value.

    Args:
        arg: The command-line argument.
        texts: If given, the source texts of the value's unquoted scalars replace those
            recorded under the key (a ``str`` field takes ``--name=off`` as ``"off"``).

    Raises:
        ConfigError: The argument is not of that form.
    """
    body = arg[2:] if arg.startswith("--") else arg
    key, sep, raw = body.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{arg}': expected --section.key=value")
    path = tuple(key.split("."))
    try:
        value, node = parse_yaml(raw, f"override '{arg}'") if raw != "" else ("", None)
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{arg}': value is not valid YAML: {err}") from err
    if texts is not None:
        for stale in [k for k in texts if k[: len(path)] == path]:
            del texts[stale]
        _collect(node, path, {}, texts)
    return path, value


def apply_override(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Sets ``data[path] = value``, creating mappings and indexing lists on the way."""
    node: Any = data
    for depth, key in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_index(node, key, path[: depth + 1])]
            continue
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        node = child
    last = path[-1]
    if isinstance(node, list):
        node[_index(node, last, path)] = value
    else:
        node[last] = value


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` laid over it: mappings merge key by key, anything else (a list, a
    scalar, a mapping over a scalar) is replaced. Neither input is modified; the result
    shares no mutable value with them.

    The one merge of config layers: a stage over the run's sections, a user's DeepSpeed JSON
    and ``deepspeed.overrides`` over the generated JSON.
    """
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _index(items: list, key: str, path: tuple[str, ...]) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"override {'.'.join(path)}: no list item {key} ({len(items)} items)")
    return int(key)


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists, for YAML/JSON dumps and MLflow params."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init
        }
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj
