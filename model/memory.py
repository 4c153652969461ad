"""The memory plan of a training step per rank, from the config alone (``--dry-run``).

Model states follow the ZeRO paper (Rajbhandari et al. 2020, §3.1): with mixed precision
and Adam each parameter costs 2 (16-bit weight) + 2 (16-bit gradient) + 12 (fp32 master
weight, momentum, variance) = 16 bytes; ZeRO stage 1 divides the 12 by the data-parallel
size N, stage 2 also the gradients, stage 3 also the weights. In fp32 the weights and
gradients are 4 bytes each; DeepSpeed's ZeRO optimizers (stage >= 1) still keep their own
fp32 copy of the partition (so 4 + 4 + 12/N), a plain optimizer (stage 0) only m and v
(4 + 4 + 8). Offload moves the optimizer's bytes (and at stage 3 the weights) to the host.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", §4.1): count every tensor autograd keeps for the backward, per layer,
in bytes per token. For their GPT layer (16-bit, LayerNorm, 4h GeLU MLP, dropout) that
gives 34·h per token plus 5·a·s for the score matrix; with a fused attention kernel
(SDPA/flash keeps no score matrix) 34·h, which this module reproduces exactly for that
configuration (see `layer_activation_bytes`). lmforge's own layers differ in the details,
each term below names the tensor it counts. Full checkpointing keeps each checkpointed
block's input and recomputes one block at a time; selective keeps `block.attn`'s input
only. The recomputed block's tensors (`recompute_bytes`) exist only during that block's
backward, after the loss's backward has freed the logits, so the peak takes the larger of
the two, not their sum. The logits line is the loss's peak: the fp32 log-softmax output
with its incoming and outgoing gradients (12 bytes per logit) for every predicted token, or
for one chunk with `train.loss_chunk_tokens` (`losses.chunked_lm_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lmforge.model.config import ModelConfig
from lmforge.model.estimates import parameter_count

Checkpointing = Literal["none", "full", "selective"]


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of one training configuration, by what holds them."""

    params: float
    """Model weights on the device (this rank's share under ZeRO-3)."""
    grads: float
    """Gradients on the device (this rank's share under ZeRO-2/3)."""
    optimizer: float
    """Optimizer state on the device: Adam m and v, plus the fp32 master copy."""
    activations: float
    """Tensors the blocks keep for the backward (one micro-batch); with checkpointing the
    kept block inputs, the recomputed block being `recompute`."""
    logits: float
    """Logits and loss buffers of the vocabulary loss (peak, one micro-batch)."""
    host: float = 0.0
    """Offloaded optimizer state (and ZeRO-3 offloaded weights) in host memory."""
    buffers: float = 0.0
    """The engine's resident communication buffers (gradient buckets, gathered weights)."""
    transient: float = 0.0
    """Buffers filled during or after the backward (a gradient bucket, a flattened
    all-reduce copy), when the activations and logits are already freed."""
    recompute: float = 0.0
    """The tensors of one recomputed block (activation checkpointing), alive during that
    block's backward only: after the loss's backward has freed the logits."""

    @property
    def device_total(self) -> float:
        """What the device holds at the step's peak: the states and resident buffers, plus
        the largest of: the kept activations with the larger of the loss's logits and one
        recomputed block (the backward), and the post-backward transients."""
        resident = self.params + self.grads + self.optimizer + self.buffers
        backward = self.activations + max(self.logits, self.recompute)
        return resident + max(backward, self.transient)

    def rows(self) -> list[tuple[str, float]]:
        """(name, bytes) in printing order."""
        return [("parameters", self.params), ("gradients", self.grads),
                ("optimizer state", self.optimizer), ("activations", self.activations),
                ("logits / loss", self.logits), ("recomputed block", self.recompute),
                ("engine buffers", self.buffers),
                ("after backward", self.transient), ("peak (device)", self.device_total),
                ("offloaded (host)", self.host)]


