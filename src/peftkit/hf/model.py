"""A transformers model's parts and forward, as peftkit needs them: decoder and output head, the repeated
decoder blocks, logits at chosen positions, rebuilding non-persistent buffers, and the loading keyword that
changed name between releases."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from .arch import (DECODER_LAYER_PATHS, PREFIX_UNSUPPORTED_TYPES, PREFIX_UNVERIFIED, VERIFIED, model_type,
                   verified_features)
from .cache import cache_arg, forward_accepts
from .configs import head_scaling, is_encoder_decoder, model_config


@lru_cache(maxsize=1)
def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """The dtype keyword for from_pretrained / from_config: `dtype` since transformers 4.56, `torch_dtype`
    before (where `dtype` is not understood). Empty for None (the library's default)."""
    if dtype is None:
        return {}
    return {"dtype": dtype} if transformers_version() >= (4, 56) else {"torch_dtype": dtype}


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps hidden states to logits (get_output_embeddings), or None."""
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out() if callable(get_out) else None


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The module that maps token ids to input embeddings (get_input_embeddings), or None."""
    get_in = getattr(model, "get_input_embeddings", None)
    try:
        return get_in() if callable(get_in) else None
    except (AttributeError, NotImplementedError):
        return None


def local_tokenizer(path: str, **kwargs: Any) -> Any:
    """The tokenizer saved in the local directory `path` (AutoTokenizer, never downloading); a ValueError
    when `path` is not a directory."""
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a local directory; peftkit never downloads a tokenizer: pass the "
                         "tokenizer object itself, or the path of a directory it was saved in")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None] | None:
    """(decoder, output head, logit softcap) for a causal LM whose logits are exactly head(decoder(...)
    .last_hidden_state), soft-capped when the cap is not None; None when its architecture is not verified
    for this (arch.VERIFIED's "head_loss"), has no such split or its head scales the logits further, so the
    caller uses the model's own forward."""
    if "head_loss" not in verified_features(model):  # an allowlist: proven by tests/test_arch_parity.py
        return None
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    scaled, softcap = head_scaling(model)
    if scaled:  # heads with extra scaling: use the model's own forward
        return None
    return decoder, head, softcap


def decoder_layers(model: nn.Module) -> list[nn.Module] | None:
    """The repeated decoder blocks: model.layers (Llama, Mistral, Qwen, ...), transformer.h (GPT-2) or
    layers, the first that is a non-empty ModuleList; None when there is none."""
    for path in DECODER_LAYER_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return list(blocks)
    return None


def logits_at(model: nn.Module, keep: Tensor, **inputs: Any) -> Tensor:
    """Logits (B, K, V) at positions `keep` (K,) of the model's forward on `inputs`. Only those positions go
    through the head when forward() takes `logits_to_keep` (transformers >= 4.50); otherwise all positions are
    computed and these picked out."""
    if forward_accepts(model, "logits_to_keep"):
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[:, keep]


def prefix_unsupported(model: nn.Module) -> str | None:
    """Why a prefix in a plain per-layer KV cache cannot work for this model, or None when it can (the model
    has a transformers config, is decoder-only, has no special cache and takes a cache in forward())."""
    config = model_config(model)
    if config is None or not hasattr(config, "to_dict"):
        return "it has no transformers config (num layers / heads are unknown)"
    if is_encoder_decoder(model):
        return "encoder-decoder models are not supported"
    kind = model_type(model) or ""
    if kind in PREFIX_UNSUPPORTED_TYPES:
        return (f"model_type {kind!r} needs a special cache (hybrid, sliding, shared or recurrent layers) that a "
                "plain prefix cache does not fit")
    if "prefix" not in verified_features(model):  # an allowlist: proven by tests/test_prefix_arch.py
        why = PREFIX_UNVERIFIED.get(kind, "no test has checked its outputs and generate() with a prefix")
        served = sorted(t for t, f in VERIFIED.items() if "prefix" in f)
        return (f"prefix tuning is not verified for model_type {kind!r}: {why}. Verified: {', '.join(served)}; "
                "use LoRA, or prompt tuning (virtual tokens on the input embeddings)")
    if cache_arg(model) is None:
        return "its forward() takes neither `cache` nor `past_key_values`"
    return None


def rebuild_nonpersistent_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in checkpoints: after loading into a meta-device
    skeleton, build the modules that still hold meta buffers again from the config, on CPU, and take theirs."""
    for _, module in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            fresh = type(module)(config=model.config)
            for bname, buf in fresh.named_buffers(recurse=False):
                setattr(module, bname, buf)  # keeps the buffer's persistent flag
