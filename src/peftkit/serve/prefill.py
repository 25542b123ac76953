"""Prefill: turning prompts into KV caches, whole (several prompts in one forward) or chunk by chunk.

A prompt of at most `chunk` tokens is prefilled whole, together with the other new short prompts in one
left-padded forward (the padding masked out, positions counted from each row's first real token); each
row's cache is then cut to its own tokens, exactly what its prefill alone gives. The engine takes only as
many short prompts at once as keep that forward at `chunk` tokens, padding counted (`admit_count`).

A longer prompt is prefilled in pieces of `chunk` tokens into its own cache (`ChunkedPrefill`): piece k
attends to the cache of pieces 0..k-1, at positions counted on from them, so the last piece's logits are
those of the whole prompt in one forward. The engine runs one piece per loop turn and a decode step for the
running rows between pieces, so a long prompt delays every other row by one piece, not by the whole prompt,
and a request whose client left stops at the next piece. `chunk=None` turns chunking off: every prompt is
prefilled whole (and the short-prompt forward has no token budget).

`forward` below is the engine's: forward(ids (B, t), positions (B, t), mask (B, T), slots, cache) ->
(last-position logits (B, V), the updated cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..hf import kv_tensors, new_cache

Forward = Callable[[Tensor, Tensor, Tensor, list[int], Any], tuple[Tensor, Any]]
RowKV = list[tuple[Tensor, Tensor]]  # one row's cache: (1, H, L, D) keys and values per layer


def is_chunked(prompt_tokens: int, chunk: int | None) -> bool:
    """Whether a prompt of this length is prefilled in chunks rather than whole."""
    return chunk is not None and prompt_tokens > chunk


def admit_count(lengths: Iterable[int], room: int, chunk: int | None) -> int:
    """How many queued requests (prompt lengths `lengths`, in queue order) to take now: at most `room`.
    Prompts that are prefilled whole share one forward, so they are taken only while that forward holds at
    most `chunk` tokens, padding counted (the first one always fits); chunked prompts are taken as they come.
    Everything behind the first request that does not fit waits for the next turn, so the order is kept."""
    taken = whole = widest = 0
    for n in lengths:
        if taken >= room:
            break
        if not is_chunked(n, chunk):
            if chunk is not None and whole and (whole + 1) * max(widest, n) > chunk:
                break
            whole, widest = whole + 1, max(widest, n)
        taken += 1
    return taken


def batched_prefill(forward: Forward, prompts: list[list[int]], slots: list[int],
                    device: torch.device) -> tuple[Tensor, list[RowKV]]:
    """Prefill `prompts` in one forward, each left-padded to the longest: the last-position logits (b, V)
    and each row's own cache cut to its real tokens, (1, H, P_i, D) per layer."""
    lengths = [len(p) for p in prompts]
    P = max(lengths)
    ids = torch.tensor([[0] * (P - n) + p for p, n in zip(prompts, lengths)], device=device)  # (b, P)
    offsets = torch.tensor([P - n for n in lengths], device=device)[:, None]  # (b, 1)
    columns = torch.arange(P, device=device)[None]  # (1, P)
    mask = (columns >= offsets).long()  # (b, P)
    positions = (columns - offsets).clamp_(min=0)  # (b, P)
    logits, cache = forward(ids, positions, mask, slots, new_cache([]))
    kv = kv_tensors(cache)
    return logits, [[(k[i:i + 1, :, P - n:], v[i:i + 1, :, P - n:]) for k, v in kv] for i, n in enumerate(lengths)]


class ChunkedPrefill:
    """One prompt prefilled `chunk` tokens at a time into its own cache; step() runs the next piece."""

    def __init__(self, prompt: list[int], slot: int, chunk: int, device: torch.device) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 token, got {chunk}")
        self.prompt, self.slot, self.chunk, self.device = prompt, slot, chunk, device
        self.done = 0  # prompt tokens in the cache
        self.cache = new_cache([])

    @property
    def started(self) -> bool:
        return self.done > 0

    def step(self, forward: Forward) -> Tensor | None:
        """Prefill the next piece; the last position's logits (1, V) once the whole prompt is in the cache,
        else None."""
        start, end = self.done, min(self.done + self.chunk, len(self.prompt))
        ids = torch.tensor([self.prompt[start:end]], device=self.device)  # (1, c)
        positions = torch.arange(start, end, device=self.device)[None]  # (1, c)
        mask = torch.ones(1, end, dtype=torch.long, device=self.device)  # (1, done + c): the cache, then the piece
        logits, self.cache = forward(ids, positions, mask, [self.slot], self.cache)
        self.done = end
        return logits if end == len(self.prompt) else None

    def kv(self) -> RowKV:
        """The finished prompt's cache, (1, H, P, D) per layer."""
        return kv_tensors(self.cache)