def state_bytes_per_param(precision: str, zero_stage: int) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per parameter before any ZeRO division."""
    if precision == "fp32":
        return 4, 4, 12 if zero_stage >= 1 else 8
    return 2, 2, 12


def _norm_bytes(cfg: ModelConfig, e: int) -> int:
    """Per token and d_model unit: RMSNorm upcasts, keeping its fp32 input and the
    normalised value in the model dtype; LayerNorm keeps its input (mean/rstd are per token)."""
    if cfg.norm == "rmsnorm":
        return 4 + e if e != 4 else 8
    return e


def layer_activation_bytes(cfg: ModelConfig, e: int, seq_len: int, *, cross: bool = False
                           ) -> float:
    """Bytes one self-attention block keeps per token (no checkpointing), dtype bytes `e`.

    Attention: its norm; the qkv projection's input (h) and output (hq + 2·hkv, hq =
    n_heads·head_size; v is a view of it and keeps it alive); with RoPE the rotated q (hq)
    and k (hkv); SDPA's output (hq, also the output projection's input) and its
    log-sum-exp (4 bytes per head). MLP: its norm; the first projection's input (h);
    SwiGLU: gate/up output (2f), silu(gate) (f) and the product (f); GeLU/ReLU: output (f)
    and activation (f). Dropout > 0: a 1-byte
    mask after attention and after the MLP, and the attention scores SDPA then keeps
    (its fused kernels take no dropout; measured higher still on CPU). `cross`: an
    encoder-decoder decoder block's cross-attention too (norm, q input/output, SDPA
    output; the memory's k/v counted per source token by the caller).
    """
    h, f = cfg.d_model, cfg.ffn_dim
    hq, hkv = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    attn = _norm_bytes(cfg, e) * h + e * (h + (hq + 2 * hkv) + hq) + 4 * cfg.n_heads
    if cfg.position == "rope":
        attn += e * (hq + hkv)
    mlp = _norm_bytes(cfg, e) * h + e * (h + (4 * f if cfg.activation == "swiglu" else 2 * f))
    dropout = 0.0
    if cfg.dropout > 0:  # 1-byte masks after attention and MLP; attention dropout makes
        # SDPA keep the scores: Korthikanti's 5·a·s (16-bit), here a·s·(2e + 1)
        dropout = 2 * h + cfg.n_heads * seq_len * (2 * e + 1)
    total = attn + mlp + dropout
    if cross:
        total += _norm_bytes(cfg, e) * h + e * (h + 2 * hq) + 4 * cfg.n_heads
    return total


def _stack_bytes(cfg: ModelConfig, e: int, layers: int, tokens: int, seq_len: int,
                 checkpointing: Checkpointing, every: int, cross: bool = False
                 ) -> tuple[float, float]:
    """(kept, recomputed) activations of one stack of `layers` blocks over `tokens`
    tokens: what stays until the backward, and what one recomputed block (full) or one
    recomputed attention (selective) holds during its own backward."""
    per_layer = layer_activation_bytes(cfg, e, seq_len, cross=cross) * tokens
    wrapped = math.ceil(layers / every) if checkpointing != "none" else 0
    if not wrapped:
        return layers * per_layer, 0.0
    if checkpointing == "full":  # each wrapped block keeps its input
        return (layers - wrapped) * per_layer + wrapped * e * cfg.d_model * tokens, per_layer
    # selective: block.attn keeps its input only
    hq, hkv = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    attn_inner = (e * ((hq + 2 * hkv) + hq + (hq + hkv if cfg.position == "rope" else 0))
                  + 4 * cfg.n_heads) * tokens
    return layers * per_layer - wrapped * attn_inner, attn_inner


def _activations(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str,
                 checkpointing: Checkpointing, every_n_layers: int, tgt_len: int | None
                 ) -> tuple[float, float]:
    """(kept, recomputed) bytes of one micro-batch; see `activation_bytes`."""
    e = 4 if precision == "fp32" else 2
    h = cfg.d_model
    head = (_norm_bytes(cfg, e) * h if cfg.norm_position == "pre" else 0) + e * h
    if cfg.family == "encoder_decoder":
        S, T = seq_len * micro_batch, (tgt_len or seq_len) * micro_batch
        memory_kv = cfg.decoder_layers * e * 2 * cfg.kv_heads * cfg.head_size * S
        enc = _stack_bytes(cfg, e, cfg.encoder_layers, S, seq_len, checkpointing,
                           every_n_layers)
        dec = _stack_bytes(cfg, e, cfg.decoder_layers, T, tgt_len or seq_len,
                           checkpointing, every_n_layers, cross=True)
        return enc[0] + dec[0] + memory_kv + head * T, max(enc[1], dec[1])
    tokens = seq_len * micro_batch
    if cfg.family == "encoder":
        head += e * h * 2 + _norm_bytes(cfg, e) * h
    kept, recomputed = _stack_bytes(cfg, e, cfg.n_layers, tokens, seq_len, checkpointing,
                                    every_n_layers)
    return kept + head * tokens, recomputed


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str,
                     checkpointing: Checkpointing = "none", every_n_layers: int = 1,
                     tgt_len: int | None = None) -> float:
    """Bytes the model keeps for the backward of one micro-batch (logits excluded).

    Blocks as in `layer_activation_bytes`, plus the final norm and the output head's input
    (for an encoder also its MLM transform: dense input, activation input, LayerNorm). With
    checkpointing, the kept block inputs; the recomputed block is `recompute_bytes`.
    """
    return _activations(cfg, micro_batch, seq_len, precision, checkpointing,
                        every_n_layers, tgt_len)[0]


def recompute_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str,
                    checkpointing: Checkpointing = "none", every_n_layers: int = 1,
                    tgt_len: int | None = None) -> float:
    """Bytes one recomputed block (full) or attention (selective) holds during its backward
    (`torch.utils.checkpoint` reruns its forward there); 0 without checkpointing."""
    return _activations(cfg, micro_batch, seq_len, precision, checkpointing,
                        every_n_layers, tgt_len)[1]


def logits_bytes(cfg: ModelConfig, predicted_tokens: int, loss_chunk_tokens: int = 0) -> float:
    """Peak bytes of the vocabulary loss, for all predicted tokens or one chunk of them: the
    backward of the fp32 log-softmax holds its output, its incoming and its outgoing
    gradient at once, 12 bytes per logit (the forward's model-dtype logits, fp32 copy and
    output are at most as much)."""
    tokens = min(loss_chunk_tokens, predicted_tokens) if loss_chunk_tokens else predicted_tokens
    return tokens * cfg.padded_vocab_size * 12


def plan_memory(
    cfg: ModelConfig,
    *,
    micro_batch: int,
    seq_len: int,
    precision: Literal["bf16", "fp16", "fp32"] = "bf16",
    zero_stage: int = 0,
    world_size: int = 1,
    activation_checkpointing: Checkpointing = "none",
    checkpoint_every_n_layers: int = 1,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    loss_chunk_tokens: int = 0,
    trainable_params: int | None = None,
    tgt_len: int | None = None,
) -> MemoryPlan:
    """Per-rank bytes of one training step.

    Args:
        cfg: model config.
        micro_batch: sequences per rank per forward.
        seq_len: tokens per sequence (an encoder-decoder's source length).
        precision: "bf16"/"fp16" mixed precision or "fp32".
        zero_stage: 0-3; the states are divided by `world_size` as the ZeRO paper says.
        world_size: data-parallel ranks.
        activation_checkpointing: "none", "full" or "selective".
        checkpoint_every_n_layers: checkpointing wraps blocks 0, n, 2n, ...
        offload_optimizer: the optimizer state (fp32 copy, m, v) lives in host memory.
        offload_params: (ZeRO-3) the weights' partitions live in host memory.
        loss_chunk_tokens: `train.loss_chunk_tokens` (0: plain loss).
        trainable_params: parameters with gradients and optimizer state (LoRA, frozen
            parts); default all.
        tgt_len: an encoder-decoder's target length (default `seq_len`).

    Raises:
        ValueError: a stage outside 0-3 or a size below 1.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage}")
    if min(micro_batch, seq_len, world_size) < 1:
        raise ValueError("micro_batch, seq_len and world_size must be at least 1")
    psi = parameter_count(cfg)
    trained = psi if trainable_params is None else trainable_params
    weight_b, grad_b, opt_b = state_bytes_per_param(precision, zero_stage)
    n = world_size
    params = psi * weight_b / (n if zero_stage >= 3 else 1)
    grads = trained * grad_b / (n if zero_stage >= 2 else 1)
    optimizer = trained * opt_b / (n if zero_stage >= 1 else 1)
    host = 0.0
    if offload_optimizer:
        host, optimizer = host + optimizer, 0.0
    if offload_params and zero_stage == 3:
        host, params = host + params, 0.0
    predicted = micro_batch * (tgt_len or seq_len)
    kept, recomputed = _activations(cfg, micro_batch, seq_len, precision,
                                    activation_checkpointing, checkpoint_every_n_layers,
                                    tgt_len)
    return MemoryPlan(
        params=params, grads=grads, optimizer=optimizer, activations=kept,
        logits=logits_bytes(cfg, predicted, loss_chunk_tokens), host=host,
        recompute=recomputed)
