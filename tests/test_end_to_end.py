"""The main job end to end, through the CLI a user types: `lmforge run`, then a resume.

One small run (a 200 KB slice of the demo corpus, a 2-layer model, 40 steps, 2 DeepSpeed
processes on gloo, real Ray, real MLflow sqlite store) is shared by every test here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import webdataset as wds

from lmforge.launch.config import load_config
from lmforge.launch.export.from_checkpoint import load_trained_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
CORPUS = REPO / "configs" / "corpora" / "tinyshakespeare.txt"
STEPS, HALF = 40, 20


def paragraphs(text: str) -> list[str]:
    """The demo config's documents: runs of non-blank lines (``txt_unit: paragraph``)."""
    out, current = [], []
    for line in text.split("\n"):
        if line.strip("\r"):
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def overrides(tmp: Path, corpus: Path, run_dir: Path) -> list[str]:
    return [
        f"--run_dir={run_dir}",
        f"--data.output_dir={tmp / 'data'}",
        f"--data.datasets.0.paths=[{corpus}]",
        "--data.seq_len=64",
        "--tokenizer.vocab_size=512",
        "--model.n_layers=2",
        "--model.d_model=64",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.d_ff=192",
        f"--train.max_steps={STEPS}",
        f"--train.checkpoint_every={HALF}",
        f"--train.eval_every={HALF}",
        "--train.eval_batches=4",
        "--train.log_every=1",
        "--train.warmup_steps=5",
        "--tracking.experiment=e2e",
        "--generate.max_new_tokens=16",
        # fp32: the in-loop task scores must equal `lmforge eval` on the (fp32) export; a bf16
        # forward differs from it by bf16's rounding
        "--train.precision=fp32",
    ]


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.launch.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=900,
    )
    tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"lmforge {args[0]} failed:\n{tail}"
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    text = CORPUS.read_text(encoding="utf-8")[:200_000]
    corpus = tmp / "shakespeare.txt"
    corpus.write_text(text, encoding="utf-8")
    run_dir = tmp / "run"
    args = overrides(tmp, corpus, run_dir)
    proc = lmforge("run", str(TINY), *args, cwd=tmp)
    cfg = load_config(run_dir / "config.yaml")
    manifest = json.loads((tmp / "data" / "manifest.json").read_text())
    return {"tmp": tmp, "text": text, "run_dir": run_dir, "args": args, "cfg": cfg,
            "stdout": proc.stdout, "manifest": manifest}


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_run_prints_where_everything_is(run):
    out = run["stdout"]
    assert f"run directory : {run['run_dir']}" in out
    assert "MLflow store  : sqlite:///" in out
    assert f"HF export     : {run['run_dir'] / 'export'}" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out


