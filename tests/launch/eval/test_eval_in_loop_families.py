"""The in-loop scorer (``LoopEval``) on lmforge's own decoder and encoder-decoder gives what
``lmforge eval`` gives on their Hugging Face exports (transformers' Llama and BART): the
requests, the encoder-decoder's decoder start and masks, the metrics. In one process (the
model stands where the engine does); ranks and ZeRO-3 are tested elsewhere."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from lmforge.launch.eval.in_loop import LoopEval
from lmforge.launch.eval.on_export import load_export
from lmforge.launch.eval.scoring import PairEncoder, score_task
from lmforge.launch.eval.tasks import read_jsonl_task
from lmforge.launch.export.hf_folder import write_hf_folder
from lmforge.model import ModelConfig
from lmforge.model.hf import to_hf
from lmforge.model.presets import PRESETS

BOS, EOS, PAD = 2, 3, 0
SMALL = {"vocab_size": 500, "d_model": 32, "n_heads": 4, "d_ff": 64, "max_seq_len": 64,
         "dropout": 0.0}


@pytest.mark.parametrize("preset,backend", [("tiny", "causal"), ("bart-small", "seq2seq")])
def test_loop_eval_equals_lmforge_eval_on_the_export(preset, backend, eval_spm,
                                                      eval_task_files, tmp_path):
    torch.manual_seed(0)
    layers = {"n_layers": 2, "n_kv_heads": 2} if preset == "tiny" else {"n_layers": 1}
    cfg = ModelConfig(**{**PRESETS[preset], **SMALL, **layers})
    model = cfg.build().eval()
    hf_config, hf_state = to_hf(cfg, model.state_dict(), bos_token_id=BOS, eos_token_id=EOS,
                                pad_token_id=PAD, decoder_start_token_id=EOS)
    export = write_hf_folder(tmp_path / "export", hf_config, hf_state, eval_spm)
    tasks = [read_jsonl_task(path, name).limited(12) for name, path in eval_task_files.items()]

    encoder, loglikelihood = load_export(export, batch_size=8)
    assert encoder.backend == backend
    exported = {t.name: score_task(t, encoder, loglikelihood).metrics() for t in tasks}

    sp = spm.SentencePieceProcessor(model_file=str(eval_spm))
    # the dataset's tokenizer as training has it (sentencepiece adds no special tokens)
    loop = LoopEval(tasks, PairEncoder(lambda text, special: sp.encode(text), BOS, backend),
                    cfg.max_seq_len, 4, None, {}, decoder_start_id=EOS)
    model.device = torch.device("cpu")  # what LoopEval reads of the engine besides forward
    with torch.no_grad():
        in_loop = loop.evaluate(model, None, (0.0, 0.0), lambda values: values, 0, 1)
    for task, values in exported.items():
        for metric, value in values.items():
            got = in_loop[f"eval/{task}/{metric}"]
            assert got == (value if metric.startswith("acc") else pytest.approx(value, rel=1e-5)
                           ), (task, metric)
    assert in_loop["eval/mc/chance"] == 0.25 and "eval/cloze/chance" not in in_loop
