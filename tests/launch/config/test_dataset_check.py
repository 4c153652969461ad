"""The run config against the prepared dataset: every mismatch is refused before any
training process starts, with both values and what to do; prepare reads only its sections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import REPO, shard_fixtures

from lmforge.launch.config import PREPARE_SECTIONS, ConfigError, load_config
from lmforge.launch.config.dataset_check import DatasetMismatchError, config_for_dataset
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest, SpecialToken

TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A dataset prepared at seq_len 16 with a 1000-piece tokenizer and no mask token."""
    root = tmp_path_factory.mktemp("check") / "data"
    shard_fixtures().write_shards(root, {"d": {"train": [4], "val": [4]}}, seq_len=16)
    return root


def _config(data: Path, *overrides: str):
    return load_config(TINY, [f"--data.output_dir={data}", "--data.seq_len=16",
                              "--tokenizer.vocab_size=1000", "--model.vocab_size=null",
                              *overrides])


def test_a_fitting_config_takes_the_tokenizer_vocabulary(data):
    cfg = _config(data, "--tokenizer.model_path=null")
    cfg = config_for_dataset(cfg, DatasetManifest.read(data))
    assert cfg.model.vocab_size == 1000  # the manifest's, not a default


def test_max_tokens_counts_the_prepared_sequences(data):
    # tiny.yaml: 8 sequences per process x 2 processes at the manifest's 16 tokens = 256.
    cfg = config_for_dataset(_config(data, "--train.max_tokens=1000"), DatasetManifest.read(data))
    assert cfg.train.max_steps == 4  # ceil(1000 / 256), by hand


def test_seq_len_mismatch_names_both_values_and_the_fix(data):
    cfg = _config(data, "--data.seq_len=64")
    with pytest.raises(DatasetMismatchError) as err:
        config_for_dataset(cfg, DatasetManifest.read(data))
    assert str(err.value) == (f"data.seq_len: 64, but {data} was prepared with 16: prepare "
                              "again, or set data.seq_len=16")


def test_model_vocabulary_smaller_than_the_tokenizer(data):
    cfg = _config(data, "--model.vocab_size=512", "--tokenizer.vocab_size=300")
    with pytest.raises(DatasetMismatchError, match="model.vocab_size: 512, but the tokenizer "
                       f"{data} was prepared with has 1000 pieces: set model.vocab_size to at "
                       "least 1000"):
        config_for_dataset(cfg, DatasetManifest.read(data))


def test_a_configured_tokenizer_must_be_the_one_the_data_was_encoded_with(data, tmp_path):
    other = tmp_path / "other.model"
    other.write_bytes(b"not the tokenizer of the fixture")
    cfg = _config(data, f"--tokenizer.model_path={other}", "--model.vocab_size=1000")
    with pytest.raises(DatasetMismatchError) as err:
        config_for_dataset(cfg, DatasetManifest.read(data))
    message = str(err.value)
    assert message.startswith(f"tokenizer.model_path: {other} (sha256 ")
    recorded = DatasetManifest.read(data).tokenizer.sha256[:12]
    assert f"is not the tokenizer {data} was prepared with (sha256 {recorded}" in message
    assert f"set tokenizer.model_path={data}/tokenizer.model" in message


@pytest.mark.parametrize("family,objective", [("encoder", "masked_lm"),
                                              ("encoder_decoder", "denoising")])
def test_an_objective_that_masks_needs_a_mask_token(data, family, objective):
    cfg = _config(data, f"--model.family={family}", f"--train.objective={objective}",
                  "--model.position=learned", "--export.enabled=false",
                  "--generate.prompts=[a <mask> b]")
    with pytest.raises(DatasetMismatchError, match=f"train.objective: {objective} needs a mask "
                       f"token, but the tokenizer {data} was prepared with has none: set "
                       r"tokenizer.mask_token \(e.g. '<mask>'\) and prepare again"):
        config_for_dataset(cfg, DatasetManifest.read(data))


