"""Shared building blocks: norms, positions, attention (self and cross), feed-forward,
attention masks, the KV cache and the initialisation conventions.

Shapes: B batch, T query length, S key length, H query heads, K kv heads, D head_dim.
Nothing here holds per-call state, so a block recomputed under activation
checkpointing gives bit-identical results.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from lmforge.model.document_masks import (
    DocumentSegments,
    document_block_mask,
    document_segments,
    flex_attention_call,
    use_flex,
)
from lmforge.model.rope import rope_frequencies

if TYPE_CHECKING:
    from lmforge.model.config import ModelConfig  # annotations only: config.build() imports us



class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Llama), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm layer the config asks for."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


# ---- positions (computed on the fly in fp32: no buffers to be cast to bf16) -----------
def rope_cos_sin(cfg: ModelConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rotary tables for `positions` (B or 1, T) -> cos, sin of shape (B or 1, 1, T, D).

    Uses the rotate-half layout of Hugging Face Llama, so its weights map unchanged; the
    frequencies and yarn's attention factor follow `cfg.rope_scaling` (model/rope.py).
    """
    inv_freq, scale = rope_frequencies(cfg, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, D) by the tables from `rope_cos_sin`."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def sinusoidal_embedding(positions: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Fixed 2017-paper encodings for `positions` (B, T) -> (B, T, dim), sin/cos interleaved."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                         * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * inv_freq  # (B, T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).to(dtype)


def alibi_slopes(n_heads: int, device: torch.device | None = None) -> Tensor:
    """ALiBi head slopes (Press et al.), including the non-power-of-two rule."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, device=device, dtype=torch.float32)


# ---- masks ----------------------------------------------------------------------------
def build_attention_mask(
    cfg: ModelConfig,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool,
    q_segments: Tensor | None = None,
    k_segments: Tensor | None = None,
    key_padding: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor | BlockMask | DocumentSegments | None, bool]:
    """Mask argument for `scaled_dot_product_attention`, built once per forward.

    Args:
        cfg: model config (ALiBi needs the head count).
        q_pos: (B, T) or (1, T) sequence indices of the queries (cache offset included);
            causality and ALiBi distances use these, never restarting `position_ids`.
        k_pos: (B, S) or (1, S) sequence indices of the keys.
        causal: keys after the query are hidden.
        q_segments: (B, T) document ids of the queries; with `k_segments` attention stays
            inside equal ids (packed documents).
        k_segments: (B, S) document ids of the keys.
        key_padding: (B, S) bool, True where the key is a real token.
        dtype: dtype of an additive (ALiBi) mask.

    Returns:
        (mask, is_causal): mask is None, a bool (B|1, 1, T, S) tensor (True = attend), an
        additive float (B|1, H, T, S) tensor, or with packed documents a FlexAttention
        `BlockMask` (CUDA) or `DocumentSegments` (elsewhere), neither a T x S tensor (see
        model/document_masks.py); is_causal is True only when SDPA's built-in causal path
        is exact (no mask, T == S, positions aligned).
    """
    T, S = q_pos.shape[-1], k_pos.shape[-1]
    alibi = cfg.position == "alibi"
    if not alibi and q_segments is None and key_padding is None:
        if not causal or T == 1:
            return None, False
        if T == S:
            return None, True
    if q_segments is not None and k_segments is not None and use_flex(cfg, q_pos.device):
        return document_block_mask(q_pos, k_pos, q_segments, k_segments, key_padding,
                                   causal), False
    if q_segments is not None and k_segments is not None:
        segments = document_segments(cfg, q_pos, k_pos, q_segments, k_segments, key_padding,
                                     causal)
        if segments is not None:
            return segments, False
    allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=q_pos.device)
    if causal:
        allowed = allowed & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    if q_segments is not None and k_segments is not None:
        allowed = allowed & (q_segments[:, None, :, None] == k_segments[:, None, None, :])
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].bool()
    if not alibi:
        return allowed, False
    distance = (k_pos[:, None, None, :] - q_pos[:, None, :, None]).abs().float()  # (B,1,T,S)
    bias = -alibi_slopes(cfg.n_heads, q_pos.device)[None, :, None, None] * distance
    bias = bias.masked_fill(~allowed, float("-inf"))
    return bias.to(dtype), False


# ---- KV cache ---------------------------------------------------------------------------
class LayerCache:
    """Preallocated keys/values of one attention layer, (B, K, max_len, D)."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0
        self.max_len = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new (B, K, t, D) keys/values; return all cached so far."""
        t = k.shape[2]
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        if self.length + t > self.max_len:
            raise ValueError(f"max_len: KV cache holds {self.max_len} positions, "
                             f"{self.length + t} needed; create a larger cache")
        self.k[:, :, self.length:self.length + t] = k
        self.v[:, :, self.length:self.length + t] = v
        self.length += t
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def set_static(self, k: Tensor, v: Tensor) -> None:
        """Keep cross-attention keys/values of the encoder output (computed once)."""
        self.k, self.v, self.length = k, v, k.shape[2]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class KVCache:
    """Per-layer caches for incremental decoding; `length` is the number of cached positions.

    `cross` holds an encoder-decoder's cross-attention keys/values (computed once).
    """

    def __init__(self, n_layers: int, max_len: int, *, cross: bool = False) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]
        for layer in self.layers:
            layer.max_len = max_len
        self.cross = [LayerCache() for _ in range(n_layers)] if cross else []

    @property
    def length(self) -> int:
        """Positions already cached."""
        return self.layers[0].length

    def reorder(self, index: Tensor) -> None:
        """Select batch rows of every layer (beam search)."""
        for layer in self.layers + self.cross:
            layer.reorder(index)


# ---- attention and feed-forward -----------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention with grouped/multi-query variants through SDPA.

    Self-attention projects q, k, v with one fused matrix `qkv` (rows: H*D queries, then
    K*D keys, then K*D values). Cross-attention has `q` for the queries and a fused `kv`
    for the encoder memory.
    """

    def __init__(self, cfg: ModelConfig, *, cross: bool = False) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.cross = cross
        self.dropout = cfg.dropout
        q_dim, kv_dim = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
        if cross:
            self.q = nn.Linear(cfg.d_model, q_dim, bias=cfg.bias)
            self.kv = nn.Linear(cfg.d_model, 2 * kv_dim, bias=cfg.bias)
        else:
            qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
            self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        # Qwen3: RMSNorm over each head's D features of q and k, before RoPE.
        self.q_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm and not cross else None
        self.k_norm = RMSNorm(cfg.head_size, cfg.norm_eps) if cfg.qk_norm and not cross else None
        self.out = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        self.out.residual_out = True  # scaled by the gpt2/llama initialisers

    def _heads(self, x: Tensor, n: int) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def forward(
        self,
        x: Tensor,
        cos: Tensor | None,
        sin: Tensor | None,
        mask: Tensor | None,
        is_causal: bool,
        cache: LayerCache | None = None,
        memory: Tensor | None = None,
    ) -> Tensor:
        """Attend from x (B, T, d_model); `memory` (B, S, d_model) for cross-attention."""
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        if self.cross:
            q = self._heads(self.q(x), self.n_heads)
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                k, v = self.kv(memory).split(kv_dim, dim=-1)
                k, v = self._heads(k, self.kv_heads), self._heads(v, self.kv_heads)
                if cache is not None:
                    cache.set_static(k, v)
        else:
            q, k, v = self.qkv(x).split((q_dim, kv_dim, kv_dim), dim=-1)
            q, k, v = self._heads(q, self.n_heads), self._heads(k, self.kv_heads), \
                self._heads(v, self.kv_heads)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if cos is not None:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.append(k, v)
        dropout_p, gqa = self.dropout if self.training else 0.0, self.kv_heads != self.n_heads
        if isinstance(mask, BlockMask):  # packed documents (see document_mask_backend)
            y = flex_attention_call(q, k, v, mask, gqa)
        elif isinstance(mask, DocumentSegments):  # packed documents, one SDPA per length
            y = mask.attend(q, k, v, dropout_p, gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=dropout_p, enable_gqa=gqa)
        return self.out(y.transpose(1, 2).reshape(B, T, q_dim))


