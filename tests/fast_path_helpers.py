"""Shared by tests/test_fused_nf4.py and tests/test_cuda.py: an fp32 twin of a model as the yardstick for 16-bit
rounding, and the check that a fast path's 16-bit results are as close to it as the module path's are."""

from __future__ import annotations

import copy

import torch
from torch import nn

from peftkit.quant.linear import NF4Linear


def fp32_twin(model: nn.Module) -> nn.Module:
    """The same model computing in fp32 (same 4-bit codes for NF4 bases, same adapters)."""
    twin = copy.deepcopy(model).float()
    for module in twin.modules():
        if isinstance(module, NF4Linear):
            module.compute_dtype = torch.float32
    return twin


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in fp32."""
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm()).item()


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """max|got - want| <= tol * max|want|."""
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item()
    assert err <= tol * want.abs().max().item() + 1e-12, f"{what}: max|diff| {err:.3e} vs max|ref| {want.abs().max():.3e}"


def within_rounding(fast: dict, plain: dict, exact: dict) -> None:
    """The fast path's 16-bit tensors are as close to the fp32 computation as the module path's 16-bit ones:
    per tensor within 2x (+0.5%) of the module path's own error, and over all tensors together within 1.25x."""
    assert set(fast) == set(plain) == set(exact) and exact
    for name in exact:
        err_f, err_p = rel(fast[name], exact[name]), rel(plain[name], exact[name])
        assert err_f <= 2 * err_p + 5e-3, f"{name}: fast path's error {err_f:.3g}, module path's {err_p:.3g}"
    cat = lambda d: torch.cat([d[k].float().flatten().cpu() for k in sorted(exact)])  # noqa: E731
    err_f, err_p = rel(cat(fast), cat(exact)), rel(cat(plain), cat(exact))
    assert err_f <= 1.25 * err_p + 1e-3, (err_f, err_p)
