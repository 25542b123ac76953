"""OFT's maths, as plain functions of tensors: the block layout of a layer, the skew-symmetric blocks made from the
stored parameter, the Cayley transform (exact, or its Neumann series), COFT's projection, and applying the
block-diagonal rotation to activations and to weights. HF PEFT's arithmetic (tuners/oft/layer.py), so that the same
parameter gives the same rotation.

    parameter  (rows, b(b-1)/2)    rows = r, or 1 with block_share; the strict upper triangle of each Q, row-major
    Q          (rows, b, b)        Q = U - U^T
    R          (rows, b, b)        (I - Q)(I + Q)^-1, or I + 2Q + 2Q^2 + ... + Q^(n-1) (n Neumann terms)
    x R        (..., r * b)        every row vector's i-th slice of width b times R_i
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def nearest_divisor(width: int, wanted: int) -> int:
    """HF PEFT's adjustment of an r or block size that does not divide `width`: the divisor of `width` nearest to
    `wanted` (the lower one on a tie); `width` itself when `wanted` exceeds it."""
    if wanted >= width:
        return width
    higher = wanted
    while higher <= width and width % higher:
        higher += 1
    lower = wanted
    while lower > 1 and width % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def block_layout(width: int, r: int, block_size: int) -> tuple[int, int]:
    """(blocks, block size) a layer rotating `width` features uses for a config's r / oft_block_size (one of them
    0), moved to divide `width` as PEFT moves them."""
    if r == 0:
        size = block_size if width % block_size == 0 else nearest_divisor(width, block_size)
        return width // size, size
    blocks = r if width % r == 0 and r <= width else nearest_divisor(width, r)
    return blocks, width // blocks


def parameter_shape(width: int, r: int, block_size: int, block_share: bool) -> tuple[int, int]:
    """The stored parameter's shape (PEFT's `oft_R.weight`): (blocks or 1, b(b-1)/2)."""
    blocks, size = block_layout(width, r, block_size)
    return (1 if block_share else blocks), size * (size - 1) // 2


@functools.lru_cache(maxsize=32)
def upper_indices(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(rows, cols) of a b x b strict upper triangle, made once per size and device: autograd keeps the indices of
    every skew() it records, and one shared pair costs nothing per layer (fresh ones cost b(b-1) * 8 bytes each)."""
    return tuple(torch.triu_indices(size, size, 1, device=device))


def skew(vec: Tensor, size: int) -> Tensor:
    """(rows, b(b-1)/2) -> (rows, b, b): U - U^T with the strict upper triangle U filled row by row."""
    rows, cols = upper_indices(size, vec.device)
    upper = vec.new_zeros(vec.shape[0], size, size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def neumann(q: Tensor, terms: int) -> Tensor:
    """PEFT's truncated series for (I - Q)(I + Q)^-1: I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m with m = max(3,
    terms - 1) for terms >= 3 (so 3 and 4 terms agree, as in PEFT), I + 2Q for 2 terms, I for 1."""
    out = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).repeat(q.shape[0], 1, 1)
    if terms > 1:
        out = out + 2.0 * q
    if terms > 2:
        power = q @ q
        out = out + 2.0 * power
        for _ in range(3, terms - 1):
            power = power @ q
            out = out + 2.0 * power
        out = out + power @ q
    return out


def cayley(q: Tensor, use_neumann: bool, terms: int) -> Tensor:
    """(rows, b, b) skew-symmetric -> the rotations, in q's dtype."""
    if use_neumann:
        return neumann(q, terms)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def coft_projection(vec: Tensor, size: int, eps: float) -> Tensor | None:
    """COFT: each row whose Q's Frobenius norm exceeds eps / sqrt(rows) scaled down to that norm (PEFT's
    `_project_batch`); None when every row is inside already (nothing to write)."""
    radius = eps / math.sqrt(vec.shape[0])
    norms = math.sqrt(2.0) * vec.norm(dim=1, keepdim=True)  # ||U - U^T||_F = sqrt(2) ||u||
    outside = norms > radius
    if not bool(outside.any()):
        return None
    return torch.where(outside, vec * (radius / norms), vec)


def rotate(x: Tensor, rotation: Tensor, blocks: int) -> Tensor:
    """x (..., blocks * b) times the block-diagonal matrix of `rotation` ((blocks or 1, b, b); one block is shared
    by every position): each width-b slice of each row vector multiplied by its block."""
    size = rotation.shape[-1]
    if rotation.shape[0] != blocks:
        rotation = rotation.expand(blocks, size, size)
    parts = x.reshape(*x.shape[:-1], blocks, size)  # (..., r, b)
    return torch.einsum("...rk,rkc->...rc", parts, rotation).reshape(x.shape)


def rotate_weight_inputs(w: Tensor, rotation: Tensor, blocks: int, inverse: bool = False) -> Tensor:
    """W (out, in) -> W R^T, what merging a rotation of the input into a linear weight writes (x R W^T = x (W R^T)^T);
    `inverse` gives W R^-T (unmerging), through a solve, since a Neumann R is only nearly orthogonal."""
    size = rotation.shape[-1]
    rotation = rotation.expand(blocks, size, size)
    parts = w.reshape(w.shape[0], blocks, size).transpose(0, 1)  # (r, out, b)
    if inverse:
        out = torch.linalg.solve(rotation.transpose(-2, -1), parts, left=False)  # X R^T = W'
    else:
        out = parts @ rotation.transpose(-2, -1)
    return out.transpose(0, 1).reshape(w.shape)


def rotate_weight_outputs(w: Tensor, rotation: Tensor, blocks: int, inverse: bool = False) -> Tensor:
    """E (num, dim) -> E R, what merging a rotation of an embedding's output writes; `inverse`: E R^-1."""
    size = rotation.shape[-1]
    rotation = rotation.expand(blocks, size, size)
    parts = w.reshape(w.shape[0], blocks, size).transpose(0, 1)  # (r, num, b)
    out = torch.linalg.solve(rotation, parts, left=False) if inverse else parts @ rotation
    return out.transpose(0, 1).reshape(w.shape)
