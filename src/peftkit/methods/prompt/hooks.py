"""The container of prompt tuning / P-tuning adapters, registered on the model as `peftkit_prompt`, and the
forward hooks that put the active adapter's virtual tokens in front of the input.

The user's model stays the user's model: before forward, a call that starts a sequence (no cache, or an empty
one) gets its input embeddings with the P virtual tokens in front (input_ids become inputs_embeds, as in
PEFT's PeftModelForCausalLM), a 2D attention mask P ones in front and labels P times -100 in front. The
output therefore covers P + T positions (PEFT's shape: the real tokens' logits are `logits[:, P:]`). The cache
then holds the virtual tokens, so later calls (generate()'s decoding steps) only need the mask's P ones and are
marked with the adapter, so that a cache from another adapter or from the base is refused instead of mixed.

Positions: given position_ids (generate() passes them, from the mask) put the virtual tokens at 0..P-1 and
shift the real ones by P. That equals PEFT whenever position_ids are absent or are 0, 1, 2, ... (no left
padding); PEFT drops given position_ids (with a warning), which for left-padded rows gives other positions
than the same row alone, where peftkit's rows equal the rows alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ... import hf
from ...record import HookedHolder
from .encoders import VirtualTokens

IGNORE_INDEX = -100


class PromptAdapters(HookedHolder):
    """The named adapters' virtual tokens, which one is active (at most one), and the model's two hooks."""

    TOGETHER = ("prompt adapters {names} cannot be active together: a model takes one set of virtual tokens at a "
                "time; activate one of them")
    PER_ROW = ("per_row cannot give rows different prompt adapters (their virtual tokens lengthen every row); run "
               "each prompt adapter's rows as their own batch")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.current: str | None = None
        self.enabled = True
        self.starting = False  # the call in progress put virtual tokens in front (the after-hook marks its cache)
        self.hook_model(model, hf.cache_arg(model))

    def in_front(self) -> int:
        """Virtual tokens the next call that starts a sequence gets (0 when none is active or all are off)."""
        if not self.enabled or self.current is None:
            return 0
        return self.encoders[self.current].config.num_virtual_tokens

    # --- the hooks ----------------------------------------------------------------------------------
    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.starting = False
        cache = kwargs.get(self.cache_arg) if self.cache_arg else None
        cache = kwargs.get("past_key_values") if cache is None else cache
        held = getattr(cache, "peftkit_prompt", None)
        if not self.in_front():
            if held is not None and cache.get_seq_length():
                raise ValueError(f"this cache holds the virtual tokens of prompt adapter {held!r}, which is not "
                                 "active now; start from an empty cache")
            return None
        kw = self.forward_arguments(model, args, kwargs)
        cache = kw.get(self.cache_arg) if self.cache_arg else None
        p = self.in_front()
        if cache is None or cache.get_seq_length() == 0:
            self._put_in_front(model, kw, p)
            if cache is not None:
                cache.peftkit_prompt = self.current
            self.starting = True
        elif getattr(cache, "peftkit_prompt", None) != self.current:
            raise ValueError(f"this cache holds {cache.get_seq_length()} positions computed without prompt adapter "
                             f"{self.current!r}; start from an empty cache or disable the adapter")
        mask = kw.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise ValueError("with virtual tokens the attention mask must be a 2D (batch, length) tensor; got "
                                 f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)  # (B, P + T)
        positions = kw.get("position_ids")
        if positions is not None:
            if positions.dim() != 2:
                raise ValueError("with virtual tokens position_ids must be (batch, length); got "
                                 f"{tuple(positions.shape)}")
            shifted = positions + p  # real tokens follow the P virtual ones
            if self.starting:
                front = torch.arange(p, device=positions.device, dtype=positions.dtype)
                shifted = torch.cat([front.expand(positions.shape[0], p), shifted], dim=1)  # (B, P + T)
            kw["position_ids"] = shifted
        return (), kw

    def _put_in_front(self, model: nn.Module, kw: dict[str, Any], p: int) -> None:
        """input_ids (or inputs_embeds) -> inputs_embeds with the virtual tokens first; labels -100 there."""
        if kw.get("token_type_ids") is not None:
            raise ValueError("token_type_ids cannot be used with virtual tokens (they have no type); leave them out")
        embeds, ids = kw.get("inputs_embeds"), kw.get("input_ids")
        if embeds is None:
            if ids is None:
                raise ValueError("virtual tokens need input_ids or inputs_embeds to go in front of")
            embeds = hf.input_embeddings(model)(ids)  # (B, T, d)
        elif ids is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        prompt = self.encoders[self.current]().to(embeds.dtype)  # (P, d)
        batch = embeds.shape[0]
        kw["inputs_embeds"] = torch.cat([prompt.expand(batch, -1, -1), embeds], dim=1)  # (B, P + T, d)
        kw["input_ids"] = None
        labels = kw.get("labels")
        if labels is not None:
            kw["labels"] = torch.cat([labels.new_full((labels.shape[0], p), IGNORE_INDEX), labels], dim=1)

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.starting:
            return
        self.starting = False
        cache = getattr(output, self.cache_arg, None) if self.cache_arg else None
        if cache is not None:
            cache.peftkit_prompt = self.current  # a cache the model made itself (use_cache without one given)

