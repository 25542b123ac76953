import sys

import pytest
import torch

from peftkit.quant import alloc, nf4


def test_small_buffers_skip_the_system_call(monkeypatch):
    calls = []
    monkeypatch.setattr(alloc, "_madvise", lambda: lambda *a: calls.append(a) or 0)
    out = alloc.empty(1000, torch.float32, "cpu")
    assert out.shape == (1000,) and out.dtype == torch.float32 and calls == []


def test_large_buffers_advise_their_aligned_interior(monkeypatch):
    calls = []
    monkeypatch.setattr(alloc, "_madvise", lambda: lambda *a: calls.append(a) or 0)
    n = 3 * alloc.HUGE_PAGE // 4 + 123
    out = alloc.empty(n, torch.float32, "cpu")
    assert len(calls) == 1
    start, length, advice = calls[0]
    assert advice == alloc.MADV_HUGEPAGE
    assert start % alloc.HUGE_PAGE == 0 and length % alloc.HUGE_PAGE == 0 and length > 0
    assert out.data_ptr() <= start and start + length <= out.data_ptr() + 4 * n


def test_a_refused_advice_still_gives_the_buffer(monkeypatch):
    monkeypatch.setattr(alloc, "_madvise", lambda: lambda *a: -1)
    assert alloc.empty(alloc.HUGE_PAGE, torch.float32, "cpu").numel() == alloc.HUGE_PAGE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_dequantize_into_huge_pages_is_exact():
    torch.manual_seed(0)
    w = torch.randn(1024, 2048 + 3)  # > MIN_BYTES of output, size not a multiple of the blocksize
    q = nf4.quantize(w, 64, double_quant=True)
    reference = nf4.dequantize(q, torch.float32, out=torch.empty(nf4.padded_numel(q)))
    assert torch.equal(nf4.dequantize(q, torch.float32), reference)
