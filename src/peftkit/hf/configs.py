"""Reading (and the few writes to) a transformers model's config: the fields other families spell differently
(hidden_size / n_embd / d_model, ...), composite configs with a `text_config`, and the private-ish fields
(`_name_or_path`) that peftkit reads. Every function takes the model and accepts one without a config."""

from __future__ import annotations

import os
from typing import Any

from torch import nn


def model_config(model: nn.Module) -> Any | None:
    """The model's transformers config, or None."""
    return getattr(model, "config", None)


def text_config(model: nn.Module, decoder: bool = False) -> Any | None:
    """The config of the text (decoder) part: the config itself for a text-only model; None without a config."""
    config = model_config(model)
    if config is None or not hasattr(config, "get_text_config"):
        return config
    return config.get_text_config(decoder=True) if decoder else config.get_text_config()


def name_or_path(model: nn.Module) -> str | None:
    """The name or path the model was loaded from (its config's `_name_or_path`), else None."""
    return getattr(model_config(model), "_name_or_path", None) or None


def set_name_or_path(model: nn.Module, name: str) -> None:
    """Record `name` as where the model came from (saved adapters name it as their base)."""
    model.config._name_or_path = name


def hidden_size(model: nn.Module) -> int | None:
    """The model's hidden size from its config (hidden_size / n_embd / d_model), else None."""
    config = model_config(model)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model_config(model), "is_encoder_decoder", False))


def kv_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, key/value heads, head_dim) of the model's per-layer KV cache, derived as PEFT's
    _prepare_prompt_learning_config does (from the text config; with grouped-query attention the cache holds
    num_key_value_heads heads of head_dim). Raises ValueError saying which fields are missing."""
    config = model_config(model)
    d = config.to_dict()
    d = d.get("text_config") or d

    def first(*keys: str) -> Any:
        return next((d[k] for k in keys if d.get(k) is not None), None)

    num_layers = getattr(config, "num_hidden_layers", None) or first("num_hidden_layers", "num_layers", "n_layer")
    token_dim = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    if not (num_layers and token_dim and heads):
        raise ValueError(f"its config lacks layers/hidden size/heads (got {num_layers}, {token_dim}, {heads})")
    head_dim = token_dim // heads
    if d.get("num_key_value_heads") is not None:  # grouped-query attention: the cache holds the KV heads
        head_dim = d.get("head_dim") or head_dim
        heads = d["num_key_value_heads"]
    return int(num_layers), int(heads), int(head_dim)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover (max_position_embeddings / GPT-2's n_positions)."""
    config = model_config(model)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def text_context_length(model: nn.Module) -> int | None:
    """max_position_embeddings of the text config (what a server advertises as its context length)."""
    return getattr(text_config(model), "max_position_embeddings", None)


def vocab_size(model: nn.Module) -> int | None:
    """The size of the model's token table (from the config itself), else None."""
    return getattr(model_config(model), "vocab_size", None)


def text_vocab_size(model: nn.Module) -> int:
    """The text config's vocab_size (a composite model's top-level config may not have one)."""
    return text_config(model).vocab_size


def layer_types(model: nn.Module) -> tuple[str, ...]:
    """config.layer_types of the decoder (full_attention, sliding_attention, linear_attention, ...); empty when
    the config does not list them (every layer is then plain attention)."""
    return tuple(getattr(text_config(model, decoder=True), "layer_types", None) or ())


def head_scaling(model: nn.Module) -> tuple[bool, float | None]:
    """(whether the logits get an extra scale (config.logit_scale), the logit soft-cap or None)."""
    config = model_config(model)
    return getattr(config, "logit_scale", None) is not None, getattr(config, "final_logit_softcapping", None)


def uses_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on in any module of the model."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def tie_embeddings_if_configured(model: nn.Module, config: Any) -> None:
    """Tie the output head to the input embedding when `config` says the checkpoint stores them once."""
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()


def record_untied_embeddings(model: nn.Module) -> None:
    """After a merge that untied the embedding and output head, say so in the config (and the text config),
    or from_pretrained would tie them again and drop one of the merged weights."""
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or outp is None or outp.weight is inp.weight:
        return
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def drop_quantization_config(config: Any) -> None:
    """Remove a `quantization_config` from a transformers config (weights now held some other way)."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def mark_dequantized(model: nn.Module) -> None:
    """A model loaded from a quantized file (GGUF) whose weights are now plain: drop the quantization tag and
    the quantizer, or later quantized loads and save_pretrained would treat it as quantized."""
    drop_quantization_config(model.config)
    model.hf_quantizer = None
    model.is_quantized = False


def save_config(model: nn.Module, directory: str | os.PathLike, quantization_config: dict | None = None) -> None:
    """Write the model's config.json into `directory` (nothing for a model without a config); with
    `quantization_config`, that entry is written too, without staying on the model's config."""
    config = model_config(model)
    if quantization_config is None:
        if config is not None:
            config.save_pretrained(directory)
        return
    config = model.config  # a quantization entry needs a config to go into
    config.quantization_config = quantization_config
    try:
        config.save_pretrained(directory)
    finally:
        del config.quantization_config