def test_shards_read_back_and_decode_to_the_source_documents(run):
    manifest, data_dir = run["manifest"], run["tmp"] / "data"
    info = manifest["tokenizer"]
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / info["file"]))
    seq_len = manifest["seq_len"]
    documents = []
    for split in ("train", "val"):
        entry = manifest["datasets"]["shakespeare"]["splits"][split]
        urls = [str(data_dir / shard["path"]) for shard in entry["shards"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
        assert len(samples) == entry["samples"] > 0
        tokens = np.concatenate([s["tokens.npy"] for s in samples])
        assert all(s["tokens.npy"].shape == (seq_len + 1,) for s in samples)
        real = tokens[tokens != info["pad_id"]]
        assert len(real) == entry["tokens"]
        ends = np.flatnonzero(real == info["eos_id"])
        assert ends[-1] == len(real) - 1  # every document ends with EOS
        for start, end in zip(np.r_[0, ends[:-1] + 1], ends, strict=True):
            documents.append(sp.decode(real[start:end].tolist()))
    source = set(paragraphs(run["text"]))
    assert len(documents) == len(set(documents))  # exact duplicates were removed
    assert set(documents) <= source  # every token decodes back to a source document
    assert len(documents) >= 0.95 * len(source)  # only a few dropped by the filters


def test_loss_falls(run):
    loss = metrics(run["run_dir"], "train/loss")
    assert sorted(loss) == list(range(1, STEPS + 1))
    first = np.mean([loss[s] for s in range(1, 6)])
    last = np.mean([loss[s] for s in range(STEPS - 4, STEPS + 1)])
    assert last < first - 1.0, (first, last)
    val = metrics(run["run_dir"], "val/loss")
    assert set(val) == {HALF, STEPS} and val[STEPS] < val[HALF]


def test_mlflow_holds_params_metrics_and_artifacts(run):
    from mlflow.tracking import MlflowClient

    run_dir = run["run_dir"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.max_steps"] == str(STEPS)
    history = client.get_metric_history(run_id, "train/loss")
    logged = {m.step: m.value for m in history}
    assert logged == pytest.approx(metrics(run_dir, "train/loss"), rel=1e-12)
    for key in ("train/lr", "train/tokens_per_s", "val/loss"):
        assert client.get_metric_history(run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "export", "generations.json", "curves.png"} <= artifacts
    data_artifacts = {a.path for a in client.list_artifacts(run_id, "data")}
    assert {"data/tokenizer.model", "data/stats.json", "data/plots"} <= data_artifacts
    docs_read = client.get_metric_history(run_id, "prepare/shakespeare/docs_read")
    assert docs_read[0].value == len(paragraphs(run["text"]))


def test_resume_continues_with_identical_losses(run):
    tmp = run["tmp"]
    resumed = tmp / "resumed"
    args = [a for a in run["args"] if not a.startswith("--run_dir=")]
    checkpoint = run["run_dir"] / "checkpoints" / f"step_{HALF:08d}"
    lmforge("train", str(TINY), f"--run_dir={resumed}", *args, "--resume", str(checkpoint), cwd=tmp)
    straight = metrics(run["run_dir"], "train/loss")
    again = metrics(resumed, "train/loss")
    assert sorted(again) == list(range(HALF + 1, STEPS + 1))
    assert [again[s] for s in sorted(again)] == [straight[s] for s in sorted(again)]


def test_export_loads_in_transformers_with_the_same_logits(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run["run_dir"] / "export"
    assert (export / "model.safetensors").stat().st_size > 0
    hf_model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(export)
    sp = spm.SentencePieceProcessor(model_file=str(run["tmp"] / "data" / "tokenizer.model"))
    text = run["text"][5000:5600]
    ids = sp.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    native = load_trained_model(run["cfg"].model, run["run_dir"] / "checkpoints")
    input_ids = torch.tensor([ids[:64]])
    with torch.no_grad():
        diff = (hf_model(input_ids).logits - native(input_ids)).abs().max().item()
    assert diff <= 1e-4


def test_generations_continue_the_prompts(run):
    samples = json.loads((run["run_dir"] / "generations.json").read_text(encoding="utf-8"))
    prompts = run["cfg"].generate.prompts
    assert [s["prompt"] for s in samples] == prompts
    for sample in samples:  # the decoded text starts with the prompt and goes on
        assert sample["text"].startswith(sample["prompt"].rstrip("\n"))
        assert len(sample["text"]) > len(sample["prompt"])


def test_in_loop_scores_equal_lmforge_eval_on_the_export(run, capsys):
    from lmforge.launch.cli import main

    final = json.loads((run["run_dir"] / "train_summary.json").read_text())["val_metrics"]
    specs = run["cfg"].eval.task_specs()  # configs/tiny.yaml: the bundled tasks
    assert set(specs) == {"next_line", "word_order", "last_word"}
    scored = {}
    for limit in {spec.limit for spec in specs.values()}:
        tasks = [f"{name}={spec.path}" for name, spec in specs.items() if spec.limit == limit]
        with pytest.raises(SystemExit) as done:
            main(["eval", str(run["run_dir"]), "--json", "--tasks", *tasks,
                  *(["--limit", str(limit)] if limit else [])])
        assert done.value.code == 0
        scored.update(json.loads(capsys.readouterr().out))
    for task, values in scored.items():
        for metric, value in values.items():
            in_loop = final[f"eval/{task}/{metric}"]
            if metric.startswith("acc"):
                assert in_loop == value, (task, metric)
            else:  # DeepSpeed's engine vs transformers on the export: same fp32 weights
                assert in_loop == pytest.approx(value, rel=1e-4), (task, metric)
    # the run's summary ends with them and their chance levels; the curves are drawn
    out = run["stdout"]
    assert "evaluation    : at the last step" in out
    assert f"next_line        acc {final['eval/next_line/acc']:.4f}" in out
    assert "(chance 0.25)" in out and "shakespeare      bpb" in out
    assert final["val/shakespeare/bpb"] > 0
    assert (run["run_dir"] / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