def test_all_mismatches_are_reported_at_once(data):
    cfg = _config(data, "--data.seq_len=32", "--model.vocab_size=600",
                  "--tokenizer.vocab_size=300")
    with pytest.raises(DatasetMismatchError) as err:
        config_for_dataset(cfg, DatasetManifest.read(data))
    lines = str(err.value).splitlines()
    assert lines[0] == "the run config does not fit the prepared data:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["data.seq_len",
                                                                  "model.vocab_size"]


def test_lmforge_train_refuses_before_any_process_starts(data, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launch.cli", "train", str(TINY), f"--run_dir={run_dir}",
         f"--data.output_dir={data}", "--data.seq_len=64", "--tokenizer.vocab_size=1000"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"lmforge: config error: data.seq_len: 64, but {data} was "
                                   "prepared with 16: prepare again, or set data.seq_len=16")
    assert not (run_dir / "config.yaml").exists()  # nothing written, no process started


def test_prepare_reads_only_the_data_and_tokenizer_sections(tmp_path):
    # data.seq_len above the preset's max_seq_len (and an objective that does not fit the
    # family) concern training only: preparing the data must not refuse them.
    overrides = ["--data.seq_len=4096", "--train.objective=masked_lm", "--model.n_heads=7"]
    cfg = load_config(TINY, overrides, sections=PREPARE_SECTIONS)
    assert cfg.data.seq_len == 4096
    with pytest.raises(ConfigError, match="max_seq_len|n_heads|objective"):
        load_config(TINY, overrides)
    # An unknown key is still an error, in any section.
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TINY, ["--data.sequence_length=64"], sections=PREPARE_SECTIONS)
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launch.cli", "prepare", str(TINY), "--dry-run",
         *overrides], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "seq_len: 4096" in proc.stdout


def test_denoising_needs_an_eos_piece_to_start_the_decoder(data):
    import dataclasses

    manifest = DatasetManifest.read(data)
    with_mask = {**manifest.tokenizer.special_tokens, "mask": SpecialToken("<mask>", 5)}
    no_eos = dataclasses.replace(manifest.tokenizer, eos_id=-1, pad_id=-1,
                                 special_tokens=with_mask)
    manifest = dataclasses.replace(manifest, tokenizer=no_eos)
    cfg = _config(data, "--model.family=encoder_decoder", "--train.objective=denoising",
                  "--model.position=learned", "--export.enabled=false")
    with pytest.raises(DatasetMismatchError, match="train.objective: denoising starts the "
                       f"decoder with the eos piece, but the tokenizer {data} was prepared "
                       "with has none"):
        config_for_dataset(cfg, manifest)
    # Causal LM needs neither a pad nor an eos piece.
    assert config_for_dataset(_config(data), manifest).model.vocab_size == 1000


# Run as `python -c`: the real `lmforge prepare` command, then a report of what it imported.
_PREPARE_AND_LIST_IMPORTS = """
import atexit, sys
atexit.register(lambda: print("IMPORTED", sorted(
    m for m in ("torch", "deepspeed", "mlflow", "transformers") if m in sys.modules)))
from lmforge.launch.cli import main
main(["prepare", *sys.argv[1:]])
"""


@pytest.mark.slow
def test_lmforge_prepare_imports_no_training_library(tmp_path):
    # Importing torch alone costs ~2 s: `lmforge prepare` (read, tokenize, shard) must not
    # pay for what only training needs (the shards are written with numpy).
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i} of a tiny corpus, with words.\n\n" for i in range(400)))
    proc = subprocess.run(
        [sys.executable, "-c", _PREPARE_AND_LIST_IMPORTS, str(TINY),
         f"--data.output_dir={tmp_path / 'data'}", "--tokenizer.vocab_size=300",
         f"--data.datasets=[{{name: t, paths: [{corpus}]}}]"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "manifest.json").is_file()
    assert "IMPORTED []" in proc.stdout, proc.stdout
