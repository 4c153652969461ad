"""Which parameters train (the ``trainable`` section), applied to the plain model before
DeepSpeed wraps it; and folding LoRA adapters back into the weights for export.

Frozen parameters get ``requires_grad=False``; ``optim.param_groups`` leaves them out, so
they have no gradient and no optimizer state (and no fp32 master copy under ZeRO), and the
optimizer never touches them: they stay bit-identical.

LoRA uses ``peft.inject_adapter_in_model`` on our own ``nn.Module`` (no ``PeftModel``
wrapper): each targeted ``nn.Linear`` becomes a ``peft`` ``lora.Linear`` holding the
original layer as ``base_layer`` (state-dict names ``<name>.base_layer.weight`` and
``<name>.lora_A.default.weight`` / ``lora_B``). The adapters are ordinary parameters, so
DeepSpeed ZeRO 0-2 shards their optimizer state and checkpoints them like any other, and a
resume rebuilds the same module tree before loading. :func:`merge_lora` folds them into the
base weights and puts the plain ``nn.Linear`` back, so an export is the usual architecture.
"""

from __future__ import annotations

import logging

from torch import nn

from lmforge.launch.config import TrainableConfig

log = logging.getLogger("lmforge.train")

LORA_MARKER = ".lora_A."
"""A state-dict key containing this belongs to a LoRA adapter (peft's naming)."""


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Token, position and token-type embeddings and the norm right after them."""
    names = ("tok_emb", "pos_emb", "type_emb", "emb_norm", "enc_pos_emb", "dec_pos_emb",
             "enc_emb_norm", "dec_emb_norm")
    return [m for m in (getattr(model, n, None) for n in names) if m is not None]


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The output head: an encoder's classification head (pooler, classifier) when it has
    one, else the LM head with the norms that feed it. A tied LM head is the token
    embedding, which then trains with it."""
    if getattr(model, "classifier", None) is not None:
        return [model.pooler, model.classifier]
    names = ("final_norm", "dec_final_norm", "mlm_dense", "mlm_norm", "lm_head")
    return [m for m in (getattr(model, n, None) for n in names) if m is not None]


def _set(modules: list[nn.Module], trainable: bool) -> None:
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(trainable)


def apply_trainable(model: nn.Module, trainable: TrainableConfig) -> nn.Module:
    """Freezes what ``trainable.mode`` leaves out, or injects LoRA adapters (in place).

    Args:
        model: A plain lmforge model (``DecoderLM``, ``EncoderModel``,
            ``EncoderDecoderModel``), weights already loaded.
        trainable: The trainable section.

    Returns:
        ``model``, with ``requires_grad`` set (and adapters added for ``lora``).

    Raises:
        ValueError: ``trainable.lora_targets`` match no ``nn.Linear`` of the model.
    """
    mode = trainable.mode
    if mode == "all":
        return model
    if mode == "lora":
        inject_lora(model, trainable)
        if getattr(model, "classifier", None) is not None:  # a new head must learn
            _set([model.pooler, model.classifier], True)
    elif mode == "freeze_embeddings":
        _set(embedding_modules(model), False)
    elif mode == "freeze_blocks":
        _set(embedding_modules(model) + model.blocks()[: trainable.freeze_blocks], False)
    elif mode == "head_only":
        _set([model], False)
        _set(head_modules(model), True)
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("trainable.mode=%s: %d of %d parameters train (%.2f%%)", mode, train, total,
             100.0 * train / max(total, 1))
    return model


def inject_lora(model: nn.Module, trainable: TrainableConfig) -> nn.Module:
    """Adds rank-``lora_rank`` adapters to the ``lora_targets`` linears and freezes every
    other parameter (peft's rule); B starts at zero, so the model's output is unchanged."""
    from peft import LoraConfig, inject_adapter_in_model  # heavy import: LoRA runs only

    targets = [t.strip() for t in trainable.lora_targets if t.strip()]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    matched = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not matched:
        examples = sorted({n.split(".", 2)[-1] for n in linears if n.startswith("layers.")
                           or n.startswith("encoder.") or n.startswith("decoder.")})
        raise ValueError(
            f"trainable.lora_targets: {targets} match no nn.Linear of this model; its block "
            f"projections are {examples[:10]}"
        )
    config = LoraConfig(r=trainable.lora_rank, lora_alpha=trainable.lora_alpha,
                        lora_dropout=trainable.lora_dropout, target_modules=targets,
                        bias="none")
    return inject_adapter_in_model(config, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every LoRA adapter into its base weight (W += B A * alpha / r) and replaces the
    peft layer by the plain ``nn.Linear`` again; a model without adapters is returned as is.
    """
    from_peft = [(name, module) for name, module in model.named_modules()
                 if hasattr(module, "get_base_layer") and hasattr(module, "lora_A")]
    for name, module in from_peft:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


def has_lora(state_dict: dict) -> bool:
    """Whether a state dict holds LoRA adapters (a checkpoint of a ``lora`` run)."""
    return any(LORA_MARKER in key for key in state_dict)
