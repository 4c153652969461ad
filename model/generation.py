"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, EOS stop;
greedy and beam search for encoder-decoder models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from (B, V) logits.

    Args:
        logits: (B, V) scores of the next token.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep only the k most likely tokens.
        top_p: keep the smallest set of tokens whose probability reaches top_p (nucleus).
        generator: random source for reproducible sampling.

    Returns:
        (B,) long token ids.
    """
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (keeps >= 1).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    greedy: bool = False,
) -> Tensor:
    """Continue prompts with a decoder-only model, using its KV cache.

    Args:
        model: a `DecoderLM` (anything with `new_cache(max_len)` and
            `forward(input_ids, cache=...)`); run in eval mode for the call.
        input_ids: (B, T) prompts, all of the same length (no left padding).
        max_new_tokens: tokens to append at most.
        temperature: sampling temperature; 0 = greedy.
        top_k: sample among the k most likely tokens only.
        top_p: nucleus sampling threshold.
        eos_id: stop a row at this token; finished rows are filled with it, and generation
            ends early once every row has finished.
        generator: random source for reproducible sampling.
        greedy: same as temperature 0.

    Returns:
        (B, T + n) prompts followed by the n <= max_new_tokens generated tokens.
    """
    _check_args(temperature, top_k, top_p)
    if greedy:
        temperature = 0.0
    if max_new_tokens <= 0:
        return input_ids
    was_training = model.training
    model.eval()
    try:
        B, T = input_ids.shape
        cache = model.new_cache(T + max_new_tokens)
        logits = model(input_ids, cache=cache)[:, -1]
        out = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                generator=generator)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done = done | (token == eos_id)
            out.append(token[:, None])
            if (eos_id is not None and bool(done.all())) or step == max_new_tokens - 1:
                break
            logits = model(token[:, None], cache=cache)[:, -1]
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_seq2seq(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    decoder_start_id: int,
    attention_mask: Tensor | None = None,
    eos_id: int | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> Tensor:
    """Greedy (num_beams=1) or beam-search decoding with an encoder-decoder model.

    Args:
        model: an `EncoderDecoderModel` (`encode`, `decode`, `new_cache`).
        input_ids: (B, S) source tokens.
        max_new_tokens: target tokens to produce at most.
        decoder_start_id: first decoder input (BART: EOS; T5: PAD).
        attention_mask: (B, S) source padding mask, 1 for real tokens.
        eos_id: a hypothesis ends at this token; finished rows are filled with it.
        num_beams: beams per source; 1 = greedy.
        length_penalty: beam scores are sum(log p) / length**length_penalty.

    Returns:
        (B, 1 + n) target sequences starting with `decoder_start_id`.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams: must be >= 1, got {num_beams}")
    was_training = model.training
    model.eval()
    try:
        if num_beams == 1:
            return _greedy_seq2seq(model, input_ids, max_new_tokens, decoder_start_id,
                                   attention_mask, eos_id)
        return _beam_seq2seq(model, input_ids, max_new_tokens, decoder_start_id,
                             attention_mask, eos_id, num_beams, length_penalty)
    finally:
        model.train(was_training)


def _greedy_seq2seq(model: nn.Module, src: Tensor, max_new: int, start: int,
                    mask: Tensor | None, eos_id: int | None) -> Tensor:
    B = src.shape[0]
    memory = model.encode(src, mask)
    cache = model.new_cache(max_new + 1)
    out = torch.full((B, 1), start, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for _ in range(max_new):
        token = model.decode(out[:, -1:], memory, mask, cache)[:, -1].argmax(-1)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done = done | (token == eos_id)
        out = torch.cat([out, token[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return out


def _beam_seq2seq(model: nn.Module, src: Tensor, max_new: int, start: int,
                  mask: Tensor | None, eos_id: int | None, K: int, length_penalty: float
                  ) -> Tensor:
    B, device = src.shape[0], src.device
    memory = model.encode(src, mask).repeat_interleave(K, dim=0)  # (B*K, S, d)
    mask = None if mask is None else mask.repeat_interleave(K, dim=0)
    cache = model.new_cache(max_new + 1)
    seqs = torch.full((B * K, 1), start, dtype=torch.long, device=device)
    # Only the first beam is live at the start, so the K beams do not all pick one token.
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(B)]
    for step in range(max_new):
        logp = F.log_softmax(model.decode(seqs[:, -1:], memory, mask, cache)[:, -1].float(), -1)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=-1)  # (B, 2K)
        next_beam = torch.zeros(B, K, dtype=torch.long, device=device)
        next_token = torch.zeros(B, K, dtype=torch.long, device=device)
        new_scores = torch.full((B, K), float("-inf"), device=device)
        for b in range(B):
            kept = 0
            for score, idx in zip(top_scores[b].tolist(), top_idx[b].tolist(), strict=True):
                beam, token = divmod(idx, V)
                if eos_id is not None and token == eos_id:
                    if len(finished[b]) < K:
                        hyp = torch.cat([seqs[b * K + beam], seqs.new_tensor([token])])
                        finished[b].append((score / (step + 1) ** length_penalty, hyp))
                    continue
                next_beam[b, kept], next_token[b, kept], new_scores[b, kept] = beam, token, score
                kept += 1
                if kept == K:
                    break
        index = (torch.arange(B, device=device)[:, None] * K + next_beam).view(-1)
        cache.reorder(index)
        seqs = torch.cat([seqs[index], next_token.view(-1, 1)], dim=1)
        scores = new_scores
        if all(len(f) >= K for f in finished):
            break
    n = seqs.shape[1] - 1
    for b in range(B):
        for k in range(K):
            if len(finished[b]) < K or eos_id is None:
                finished[b].append((scores[b, k].item() / max(n, 1) ** length_penalty,
                                    seqs[b * K + k]))
    best = [max(f, key=lambda item: item[0])[1] for f in finished]
    fill = eos_id if eos_id is not None else 0
    out = torch.full((B, max(len(h) for h in best)), fill, dtype=torch.long, device=device)
    for b, hyp in enumerate(best):
        out[b, : len(hyp)] = hyp
    return out
