"""LoRA on torch's convolutions (nn.Conv1d, nn.Conv2d, nn.Conv3d), in HF PEFT's layout, so files carry over.

    A: a convolution with the base's kernel, stride and padding and r output channels, weight (r, in, *kernel)
    B: a 1x1 convolution from r to out channels with the base's groups,            weight (out, r / groups, 1, ...)
    y = base(x) + scaling * B(A(dropout(x)))                                       (N, out, *spatial)

With groups == 1 the update is itself a convolution kernel: delta = scaling * B.flatten(1) @ A.flatten(1), reshaped
to the base weight's (out, in, *kernel). Every (out, in) formula of the LoRA layer (merge, DoRA's norms) then runs
on the weight flattened to (out, in * prod(kernel)): the norm of a flattened row is DoRA's norm over all dimensions
but the output channel. With groups > 1, A still sees every input channel, so the update is no grouped kernel:
forward works, merging is refused (as HF PEFT refuses it), and so is DoRA, whose norm needs that kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_conv(module: nn.Module) -> bool:
    """torch's nn.Conv1d / nn.Conv2d / nn.Conv3d (not transposed convolutions, not transformers' Conv1D)."""
    return isinstance(module, CONV_TYPES)


def spatial_dims(base: nn.Module) -> int:
    """1, 2 or 3: how many spatial dimensions the convolution's kernel has."""
    return len(base.kernel_size)


def conv_problem(base: nn.Module, r: int, dora: bool) -> str | None:
    """Why LoRA (DoRA with `dora`) at rank r cannot adapt this convolution, or None when it can."""
    kind = type(base).__name__
    if base.padding_mode != "zeros":
        return (f"padding_mode={base.padding_mode!r}: LoRA's A convolution pads with zeros (as HF PEFT's does), so "
                "merged and unmerged outputs would differ; only padding_mode='zeros' is supported")
    if any(d != 1 for d in base.dilation) and any(k != 1 for k in base.kernel_size):
        return (f"dilation={tuple(base.dilation)}: HF PEFT builds A without the dilation, so its file would not "
                "describe this layer's update; only dilation 1 is supported")
    if r % base.groups:
        return (f"{kind} with groups={base.groups} and rank {r}: the rank must be divisible by groups (HF PEFT's rule); "
                f"pick a rank that is a multiple of {base.groups}, or a rank_pattern entry for this layer")
    if dora and base.groups > 1:
        return (f"DoRA on a {kind} with groups={base.groups}: the low-rank update of a grouped convolution is not a "
                "grouped kernel, so the weight norm DoRA divides by does not exist (HF PEFT computes a wrong one); "
                "use plain LoRA on this layer or exclude it")
    return None


def merge_problem(base: nn.Module) -> str | None:
    """Why an adapter on this convolution cannot be merged into its weight, or None."""
    if base.groups > 1:
        return (f"{type(base).__name__} with groups={base.groups}: its LoRA update mixes input channels across groups, "
                "which a grouped kernel cannot hold, so it cannot be merged (HF PEFT refuses it too); keep the adapter "
                "unmerged, or exclude this layer when training one to merge")
    return None


def factor_shapes(base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A's shape, B's shape) at rank r, as HF PEFT stores them: (r, in, *kernel) and (out, r / groups, 1, ...)."""
    ones = (1,) * spatial_dims(base)
    return (r, base.in_channels, *base.kernel_size), (base.out_channels, r // base.groups, *ones)


def down(base: nn.Module, A: Tensor, x: Tensor) -> Tensor:
    """A's output: x convolved with A under the base's stride and padding, (N, r, *spatial)."""
    return _CONV_FN[spatial_dims(base)](x.to(A.dtype), A, None, base.stride, base.padding)


def up(base: nn.Module, B: Tensor, h: Tensor) -> Tensor:
    """B's output: the 1x1 convolution from r to out channels with the base's groups, (N, out, *spatial)."""
    return _CONV_FN[spatial_dims(base)](h.to(B.dtype), B, None, 1, 0, 1, base.groups)


def apply_weight(base: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The base convolution with `weight` in place of its own and no bias (DoRA's base part under dropout)."""
    return _CONV_FN[spatial_dims(base)](x, weight, None, base.stride, base.padding, base.dilation, base.groups)


def per_channel(base: nn.Module, v: Tensor) -> Tensor:
    """A per-output-channel vector (out,) viewed as (out, 1, ...) so it broadcasts over (N, out, *spatial)."""
    return v.reshape(-1, *(1,) * spatial_dims(base))


def magnitude_shape(base: nn.Module) -> tuple[int, ...]:
    """The shape HF PEFT saves a convolution's DoRA magnitude in: (1, out, 1, ...)."""
    return (1, base.out_channels, *(1,) * spatial_dims(base))
