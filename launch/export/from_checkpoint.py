"""From a DeepSpeed checkpoint to a native model, a verified Hugging Face folder and samples."""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch
from torch import nn

from lmforge.launch import checkpoint as ckpt
from lmforge.launch.config import RunConfig
from lmforge.launch.export import verify_logits, write_hf_folder
from lmforge.model import generate, to_hf


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, gathered from every ZeRO partition."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_states = folder / "mp_rank_00_model_states.pt"
    zero_files = list(folder.glob("*optim_states.pt"))
    if zero_files:
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:  # ZeRO stage 0 keeps the module's own weights
        state = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def load_trained_model(cfg: RunConfig, run_dir: Path, checkpoint: str | None = None) -> nn.Module:
    """Builds the model and loads a checkpoint (default: the newest complete one)."""
    folder = ckpt.find_resume(run_dir / "checkpoints", checkpoint or "auto")
    if folder is None:
        raise FileNotFoundError(
            f"{run_dir / 'checkpoints'}: no complete checkpoint; train first (`lmforge train`)"
        )
    model = cfg.model.build()
    state = consolidated_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied output head is saved once, under the embedding's name.
    missing = [k for k in missing if not _is_tied_copy(model, k)]
    if missing or unexpected:
        raise RuntimeError(
            f"{folder}: checkpoint does not match model.* config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.float().eval()


def _is_tied_copy(model: nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    return name in params and name not in unique


def export_run(
    cfg: RunConfig, run_dir: Path, manifest: Path, out_dir: Path, checkpoint: str | None = None
) -> Path:
    """Writes ``out_dir`` (config.json, model.safetensors, tokenizer) and checks logit parity.

    Returns:
        The export folder.

    Raises:
        ExportError: transformers' logits differ from lmforge's by more than
            ``export.verify_atol``, or the exported tokenizer encodes differently.
    """
    tokenizer = json.loads(manifest.read_text())["tokenizer"]
    model = load_trained_model(cfg, run_dir, checkpoint)
    hf_config, hf_state = to_hf(
        cfg.model,
        model.state_dict(),
        bos_token_id=tokenizer["bos_id"],
        eos_token_id=tokenizer["eos_id"],
        pad_token_id=tokenizer["pad_id"],
    )
    out = write_hf_folder(out_dir, hf_config, hf_state, manifest.parent / tokenizer["file"])
    generator = torch.Generator().manual_seed(cfg.seed)
    length = min(cfg.data.seq_len, 64)
    input_ids = torch.randint(0, tokenizer["vocab_size"], (2, length), generator=generator)
    with torch.no_grad():
        reference = model(input_ids)
    diff = verify_logits(out, reference, input_ids, atol=cfg.export.verify_atol)
    print(f"export verified: max |logit diff| vs transformers = {diff:.2e}", flush=True)
    return out


def sample_texts(cfg: RunConfig, model: nn.Module, manifest: Path) -> list[str]:
    """Continues each ``sample.prompts`` entry; returns prompt + continuation texts."""
    info = json.loads(manifest.read_text())["tokenizer"]
    sp = spm.SentencePieceProcessor(model_file=str(manifest.parent / info["file"]))
    generator = torch.Generator().manual_seed(cfg.seed)
    texts = []
    for prompt in cfg.sample.prompts:
        ids = torch.tensor([sp.encode(prompt)], dtype=torch.long)
        with torch.no_grad():
            out = generate(
                model,
                ids,
                max_new_tokens=cfg.sample.max_new_tokens,
                temperature=cfg.sample.temperature,
                top_k=cfg.sample.top_k,
                top_p=cfg.sample.top_p,
                eos_id=info["eos_id"],
                generator=generator,
            )
        texts.append(sp.decode(out[0].tolist()))
    return texts
