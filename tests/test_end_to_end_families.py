"""The encoder and encoder-decoder families end to end, as a user runs them:
`lmforge run configs/tiny-bert.yaml` and `lmforge run configs/tiny-seq2seq.yaml`.

Each run (a 200 KB slice of the demo corpus, 20 steps, 2 DeepSpeed processes on gloo, real
Ray and MLflow) is checked against transformers itself: the export loads with the family's
Auto class and AutoTokenizer, its logits on real text match lmforge's model loaded from the
checkpoint, greedy and beam decoding match `generate`, and the printed demonstration is what
transformers computes from its own logits. A corrupted export is refused in its temporary
folder and leaves the published one byte-identical.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from lmforge.launch.config import load_config
from lmforge.launch.export import ExportError
from lmforge.launch.export.from_checkpoint import load_trained_model
from lmforge.launch.export.hf_folder import write_hf_folder
from lmforge.launch.export.verify import ExportCheck
from lmforge.model import generate_seq2seq, to_hf
from lmforge.pipeline.contract.dataset_manifest import DatasetManifest
from lmforge.pipeline.folder_lock import LOCK_FILE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "configs" / "corpora" / "tinyshakespeare.txt"
STEPS = 20


def lmforge_run(config: str, tmp: Path) -> dict:
    """`lmforge run CONFIG`, shortened only: a corpus slice, fewer steps, temp folders."""
    text = CORPUS.read_text(encoding="utf-8")[:200_000]
    corpus = tmp / "shakespeare.txt"
    corpus.write_text(text, encoding="utf-8")
    run_dir = tmp / "run"
    args = [f"--run_dir={run_dir}", f"--data.output_dir={tmp / 'data'}",
            f"--data.datasets.0.paths=[{corpus}]", "--data.seq_len=64",
            "--tokenizer.vocab_size=512", f"--train.max_steps={STEPS}",
            f"--train.eval_every={STEPS}", f"--train.checkpoint_every={STEPS}",
            "--train.log_every=1", "--train.warmup_steps=5", "--tracking.experiment=e2e"]
    proc = subprocess.run([sys.executable, "-m", "lmforge.launch.cli", "run",
                           str(REPO / "configs" / config), *args],
                          capture_output=True, text=True, cwd=tmp, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    cfg = load_config(run_dir / "config.yaml")
    manifest = DatasetManifest.read(tmp / "data")
    return {"tmp": tmp, "text": text, "run_dir": run_dir, "cfg": cfg, "stdout": proc.stdout,
            "manifest": manifest, "export": run_dir / "export",
            "sp": spm.SentencePieceProcessor(model_file=str(manifest.tokenizer_path)),
            "model": load_trained_model(cfg.model, run_dir / "checkpoints"),
            "generations": json.loads((run_dir / "generations.json").read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> dict:
    return lmforge_run("tiny-bert.yaml", tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory) -> dict:
    return lmforge_run("tiny-seq2seq.yaml", tmp_path_factory.mktemp("seq2seq"))


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def real_ids(run: dict, start: int, n: int = 48) -> list[int]:
    ids = run["sp"].encode(run["text"][start:start + 2000])[:n]
    assert len(ids) == n
    return ids


def check_tokenizer(run: dict) -> None:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(run["export"])
    sp, text = run["sp"], run["text"][7000:7600]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    info = run["manifest"].tokenizer
    assert (hf_tok.mask_token_id, hf_tok.pad_token_id, hf_tok.eos_token_id,
            hf_tok.bos_token_id) == (info.mask_id, sp.pad_id(), sp.eos_id(), sp.bos_id())
    assert hf_tok.mask_token == "<mask>" == sp.id_to_piece(info.mask_id)


def test_bert_trains_exports_and_loads_as_masked_lm(bert):
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    loss = losses(bert["run_dir"])
    assert len(loss) == STEPS and loss[-1] < loss[0]
    assert re.search(r"export verified: BertForMaskedLM max \|logit diff\| vs lmforge = ",
                     bert["stdout"])
    hf = AutoModelForMaskedLM.from_pretrained(bert["export"], dtype=torch.float32).eval()
    assert type(hf) is BertForMaskedLM
    check_tokenizer(bert)
    ids = torch.tensor([real_ids(bert, 3000), real_ids(bert, 9000)])
    with torch.no_grad():
        diff = (hf(ids).logits - bert["model"](ids)).abs().max().item()
    assert diff <= 1e-4


def test_bert_fill_mask_demo_is_transformers_top_k(bert):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    hf = AutoModelForMaskedLM.from_pretrained(bert["export"], dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(bert["export"])
    k = bert["cfg"].generate.mask_top_k
    assert [s["prompt"] for s in bert["generations"]] == bert["cfg"].generate.prompts
    for sample in bert["generations"]:
        ids = hf_tok(sample["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        positions = (ids[0] == hf_tok.mask_token_id).nonzero().flatten().tolist()
        assert positions == [m["position"] for m in sample["masks"]] and positions
        with torch.no_grad():
            logits = hf(ids).logits[0]
        for mask, position in zip(sample["masks"], positions, strict=True):
            assert mask["top_ids"] == logits[position].topk(k).indices.tolist()
            assert mask["top_tokens"][0] in bert["stdout"]
    # The export works in transformers' fill-mask pipeline as it stands.
    fill = pipeline("fill-mask", model=str(bert["export"]), tokenizer=str(bert["export"]))
    first = bert["generations"][0]
    got = fill(first["prompt"], top_k=k, tokenizer_kwargs={"add_special_tokens": False})
    assert [r["token"] for r in got] == first["masks"][0]["top_ids"]
    assert "top-5 at masks:" in bert["stdout"]


def test_failed_verification_keeps_the_previous_export(bert):
    cfg, manifest, export = bert["cfg"], bert["manifest"], bert["export"]
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    tok = manifest.tokenizer
    hf_config, hf_state = to_hf(cfg.model, bert["model"].state_dict(), bos_token_id=tok.bos_id,
                                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    # A corrupted weight (one row: a shift of every row would vanish in the LayerNorm).
    hf_state["bert.encoder.layer.1.output.dense.weight"][0] += 0.05
    check = ExportCheck(bert["model"], cfg.model, manifest.tokenizer_model, atol=1e-4,
                        length=32)
    with pytest.raises(ExportError, match=r"differ from the trained model's by (\S+) \(> atol"
                       ) as err:
        write_hf_folder(export, hf_config, hf_state, manifest.tokenizer_path, verify=check)
    measured = float(re.search(r"by (\S+) \(>", str(err.value)).group(1))
    assert measured > 1e-3
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    leftovers = [p.name for p in export.parent.iterdir()
                 if p.name.startswith(".") and p.name != LOCK_FILE]  # the run's lock stays
    assert leftovers == []


def test_seq2seq_trains_exports_and_loads_as_seq2seq_lm(seq2seq):
    from transformers import AutoModelForSeq2SeqLM, BartForConditionalGeneration

    loss = losses(seq2seq["run_dir"])
    assert len(loss) == STEPS and loss[-1] < loss[0]
    assert re.search(r"export verified: BartForConditionalGeneration max \|logit diff\| vs "
                     r"lmforge = \S+; greedy tokens identical", seq2seq["stdout"])
    hf = AutoModelForSeq2SeqLM.from_pretrained(seq2seq["export"], dtype=torch.float32).eval()
    assert type(hf) is BartForConditionalGeneration
    check_tokenizer(seq2seq)
    src = torch.tensor([real_ids(seq2seq, 3000), real_ids(seq2seq, 9000)])
    tgt = torch.tensor([real_ids(seq2seq, 5000), real_ids(seq2seq, 11000)])
    with torch.no_grad():
        theirs = hf(input_ids=src, decoder_input_ids=tgt).logits
        diff = (theirs - seq2seq["model"](src, tgt)).abs().max().item()
    assert diff <= 1e-4
    eos = seq2seq["manifest"].tokenizer.eos_id
    source = src[:1]
    ours = generate_seq2seq(seq2seq["model"], source, 16, decoder_start_id=eos, eos_id=eos)
    greedy = hf.generate(input_ids=source, max_new_tokens=16, do_sample=False, num_beams=1)
    assert greedy.tolist() == ours.tolist()


def test_seq2seq_beam_demo_is_transformers_beam_search(seq2seq):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    hf = AutoModelForSeq2SeqLM.from_pretrained(seq2seq["export"], dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(seq2seq["export"])
    sample_cfg = seq2seq["cfg"].generate
    assert [s["prompt"] for s in seq2seq["generations"]] == sample_cfg.prompts
    beam = {"num_beams": sample_cfg.num_beams, "do_sample": False, "length_penalty": 1.0,
            "early_stopping": True}
    for sample in seq2seq["generations"]:
        src = hf_tok(sample["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        out = hf.generate(input_ids=src, max_new_tokens=sample_cfg.max_new_tokens, **beam)
        assert sample["ids"] == out[0].tolist()
        assert sample["text"] in seq2seq["stdout"]
    # Twenty steps of training give near-constant targets; the same search over weights
    # moved off them (through the export mapping into transformers) gives varied ones.
    model = copy.deepcopy(seq2seq["model"])
    cfg, tok = seq2seq["cfg"], seq2seq["manifest"].tokenizer
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.add_(0.3 * torch.randn(weight.shape, generator=generator))
    _, state = to_hf(cfg.model, model.state_dict())
    assert not hf.load_state_dict(state, strict=False).unexpected_keys
    outputs = set()
    for start in (2000, 4000, 6000, 8000):
        src = torch.tensor([real_ids(seq2seq, start, 16)])
        theirs = hf.generate(input_ids=src, max_new_tokens=16, **beam)
        ours = generate_seq2seq(model, src, 16, decoder_start_id=tok.eos_id, eos_id=tok.eos_id,
                                num_beams=sample_cfg.num_beams)
        assert ours.tolist() == theirs.tolist()
        outputs.add(tuple(ours[0].tolist()))
    assert len(outputs) > 1
