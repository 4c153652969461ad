"""Tiny random Hugging Face exports (a Llama decoder, a BART encoder-decoder) written by
lmforge's own export writer with a sentencepiece tokenizer trained on the demo corpus, and
small task files made from the corpus, shared by the eval tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import BartConfig, BartForConditionalGeneration, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lmforge.launch.export.hf_folder import write_hf_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "configs" / "corpora" / "tinyshakespeare.txt"
IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


@pytest.fixture(scope="session")
def eval_spm(tmp_path_factory) -> Path:
    """A 500-piece BPE model with lmforge's trainer options (as tests/launch/export)."""
    prefix = tmp_path_factory.mktemp("eval_spm") / "spm"
    spm.SentencePieceTrainer.train(
        input=str(CORPUS), model_prefix=str(prefix), vocab_size=500, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, pad_id=0,
        unk_id=1, bos_id=2, eos_id=3, input_sentence_size=5000, shuffle_input_sentence=True,
        num_threads=1, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def llama_export(eval_spm: Path, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **IDS))
    out = tmp_path_factory.mktemp("llama") / "export"
    return write_hf_folder(out, model.config.to_dict(), model.state_dict(), eval_spm)


@pytest.fixture(scope="session")
def bart_export(eval_spm: Path, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=500, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=3, **IDS))
    out = tmp_path_factory.mktemp("bart") / "export"
    return write_hf_folder(out, model.config.to_dict(), model.state_dict(), eval_spm)


def corpus_lines(count: int, start: int = 0) -> list[str]:
    """Distinct speech lines of the corpus (no speaker headings), in corpus order."""
    lines: list[str] = []
    for raw in CORPUS.read_text(encoding="utf-8").splitlines()[start:]:
        line = " ".join(raw.split())
        if line and not line.endswith(":") and line not in lines:
            lines.append(line)
        if len(lines) == count:
            break
    return lines


@pytest.fixture(scope="session")
def eval_task_files(tmp_path_factory) -> dict[str, Path]:
    """``mc.jsonl`` (4 choices: the line that follows, and three others) and ``cloze.jsonl``
    (a line's last word), with the cases the harness treats specially: an empty context, a
    context ending in whitespace (moved to the continuation), non-ASCII choices."""
    folder = tmp_path_factory.mktemp("eval_tasks")
    lines = corpus_lines(60)
    mc = []
    for i in range(0, 40, 2):
        passage, follow = lines[i], lines[i + 1]
        others = [lines[(i + k * 7 + 3) % 60] for k in range(1, 4)]
        gold = i % 4
        choices = others[:gold] + [follow] + others[gold:]
        mc.append({"context": passage, "choices": choices, "gold": gold})
    mc[1]["context"] = ""
    mc[2]["context"] += "\n"
    mc[3]["context"] += " "
    mc[4]["choices"] = ["café au lait", "naïve—yes", "plain words", "déjà vu"]
    # the BART export's acc_norm (by characters) and acc_bytes pick different choices here
    mc.append({"context": "First Citizen: Before we proceed any further, hear me speak.",
               "choices": ["ééé", "abc", "ñññññ", "xyz"], "gold": 1})
    cloze = [{"context": " ".join(line.split()[:-1]), "target": line.split()[-1]}
             for line in lines[40:60] if len(line.split()) > 2]
    cloze[0]["context"] += " "
    files = {"mc": folder / "mc.jsonl", "cloze": folder / "cloze.jsonl"}
    for name, rows in (("mc", mc), ("cloze", cloze)):
        files[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                               encoding="utf-8")
    return files
