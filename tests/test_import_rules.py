"""The layer rules of DESIGN.md, read from the code itself.

Each package's ``__init__.py`` docstring has one line ``May import: a, b, ...``: the
lmforge packages (besides its own) and the governed libraries a module under it may import,
at any level of the file (a function-level import counts: it runs too). Imports under
``if TYPE_CHECKING:`` are types only and never run, so they are not counted. A package with
no such line follows its parent's. A governed library is one of :data:`GOVERNED`; other
third-party libraries (numpy, yaml, ...) and the standard library are free.

The same import graph (every level, TYPE_CHECKING aside) must have no cycle between modules.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The fixed top-level folders are the subpackages of one ``lmforge`` namespace.
PACKAGES = {"pipeline": "lmforge.pipeline", "model": "lmforge.model", "launch": "lmforge.launch"}
GOVERNED = ("torch", "deepspeed", "ray", "mlflow", "sentencepiece", "webdataset", "tokenizers",
            "transformers", "peft", "safetensors")
RULE = re.compile(r"^May import:[ \t]*(.*(?:\n[ \t]+.*)*)", re.M)  # indented lines continue it


def _modules() -> dict[str, Path]:
    """Every lmforge module name → its file (a package is its ``__init__.py``)."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file that runs, at any level."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from pkg import submodule` imports the submodule, `from mod import x` the module
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in MODULES else base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _rule(module: str) -> tuple[str, set[str]]:
    """The package whose ``May import:`` line governs ``module``, and the names it allows."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        package = ".".join(parts[:end])
        path = MODULES.get(package)
        if path is None or path.name != "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        match = RULE.search(doc)
        if match:
            names = match.group(1).replace("\n", " ").split(",")
            allowed = {name.strip().rstrip(".") for name in names}
            return package, {name for name in allowed if name and name != "-"}
    raise AssertionError(f"no package above {module} states what it may import")


def _allowed(name: str, own: str, allowed: set[str]) -> bool:
    def under(prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    if name.startswith("lmforge."):
        return under(own) or any(under(a) for a in allowed)
    top = name.split(".")[0]
    if top in GOVERNED:
        return top in allowed
    return True  # the standard library and ungoverned third-party packages


def test_every_top_package_states_its_rule():
    for package in PACKAGES.values():
        doc = ast.get_docstring(ast.parse(MODULES[package].read_text(encoding="utf-8"))) or ""
        assert RULE.search(doc), f"{MODULES[package]}: the docstring needs a 'May import:' line"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_follow_its_package_rule(module):
    own, allowed = _rule(module)
    broken = [f"{MODULES[module].relative_to(ROOT)}:{line}: imports {name}"
              for line, name in _imports(module, MODULES[module])
              if not _allowed(name, own, allowed)]
    assert not broken, (f"{own} may import only {sorted(allowed)} (its __init__ docstring):\n"
                        + "\n".join(broken))


def test_no_import_cycle_between_modules():
    graph = {m: sorted({name for _, name in _imports(m, p) if name in MODULES and name != m})
             for m, p in MODULES.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_rule_reader_sees_function_level_imports_and_skips_type_checking(tmp_path):
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n"
              "def f():\n    import mlflow\n")
    path = tmp_path / "probe.py"
    path.write_text(source)
    names = [name for _, name in _imports("lmforge.model.probe", path)]
    assert "mlflow" in names and "ray" not in names
    assert not _allowed("mlflow", "lmforge.model", {"torch"})
    assert _allowed("numpy", "lmforge.model", {"torch"})