class MLP(nn.Module):
    """Feed-forward block; swiglu fuses gate and up projections into `gate_up` (gate first)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        width = cfg.ffn_dim
        if cfg.activation == "swiglu":
            self.gate_up = nn.Linear(cfg.d_model, 2 * width, bias=cfg.bias)
        else:
            self.up = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.down = nn.Linear(width, cfg.d_model, bias=cfg.bias)
        self.down.residual_out = True

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        h = self.up(x)
        if self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    """Self-attention then feed-forward, each in a pre- or post-norm residual.

    Causality, padding and packed documents come from the mask arguments, so decoder and
    encoder stacks share this block. `attn` is the target of selective checkpointing.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor | None,
                is_causal: bool, cache: LayerCache | None = None) -> Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, cos, sin, mask, is_causal, cache)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


# ---- initialisation ---------------------------------------------------------------------
Gather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]
_GATHER: ContextVar[Gather | None] = ContextVar("lmforge_init_gather", default=None)


@contextlib.contextmanager
def gathered_init(gather: Gather) -> Iterator[None]:
    """While active, :func:`init_weights` initialises each module's parameters inside
    ``gather(params)``: for a model built partitioned (ZeRO-3), a context that holds those
    parameters whole and writes the values back to every partition on exit. Every rank
    draws the same values in the same order as a whole build, so both give equal weights."""
    token = _GATHER.set(gather)
    try:
        yield
    finally:
        _GATHER.reset(token)


def _own(module: nn.Module) -> list[nn.Parameter]:
    """The parameters ``init_weights`` writes on ``module`` itself (a tied head's weight is
    the embedding's, written there)."""
    tied = getattr(module, "tied_to_embedding", False)
    return [p for n, p in module.named_parameters(recurse=False) if not (tied and n == "weight")]


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Apply the config's initialisation convention to every submodule (one module's
    parameters at a time, gathered when built partitioned: :func:`gathered_init`)."""
    gather = _GATHER.get() or (lambda params: contextlib.nullcontext())
    std = cfg.init_std
    for module in model.modules():
        with gather(_own(module)):
            _init_module(module, cfg, std)
    if cfg.init in ("gpt2", "llama"):
        for name, module in model.named_modules():
            if getattr(module, "residual_out", False):
                if cfg.init == "gpt2":
                    scaled = std / math.sqrt(2 * cfg.n_layers)
                else:
                    layer = next((int(p) for p in name.split(".") if p.isdigit()), 0)
                    scaled = std / math.sqrt(2 * (layer + 1))
                with gather([module.weight]):
                    nn.init.normal_(module.weight, 0.0, scaled)


def _init_module(module: nn.Module, cfg: ModelConfig, std: float) -> None:
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        if getattr(module, "tied_to_embedding", False):
            return  # the weight is initialised as the embedding it shares
        if cfg.init == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            nn.init.normal_(module.weight, 0.0, std)
    elif isinstance(module, nn.Embedding):
        emb_std = cfg.d_model ** -0.5 if cfg.init == "xavier" else std
        nn.init.normal_(module.weight, 0.0, emb_std)
    elif isinstance(module, (nn.LayerNorm, RMSNorm)):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

