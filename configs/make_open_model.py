"""Makes a stand-in "open model" folder for configs/tiny-continue.yaml: a tiny Llama 3 style
model (rope_type llama3, grouped-query attention, random weights) with a byte-level BPE
`tokenizer.json` trained with `tokenizers` on the demo corpus (bos prepended, as Llama 3's),
saved with `transformers` exactly as a downloaded Llama 3 folder is laid out.

    python configs/make_open_model.py runs/open-model
    lmforge run configs/tiny-continue.yaml

The real-world version points `init.source` and `tokenizer.model_path` at a Llama 3 or Qwen
folder on disk instead (see README, "Continue pretraining an open model").
"""

from __future__ import annotations

import argparse
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpora" / "tinyshakespeare.txt"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def make_open_model(out: Path, vocab_size: int = 2048, seed: int = 0) -> Path:
    """Writes the model folder (config.json, model.safetensors, tokenizer files) to `out`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(CORPUS)], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[
            (BOS, tokenizer.token_to_id(BOS))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS,
                                                eos_token=EOS)
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=128, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS),
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("runs/open-model"))
    args = parser.parse_args()
    print(f"open model written to {make_open_model(args.out)}")


if __name__ == "__main__":
    main()
