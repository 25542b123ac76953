"""Prefix tuning: trainable key/value vectors prepended in every attention layer (HF PEFT's PREFIX_TUNING).

The user's model stays the user's model: `inject_prefix` registers `model.peftkit_prefix` (the prefixes'
weights) and two forward hooks. Before forward, an empty or absent KV cache is filled per layer with the
active prefix, a 2D attention mask gets P ones in front and given position_ids shift by P (the real tokens
then sit at P, P+1, ...), exactly as PEFT's PeftModelForCausalLM does, so generate() runs through its own
cache. After forward, every layer's cache must have grown by the input length, else the model ignored the
prefix and that is an error. Layout (PEFT's): `prompt_embeddings` [P, num_layers * 2 * token_dim], a row
viewed as (num_layers * 2, kv_heads, head_dim), layer i's key at 2i and value at 2i + 1 (with GQA token_dim
= num_key_value_heads * head_dim). The optional projection MLP trains, and is folded away on save.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ... import hf
from ...record import HookedHolder
from .config import PrefixConfig, PrefixGeometry, refuse_checkpointing


class PrefixEncoder(nn.Module):
    """One prefix's weights; forward() gives the flat prefix [P, num_layers * 2 * token_dim]."""

    def __init__(self, config: PrefixConfig, geometry: PrefixGeometry, init: bool = True) -> None:
        super().__init__()
        self.config, self.geometry = config, geometry
        p = config.num_virtual_tokens
        if config.projection_dim is None:
            self.prompt_embeddings = nn.Parameter(torch.zeros(p, geometry.width))
            if init:
                nn.init.normal_(self.prompt_embeddings)  # PEFT's nn.Embedding init
        else:  # same creation order as PEFT's PrefixEncoder, so one seed gives the same start
            self.embedding = nn.Parameter(torch.zeros(p, geometry.token_dim))
            if init:
                nn.init.normal_(self.embedding)
            self.transform = nn.Sequential(nn.Linear(geometry.token_dim, config.projection_dim), nn.Tanh(),
                                           nn.Linear(config.projection_dim, geometry.width))

    def forward(self) -> Tensor:
        if self.config.projection_dim is None:
            return self.prompt_embeddings  # (P, L*2*token_dim)
        return self.transform(self.embedding)  # (P, token_dim) -> (P, L*2*token_dim)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the projection by its output: the prefix then trains (if at all) as plain embeddings."""
        if self.config.projection_dim is None:
            return
        flat = self().detach().clone()
        trainable = self.embedding.requires_grad
        del self.embedding, self.transform
        self.prompt_embeddings = nn.Parameter(flat, requires_grad=trainable)
        self.config = self.config.replace(projection_dim=None)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"num_virtual_tokens={self.config.num_virtual_tokens}, layers={g.num_layers}, "
                f"kv_heads={g.num_heads}, head_dim={g.head_dim}, projection_dim={self.config.projection_dim}")


class PrefixAdapters(HookedHolder):
    """Registered on the model as `peftkit_prefix`: the named prefixes, which one is active, and the hooks."""

    TOGETHER = "prefixes {names} cannot be active together: a model takes one prefix at a time"
    PER_ROW = ("per_row cannot give rows different prefixes (a prefix fills the whole batch's cache); run each "
               "prefix's rows as their own batch")

    def __init__(self, model: nn.Module, geometry: PrefixGeometry) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.geometry = geometry
        self.current: str | None = None  # the prefix in use (at most one)
        self.enabled = True
        self.hook_model(model, hf.cache_arg(model))

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.enabled or self.current is None:
            cache = kwargs.get(self.cache_arg, kwargs.get("past_key_values"))
            if getattr(cache, "peftkit_prefix", None) is not None and cache.get_seq_length():
                raise ValueError(f"this cache holds prefix {cache.peftkit_prefix!r}, which is not active now")
            return None
        kw = self.forward_arguments(model, args, kwargs)
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if x is None:
            raise ValueError("the prefix needs input_ids or inputs_embeds to know the batch size")
        batch, p = x.shape[0], self.encoders[self.current].config.num_virtual_tokens

        cache = kw.get(self.cache_arg)
        if cache is not None and not hf.is_dynamic_cache(cache):
            raise TypeError(f"prefix tuning needs a DynamicCache (the default); got {type(cache).__name__}")
        if cache is None or cache.get_seq_length() == 0:
            if model.training and torch.is_grad_enabled():
                refuse_checkpointing(model)
            cache = hf.dynamic_cache() if cache is None else cache
            self._fill(model, cache, batch)
            cache.peftkit_prefix = self.current
            cache.peftkit_check = p + x.shape[1]
            kw[self.cache_arg] = cache
        elif getattr(cache, "peftkit_prefix", None) != self.current:
            raise ValueError(f"this cache holds {cache.get_seq_length()} tokens computed without prefix "
                             f"{self.current!r}; start from an empty cache or disable the prefix")
        mask = kw.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise ValueError("with a prefix the attention mask must be a 2D (batch, length) tensor; "
                                 f"got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)  # (B, P + T)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + p  # real tokens follow the P virtual ones
        return (), kw

    def _fill(self, model: nn.Module, cache: Any, batch: int) -> None:
        """Put the active prefix into each layer of an empty cache: keys/values (B, kv_heads, P, head_dim)."""
        g = self.geometry
        flat = self.encoders[self.current]()  # (P, L*2*token_dim)
        dtype = getattr(model, "dtype", None)
        if dtype is not None:
            flat = flat.to(dtype)
        kv = flat.repeat(batch, 1, 1).view(batch, flat.shape[0], g.num_layers * 2, g.num_heads, g.head_dim)
        kv = kv.permute(2, 0, 3, 1, 4)  # (L*2, B, kv_heads, P, head_dim)
        for layer in range(g.num_layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs.get(self.cache_arg)
        expected = getattr(cache, "peftkit_check", None)
        if expected is None:
            return
        cache.peftkit_check = None
        lengths = [cache.get_seq_length(i) for i in range(self.geometry.num_layers)]
        if any(n != expected for n in lengths):
            raise RuntimeError(
                f"{type(model).__name__} did not use the prefix: each of its {self.geometry.num_layers} layer "
                f"caches should hold {expected} tokens after this call, but they hold {lengths}. Its attention "
                "does not read a per-layer KV cache (unsupported architecture, or gradient checkpointing).")


# --- the model-level API -----------------------------------------------------------------------------------
