"""VeRA's shared frozen projections: drawn from a seed exactly as HF PEFT draws them, and held once per model.

    vera_A  (r, max in_features)    kaiming-uniform, fan_in = max in_features
    vera_B  (max out_features, r)   kaiming-uniform, fan_in = r

Both come from one CPU torch.Generator seeded with `projection_prng_key`, vera_A first, in float32 (PEFT's
`_init_vera_A_vera_B`), so a file saved with save_projection=False gives PEFT's matrices again. Each adapter
has its own pair, made from its own config (its key, r and targets): what PEFT makes for an adapter that is
loaded first or alone. (PEFT gives a second adapter the first one's pair; peftkit does not, so an adapter
computes the same whatever was loaded before it.)

`VeraProjections` is one module per model, registered inside every VeRA layer (as PEFT shares its BufferDict),
so `model.to()` moves it once and it leaves with the last layer on unload. Its buffers are not persistent:
`model.state_dict()` does not repeat them per layer; the adapter file carries them (save_projection=True).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-bound, bound) with bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1] (float32, CPU), in
    the same arithmetic order as PEFT's `_kaiming_init`, so the bound is the same float."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


MAX_PROJECTION_ELEMENTS = 1 << 28  # 1 GiB of float32: bounds what a config (possibly a hostile file) can make us draw


def draw(key: int, r: int, max_in: int, max_out: int) -> tuple[Tensor, Tensor]:
    """(vera_A (r, max_in), vera_B (max_out, r)) for seed `key`: PEFT's draws, in PEFT's order. A ValueError
    when they would exceed MAX_PROJECTION_ELEMENTS (r comes from the config, which may be a hostile file)."""
    if r * (max_in + max_out) > MAX_PROJECTION_ELEMENTS:
        raise ValueError(f"VeRA r={r} would need projections of {r} x ({max_in} + {max_out}) values, over the "
                         f"{MAX_PROJECTION_ELEMENTS:,} peftkit allows; use a smaller r (PEFT's examples use 256)")
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = kaiming_uniform((r, max_in), generator)
    vera_b = kaiming_uniform((max_out, r), generator)
    return vera_a, vera_b


class VeraProjections(nn.Module):
    """vera_A / vera_B of every VeRA adapter of a model, by adapter name (non-persistent buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    @staticmethod
    def _keys(name: str) -> tuple[str, str]:
        return f"vera_A_{name}", f"vera_B_{name}"

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def add(self, name: str, vera_a: Tensor, vera_b: Tensor) -> None:
        if name in self.names:
            raise ValueError(f"VeRA adapter {name!r} already has projections")
        key_a, key_b = self._keys(name)
        self.register_buffer(key_a, vera_a, persistent=False)
        self.register_buffer(key_b, vera_b, persistent=False)
        self.names.append(name)

    def pair(self, name: str) -> tuple[Tensor, Tensor]:
        """(vera_A, vera_B) of adapter `name`, whole."""
        key_a, key_b = self._keys(name)
        return getattr(self, key_a), getattr(self, key_b)

    def slices(self, name: str, n_in: int, n_out: int) -> tuple[Tensor, Tensor]:
        """(A_l (r, n_in), B_l (n_out, r)): the top-left parts a layer of that size uses."""
        vera_a, vera_b = self.pair(name)
        return vera_a[:, :n_in], vera_b[:n_out, :]

    @torch.no_grad()
    def fill(self, name: str, vera_a: Tensor, vera_b: Tensor) -> None:
        """Copy a file's matrices (shapes already checked) into adapter `name`'s."""
        ours_a, ours_b = self.pair(name)
        ours_a.copy_(vera_a)
        ours_b.copy_(vera_b)

    def drop(self, name: str) -> None:
        """Forget adapter `name`'s pair (every layer asks when the adapter is deleted; the first one drops it)."""
        if name in self.names:
            for key in self._keys(name):
                delattr(self, key)
            self.names.remove(name)

    def extra_repr(self) -> str:
        shapes = {n: tuple(t.shape for t in self.pair(n)) for n in self.names}
        return f"projections={shapes}"
