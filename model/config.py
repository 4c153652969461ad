"""`ModelConfig`: every architectural choice of the three transformer families.

Fields are what a YAML `model:` section may set; derived values (`head_size`,
`kv_heads`, `ffn_dim`, `padded_vocab_size`, layer counts) are read-only properties,
so they can never go stale when the run config fills in `vocab_size` later.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

@dataclass
class ModelConfig:
    """Architecture of one transformer (decoder-only, encoder-only or encoder-decoder)."""

    family: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    """Model family: causal LM ("decoder"), BERT-style masked LM ("encoder") or the
    2017 Transformer / BART ("encoder_decoder")."""

    vocab_size: int | None = None
    """Real vocabulary size. None means "take it from the tokenizer" (the run config
    fills it in); `build()` refuses a config where it is still None."""

    d_model: int = 768
    """Width of the residual stream."""

    n_layers: int = 12
    """Transformer blocks (decoder-only / encoder-only; default for both stacks of
    an encoder-decoder)."""

    n_heads: int = 12
    """Query heads per attention layer; must divide `d_model`."""

    n_kv_heads: int | None = None
    """Key/value heads. None = `n_heads` (multi-head); smaller values give grouped-query
    attention, 1 gives multi-query. Must divide `n_heads`."""

    head_dim: int | None = None
    """Width of one attention head. None = `d_model / n_heads`; another value sizes the
    query/key/value projections (n_heads * head_dim wide) apart from `d_model`, as Qwen3
    (0.6B/1.7B/4B) and Mistral Nemo have. Read the resolved width as `head_size`."""

    d_ff: int | None = None
    """Feed-forward hidden width. None = 4*d_model, or for swiglu the Llama rule
    (2/3 * 4*d_model rounded up to a multiple of `multiple_of`)."""

    multiple_of: int = 256
    """Rounding for the derived swiglu width (only used when `d_ff` is None)."""

    max_seq_len: int = 1024
    """Longest sequence; sizes learned position tables and bounds generation."""

    position: Literal["learned", "sinusoidal", "rope", "alibi"] = "learned"
    """Position scheme: learned table, fixed sinusoids (2017), rotary (RoPE) or ALiBi."""

    rope_theta: float = 10000.0
    """RoPE base frequency."""

    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """Normalisation layer."""

    norm_position: Literal["pre", "post"] = "pre"
    """Pre-norm (GPT-2, Llama; final norm after the last block) or post-norm
    (2017 Transformer, BERT, BART; no final norm)."""

    norm_eps: float = 1e-5
    """Epsilon of every norm layer."""

    activation: Literal["relu", "gelu", "gelu_tanh", "swiglu"] = "gelu"
    """Feed-forward activation. "gelu_tanh" is GPT-2's tanh approximation ("gelu_new")."""

    bias: bool = True
    """Biases in attention and feed-forward linears (norm biases follow `norm`)."""

    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""

    tie_embeddings: bool = True
    """Share the token embedding with the output projection (GPT-2, BERT, BART). An
    encoder-decoder always shares one embedding between encoder and decoder."""

    init: Literal["gpt2", "llama", "bert", "xavier"] = "gpt2"
    """Initialisation convention: "gpt2" N(0, init_std) with residual projections scaled
    by 1/sqrt(2*n_layers); "llama" N(0, init_std) with residual projections scaled by
    1/sqrt(2*(layer+1)) (torchtitan's depth init); "bert" plain N(0, init_std);
    "xavier" Xavier-uniform linears and N(0, d_model**-0.5) embeddings (2017 paper)."""

    init_std: float = 0.02
    """Standard deviation for the normal initialisers."""

    pad_vocab_to_multiple_of: int = 1
    """Pad the embedding/output matrices to a multiple of this (64 speeds up matmuls).
    Logits are returned for the real `vocab_size` only; export drops the padding."""

    n_encoder_layers: int | None = None
    """Encoder blocks of an encoder-decoder. None = `n_layers`."""

    n_decoder_layers: int | None = None
    """Decoder blocks of an encoder-decoder. None = `n_layers`."""

    type_vocab_size: int = 0
    """Token-type (segment A/B) embeddings of an encoder; BERT uses 2, 0 = none."""

    embedding_norm: bool = False
    """Norm right after the embedding sum (BERT, BART)."""

    scale_embeddings: bool = False
    """Multiply token embeddings by sqrt(d_model) (2017 Transformer)."""

    num_labels: int = 0
    """Classes of the encoder's sequence-classification head; 0 = no head."""

    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling, as Hugging Face's `rope_parameters` (without `rope_theta`):
    `{rope_type: linear, factor}`, `{rope_type: llama3, factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings}` or `{rope_type: yarn, factor,
    original_max_position_embeddings}` plus yarn's optional `beta_fast`, `beta_slow`,
    `attention_factor`, `mscale`, `mscale_all_dim`, `truncate`. None (or `{rope_type:
    default}`) = plain RoPE. Only with `position: rope`; see `model/rope.py`."""

    qkv_bias: bool | None = None
    """Biases on the query/key/value projections alone, whatever `bias` says (Qwen2: true
    with `bias: false`). None = follow `bias`."""

    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE (Qwen3)."""

    hf_config: dict[str, Any] | None = None
    """The `config.json` of the Hugging Face model these weights were imported from (filled
    in from a Hugging Face `init.source`, not set by hand): the export writes the same class
    (`architectures`) with the source's other fields kept."""

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")

        for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "multiple_of",
                     "pad_vocab_to_multiple_of"):
            positive(name)
        for name in ("vocab_size", "n_kv_heads", "d_ff", "n_encoder_layers", "n_decoder_layers"):
            if getattr(self, name) is not None:
                positive(name)
        if self.head_dim is not None:
            positive("head_dim")
        elif self.d_model % self.n_heads:
            raise ValueError(f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}; "
                             "pick a multiple of n_heads, or set head_dim")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads: {self.kv_heads} does not divide n_heads={self.n_heads}; "
                             "use a divisor (1 = multi-query)")
        if self.position == "rope" and self.head_size % 2:
            raise ValueError(f"position: rope needs an even head_dim, got {self.head_size}; "
                             "change head_dim, d_model or n_heads")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ValueError("position: sinusoidal needs an even d_model")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "init_std", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.rope_scaling is not None:
            from lmforge.model.rope import check_rope_scaling  # torch-free

            if self.position != "rope":
                raise ValueError(f"rope_scaling: needs position: rope, not {self.position!r}; "
                                 "remove rope_scaling")
            check_rope_scaling(self.rope_scaling)
        if self.hf_config is not None and not isinstance(self.hf_config, dict):
            raise ValueError("hf_config: must be a mapping (a config.json); leave it unset")
        for name in ("type_vocab_size", "num_labels"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name}: must be >= 0, got {value}")
            if value and self.family != "encoder":
                raise ValueError(f"{name}: only the 'encoder' family has token types and a "
                                 f"classification head; set it to 0 for {self.family!r}")

    # ---- derived values -------------------------------------------------------------
    @property
    def head_size(self) -> int:
        """Resolved width of one attention head: `head_dim`, or d_model / n_heads."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def kv_heads(self) -> int:
        """Resolved number of key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        """Resolved feed-forward hidden width."""
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            # Llama: keep the parameter count of a 4*d MLP with three matrices instead of two.
            hidden = int(2 * 4 * self.d_model / 3)
            return self.multiple_of * math.ceil(hidden / self.multiple_of)
        return 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding/output matrices (`vocab_size` rounded up)."""
        if self.vocab_size is None:
            raise ValueError("vocab_size: not set; give model.vocab_size or let the run config "
                             "take it from the tokenizer")
        m = self.pad_vocab_to_multiple_of
        return m * math.ceil(self.vocab_size / m)

    @property
    def encoder_layers(self) -> int:
        """Encoder blocks (encoder-decoder), else `n_layers`."""
        return self.n_layers if self.n_encoder_layers is None else self.n_encoder_layers

    @property
    def decoder_layers(self) -> int:
        """Decoder blocks (encoder-decoder), else `n_layers`."""
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Config of a named preset with some fields replaced.

        Args:
            name: a key of `lmforge.model.PRESETS` (e.g. "tiny", "gpt2-124m").
            **overrides: field values that replace the preset's.

        Returns:
            The validated config.

        Raises:
            ValueError: unknown preset name or field, or an invalid combination.
        """
        from lmforge.model.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"preset: unknown model preset {name!r}; "
                             f"choose one of {sorted(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: not a ModelConfig field; "
                             f"known fields: {sorted(known)}")
        return cls(**{**PRESETS[name], **overrides})

    def build(self) -> nn.Module:
        """Instantiate and initialise the model this config describes.

        Returns:
            `DecoderLM`, `EncoderModel` or `EncoderDecoderModel` (fp32, on the current
            default device; build under `torch.device("meta")` to count without memory).

        Raises:
            ValueError: `vocab_size` is still None.
        """
        if self.vocab_size is None:
            raise ValueError("vocab_size: not set; give model.vocab_size or let the run config "
                             "take it from the tokenizer before building the model")
        if self.family == "decoder":
            from lmforge.model.decoder import DecoderLM

            return DecoderLM(self)
        if self.family == "encoder":
            from lmforge.model.encoder import EncoderModel

            return EncoderModel(self)
        from lmforge.model.encoder_decoder import EncoderDecoderModel

        return EncoderDecoderModel(self)
