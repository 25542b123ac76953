"""4-bit NormalFloat (NF4) with blockwise absmax and double quantization, in pure PyTorch (any device).

Bit-exact with bitsandbytes' `quantize_4bit(..., quant_type="nf4")` on CPU (tested in tests/quant):
- each block of `blocksize` values is scaled by its absmax into [-1, 1] and every value takes the index
  of the nearest of the 16 NF4 codes (ties go to the lower code, through midpoint thresholds);
- two codes share a byte: element 2j in the HIGH nibble, 2j+1 in the low one; an odd count is padded with the value 0.0 (code 7);
- double quantization stores the fp32 absmax values as 8 bits: subtract their mean (the offset), then
  quantize them blockwise (256 a block) with the signed dynamic map; 4.127 bits per weight instead of 4.5.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from peftkit.quant import alloc

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _codes(device: torch.device) -> tuple[Tensor, Tensor]:
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return code, (code[:-1] + code[1:]) / 2  # (16,), midpoints (15,)


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """The signed 8-bit dynamic map used for the absmax statistics (256 sorted values in [-1, 1]).

    7 decades of magnitude (1e-6 .. 1), each split linearly into 2**i + 1 boundaries whose midpoints
    are the codes, mirrored for negative values, plus 0 and 1 (the lowest code is about -0.993)."""
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10 ** (-6 + i))
        values += means.tolist() + (-means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=8)
def _dynamic_map_cached(device: str) -> Tensor:
    return dynamic_map(device)


@dataclass
class NF4Weight:
    """A quantized weight. `packed` holds two 4-bit codes a byte; the statistics rescale each block.

    Without double quantization `absmax` is stored as fp32, one per block. With it, `qabsmax` (uint8,
    one per block), `absmax_scales` (fp32, one per 256 blocks) and `absmax_offset` (the mean) are
    stored instead, and `absmax` is computed from them on access.
    """

    packed: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    stored_absmax: Tensor | None = None
    qabsmax: Tensor | None = None
    absmax_scales: Tensor | None = None
    absmax_offset: Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def absmax(self) -> Tensor:
        """fp32 absmax per block (dequantized from 8 bits when double-quantized)."""
        if self.stored_absmax is not None:
            return self.stored_absmax
        code = _dynamic_map_cached(str(self.qabsmax.device))
        return _dequantize_8bit(self.qabsmax, self.absmax_scales, code, ABSMAX_BLOCKSIZE) + self.absmax_offset

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes this weight occupies: packed codes plus statistics."""
        tensors = [self.packed, self.stored_absmax, self.qabsmax, self.absmax_scales, self.absmax_offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (for safetensors)."""
        names = ("packed", "stored_absmax", "qabsmax", "absmax_scales", "absmax_offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, device: torch.device | str) -> NF4Weight:
        moved = {n: t.to(device) for n, t in self.tensors().items()}
        return NF4Weight(shape=self.shape, dtype=self.dtype, blocksize=self.blocksize, **moved)


def _check(weight: Tensor, blocksize: int) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"NF4 quantizes float32/float16/bfloat16 weights, got {weight.dtype}; "
                         "an integer or already-quantized tensor cannot be quantized again")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported; use one of {BLOCKSIZES}")
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(weight.shape)}")


def _blockwise_absmax(flat: Tensor, blocksize: int) -> Tensor:
    """Per-block max |x| of a flat fp32 tensor; the last block may be short."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().view(1)])
    return absmax


def _nearest_code(scaled: Tensor) -> Tensor:
    """Index of the nearest NF4 code: the number of midpoints strictly below each value (what
    torch.bucketize returns, so ties go to the lower code), summed over 15 comparisons in uint8,
    which runs about twice as fast as bucketize on a CPU."""
    _, midpoints = _codes(torch.device("cpu"))
    thresholds = midpoints.tolist()  # exact fp32 values; compared in the tensor's fp32
    idx = (scaled > thresholds[0]).to(torch.uint8)
    for threshold in thresholds[1:]:
        idx.add_(scaled > threshold)
    return idx


def quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """NF4-quantize a float tensor of any shape (flattened row-major)."""
    _check(weight, blocksize)
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    absmax = _blockwise_absmax(flat, blocksize)
    if not torch.isfinite(absmax).all():  # a NaN or inf anywhere carries into its block's absmax
        raise ValueError("cannot quantize a weight with NaN or inf values")
    # Full blocks multiply by the reciprocal, the short tail block divides: bitsandbytes does exactly
    # this, and a different rounding would move values that sit on a threshold.
    inv = 1.0 / absmax[: full // blocksize].clamp(min=1e-38)
    scaled = (flat[:full].view(-1, blocksize) * inv[:, None]).reshape(-1)
    if full < n:
        scaled = torch.cat([scaled, flat[full:] / absmax[-1].clamp(min=1e-38)])
    if n % 2:  # values past +-1 from rounding still take the end codes: no clamp needed
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _nearest_code(scaled)  # (n,) codes 0..15, ties to the lower one
    packed = (q[0::2] << 4) | q[1::2]  # (ceil(n/2),)
    result = NF4Weight(packed=packed, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)
    if not double_quant:
        result.stored_absmax = absmax
        return result
    offset = absmax.mean()
    qabsmax, scales = _quantize_8bit(absmax - offset, dynamic_map(flat.device), ABSMAX_BLOCKSIZE)
    result.qabsmax, result.absmax_scales, result.absmax_offset = qabsmax, scales, offset
    return result


@functools.lru_cache(maxsize=8)
def _pair_table(device: str) -> Tensor:
    """(65536, 4) fp32: the four NF4 values held by each pair of packed bytes read as one little-endian
    16-bit integer (byte 0's high and low nibble, then byte 1's). One gather yields four weights."""
    code, _ = _codes(torch.device(device))
    k = torch.arange(65536, device=device)
    first, second = k & 0xFF, k >> 8
    return torch.stack([code[first >> 4], code[first & 0xF], code[second >> 4], code[second & 0xF]], 1).contiguous()


def dequantize(q: NF4Weight, dtype: torch.dtype | None = None, out: Tensor | None = None) -> Tensor:
    """The dense tensor back, computed in fp32 and cast to `dtype` (default: the original dtype).

    `out`: an fp32 buffer of at least `padded_numel(q)` elements to write into instead of allocating
    (a reused buffer avoids the page faults of a fresh allocation, which cost as much as the work)."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize expects an NF4Weight, got {type(q).__name__}")
    packed = q.packed
    if packed.numel() % 2:
        packed = torch.cat([packed, packed.new_zeros(1)])
    pairs = packed.view(torch.uint16).to(torch.int32)  # (ceil(n/4),)
    # The four fp32 values of a table row travel as one 16-byte complex128 element: a 1-D gather of
    # wide elements runs about 1.7x faster than gathering (65536, 4) rows. Bits are copied unchanged.
    table = _pair_table(str(packed.device)).view(torch.complex128).view(-1)
    if out is None:
        out = alloc.empty(4 * pairs.numel(), torch.float32, packed.device)  # huge pages: far fewer faults
    values = out.view(-1)[: 4 * pairs.numel()]
    torch.index_select(table, 0, pairs, out=values.view(torch.complex128))
    n, bs = q.numel, q.blocksize
    full = n - n % bs
    values[:full].view(-1, bs).mul_(q.absmax[: full // bs, None])
    if full < n:
        values[full:n].mul_(q.absmax[-1])
    return values[:n].view(q.shape).to(dtype or q.dtype)


def padded_numel(q: NF4Weight) -> int:
    """Elements a buffer passed to dequantize(out=...) must hold."""
    return 4 * -(-q.packed.numel() // 2)


LUT_SIZE = 65536


@functools.lru_cache(maxsize=4)
def _lut(code_bytes: bytes) -> Tensor:
    """Code index for each of 65536 evenly spaced points of [-1, 1]: the nearest code by float32 midpoints
    (the number of midpoints strictly below the point). bitsandbytes' CPU kernel quantizes through such a
    table, so values are rounded to the grid before the nearest code is chosen; reproduced for equal bytes."""
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)


def _quantize_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization with a sorted 256-entry code, as bitsandbytes' CPU kernel does it:
    scale by 1/absmax, round to a 65536-point grid of [-1, 1], look the code index up in a table.
    An all-zero block gets code 0 and scale 0."""
    absmax = _blockwise_absmax(x, blocksize)
    block_of = torch.arange(x.numel(), device=x.device) // blocksize
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    normed = (x * inv[block_of]).clamp(-1.0, 1.0)
    # (v + 1) * 0.5 * 65535 + 0.5 with the last two steps fused (one rounding), as the compiled kernel does
    half = (normed + 1.0) * 0.5
    grid_idx = (half.double() * (LUT_SIZE - 1) + 0.5).float().to(torch.int64)
    lut = _lut(code.cpu().contiguous().numpy().tobytes()).to(x.device)
    idx = torch.where((absmax == 0)[block_of], torch.zeros_like(grid_idx), lut[grid_idx].long())
    return idx.to(torch.uint8), absmax


def _dequantize_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    values = code[q.long()]
    n = values.numel()
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values


def bits_per_parameter(q: NF4Weight) -> float:
    return 8 * q.nbytes() / q.numel
