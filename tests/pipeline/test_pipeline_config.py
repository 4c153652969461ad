"""Validation of the data-pipeline config sections: errors start with the field name."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from lmforge.pipeline.config import CleanConfig, DataConfig, DatasetSpec, TokenizerConfig


def spec(**kw) -> DatasetSpec:
    return DatasetSpec(**{"name": "web", "paths": ["corpus/*.txt"], **kw})


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: spec(name="we.b"), "name:"),
        (lambda: spec(paths=[]), "paths:"),
        (lambda: spec(weight=0.0), "weight:"),
        (lambda: DataConfig(datasets=[]), "datasets:"),
        (lambda: DataConfig(datasets=[spec(), spec()]), "datasets:"),
        (lambda: DataConfig(datasets=[spec()], seq_len=0), "seq_len:"),
        (lambda: DataConfig(datasets=[spec()], val_fraction=1.0), "val_fraction:"),
        (lambda: DataConfig(datasets=[spec()], num_workers=-1), "num_workers:"),
        (lambda: DataConfig(datasets=[spec()], read_chunk_bytes=10), "read_chunk_bytes:"),
        (lambda: CleanConfig(steps=["normalize", "bogus"]), "steps:"),
        (lambda: CleanConfig(steps=["length", "length"]), "steps:"),
        (lambda: CleanConfig(min_chars=10, max_chars=5), "max_chars:"),
        (lambda: CleanConfig(max_top_char_fraction=0.0), "max_top_char_fraction:"),
        (lambda: TokenizerConfig(vocab_size=100), "vocab_size:"),
        (lambda: TokenizerConfig(extra_special_tokens=["<s>"]), "extra_special_tokens:"),
        (lambda: TokenizerConfig(extra_special_tokens=["<x>", "<x>"]), "extra_special_tokens:"),
        (lambda: TokenizerConfig(character_coverage=0.5), "character_coverage:"),
    ],
)
def test_invalid_values_name_the_field(build, field: str) -> None:
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value).startswith(field)
    assert ";" in str(err.value) or "must" in str(err.value)  # says what to do


def test_defaults_are_valid_and_special_pieces_are_ordered() -> None:
    data = DataConfig(datasets=[spec()])
    assert data.clean.steps == ["normalize", "strip_control", "length", "repetition"]
    tok = TokenizerConfig(extra_special_tokens=["<tool>"])
    assert tok.special_pieces() == ["<mask>", "<sep>", "<tool>"]
    assert TokenizerConfig(mask_token=None, sep_token=None).special_pieces() == []


def test_the_config_sections_import_no_torch() -> None:
    # Ray workers unpickle a DataConfig; launch/ composes the sections into its config.
    code = ("import sys, lmforge.pipeline.config, lmforge.pipeline.prepare.manifest_writer; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
    data = DataConfig(datasets=[spec()])
    assert pickle.loads(pickle.dumps(data)) == data
