"""Hostile YAML (issue 21): an alias bomb, a recursive alias and deep nesting are refused at
once with an error naming the file, in a config, an override, and the config.yaml that a
warm start reads beside an ``init.source`` checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.launch.config import ConfigError
from lmforge.launch.config.typed_yaml import MAX_YAML_NODES, parse_override, read_yaml

LMFORGE = [sys.executable, "-m", "lmforge.launch.cli"]


def alias_bomb(levels: int = 9) -> str:
    """~400 bytes that expand to 10**levels scalars (each level ten aliases of the last)."""
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_by_the_cli_within_seconds(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("name: bomb\n" + alias_bomb())
    assert len(bomb.read_bytes()) < 600
    # Before the fix, reading the key lines walked all 10**9 nodes: this never returned.
    proc = subprocess.run([*LMFORGE, "run", str(bomb), "--dry-run"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"{bomb}: the YAML expands to over {MAX_YAML_NODES:,} nodes" in proc.stderr


@pytest.mark.parametrize("text, expected", [
    ("a: &a [*a]\n", "a recursive YAML alias"),
    ("x: " + "[" * 3000 + "]" * 3000 + "\n", "nests too deeply"),
])
def test_recursive_and_deep_yaml_are_config_errors(tmp_path: Path, text: str,
                                                    expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        read_yaml(path)
    assert str(path) in str(err.value)


def test_depth_is_refused_whatever_the_recursion_limit(tmp_path: Path) -> None:
    """Libraries raise Python's recursion limit (importing torch._dynamo does; the suite
    failed this way when such a test ran first in the same process): the depth rule must
    not depend on where the parser happens to overflow."""
    path = tmp_path / "deep.yaml"
    path.write_text("x: " + "[" * 3000 + "]" * 3000 + "\n")
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        with pytest.raises(ConfigError, match="over 200 levels"):
            read_yaml(path)
    finally:
        sys.setrecursionlimit(before)
    path.write_text("x: " + "[" * 250 + "]" * 250 + "\n")  # parses under the default limit
    with pytest.raises(ConfigError, match="over 200 levels"):
        read_yaml(path)


def test_an_alias_bomb_in_an_override_is_refused() -> None:
    flow = "{" + alias_bomb(7).replace("\n", ", ").rstrip(", ") + "}"
    with pytest.raises(ConfigError, match="expands to over"):
        parse_override(f"--deepspeed.overrides={flow}")


def test_anchors_and_aliases_of_a_normal_size_still_work(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {lr: 0.001, steps: 3}\nother: *b\nlist: [*b, *b]\n")
    data, lines, _ = read_yaml(path)
    assert data["other"] == {"lr": 0.001, "steps": 3} and len(data["list"]) == 2
    assert lines[("other",)] == 2


@pytest.mark.parametrize("override", ["--train.lr=.inf", "--train.lr=nan", "--train.lr=-.inf",
                                      "--tracking.flush_interval_s=.inf",
                                      "--train.lr=inf"])
def test_non_finite_numbers_are_refused_naming_the_key(override: str) -> None:
    from lmforge.launch.config import load_config

    key = override[2:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}.*must be a finite number"):
        load_config(Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml", [override])
