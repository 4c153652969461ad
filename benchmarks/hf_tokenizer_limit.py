"""The Hugging Face tokenizer side of benchmarks/prepare.py: the tokenizer it prepares with,
and the limit it is compared with.

- `hf_tokenizer_folder`: a byte-level BPE (Llama 3 / GPT-2 style) trained with `tokenizers`
  on the demo corpus, saved as an HF folder with transformers, as a user's would be.
- `single_thread_rate`: `tokenizers` on one thread, its fastest call (`encode_batch_fast`
  in batches of 1000, no offsets) with TOKENIZERS_PARALLELISM=false (its Rayon pool off), in
  a fresh process (this file run as a script) so the caller's imports and environment play
  no part.

Run as a script: python benchmarks/hf_tokenizer_limit.py TOKENIZER_JSON DOCS_JSONL SECONDS
(prints tokens/s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "configs" / "corpora" / "tinyshakespeare.txt"


def hf_tokenizer_folder(folder: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer of `vocab_size` tokens saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(re.split(r"\n\n+", CORPUS.read_text()), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(str(folder))
    return folder


def single_thread_rate(folder: Path, docs: Path, seconds: float = 3.0) -> float:
    """Single-thread `tokenizers` tokens/s on the documents of a JSON-lines file."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, __file__, str(folder / "tokenizer.json"), str(docs),
                           str(seconds)], capture_output=True, text=True, check=True,
                          env={**env, "TOKENIZERS_PARALLELISM": "false"})
    return float(proc.stdout.strip())


def _measure(tokenizer_json: str, docs_jsonl: str, seconds: float) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    docs = [json.loads(line)["text"] for line in open(docs_jsonl, encoding="utf-8")]
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(docs), 1000):
            tokens += sum(len(e.ids) for e in tok.encode_batch_fast(docs[i : i + 1000]))
    return tokens / (time.perf_counter() - start)


if __name__ == "__main__":
    print(_measure(sys.argv[1], sys.argv[2], float(sys.argv[3])))
