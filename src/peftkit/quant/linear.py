"""A frozen NF4 linear layer used as a base under LoRA (QLoRA), and `quantize(model)` to put it in place.

The weight lives as buffers (packed codes and statistics) so `.to(device)`, `state_dict()` and
safetensors work as for any module. Each forward dequantizes the weight in the compute dtype, and the
backward dequantizes it again instead of keeping the dense weight alive between the two: only the
4-bit form stays in memory while adapters train on top.
"""

from __future__ import annotations

import json
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hf import is_conv1d
from ..targeting import is_linear_like, matches, named_modules_outside_wrappers, output_head_names
from . import nf4

_local = threading.local()


def _scratch(numel: int) -> Tensor:
    """A per-thread fp32 CPU buffer of at least `numel` elements, grown as needed and reused across
    layers: dequantizing into fresh memory costs a page fault per 4 KiB, as much as the dequantization."""
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable both inside and outside inference mode
            buf = _local.buffer = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


BNB_STATE = "quant_state.bitsandbytes__nf4"
BUFFER_NAMES = ("packed", "stored_absmax", "qabsmax", "absmax_scales", "absmax_offset")


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantized on the fly, in forward and again in backward (nothing dense saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: NF4Linear) -> Tensor:
        ctx.module = module
        return F.linear(x, module.dense(x.dtype, scratch=True))  # (B, T, out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.module.dense(grad.dtype, scratch=True), None  # (B, T, in)


class NF4Linear(nn.Module):
    """y = x W^T + b with W frozen in NF4. Offers get/set_dense_weight, so LoRA can merge into it."""

    peftkit_linear_like = True

    def __init__(self, q: nf4.NF4Weight, bias: Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.blocksize = q.blocksize
        self.weight_dtype = q.dtype
        self.compute_dtype = compute_dtype or q.dtype
        self._set_buffers(q)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def _set_buffers(self, q: nf4.NF4Weight) -> None:
        stored = q.tensors()
        for name in BUFFER_NAMES:
            self.register_buffer(name, stored.get(name), persistent=True)

    @property
    def stored_weight_numel(self) -> int:
        """Parameters the 4-bit buffers stand for (counted by peftkit.trainable_parameters)."""
        return self.out_features * self.in_features

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @classmethod
    def from_linear(cls, module: nn.Module, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantize an nn.Linear (or a transformers Conv1D, whose (in, out) weight is transposed)."""
        if isinstance(module, NF4Linear):
            raise ValueError("this layer is already NF4-quantized; quantizing it again would compound the error")
        weight = module.weight.detach()
        weight = weight.T if is_conv1d(module) else weight
        q = nf4.quantize(weight.contiguous(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, getattr(module, "bias", None), compute_dtype)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, blocksize: int, double_quant: bool,
              weight_dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """A layer with buffers of the right shapes and no values, to load a saved state_dict into."""
        n = out_features * in_features
        blocks = -(-n // blocksize)
        q = nf4.NF4Weight(packed=torch.zeros((n + 1) // 2, dtype=torch.uint8),
                          shape=torch.Size((out_features, in_features)), dtype=weight_dtype, blocksize=blocksize)
        if double_quant:
            q.qabsmax = torch.zeros(blocks, dtype=torch.uint8)
            q.absmax_scales = torch.zeros(-(-blocks // nf4.ABSMAX_BLOCKSIZE))
            q.absmax_offset = torch.zeros(())
        else:
            q.stored_absmax = torch.zeros(blocks)
        return cls(q, torch.zeros(out_features, dtype=weight_dtype) if bias else None, compute_dtype)

    def settings(self) -> dict:
        """What `empty` needs to rebuild this layer (saved next to a quantized checkpoint)."""
        return {"out_features": self.out_features, "in_features": self.in_features, "bias": self.bias is not None,
                "blocksize": self.blocksize, "double_quant": self.double_quant,
                "weight_dtype": str(self.weight_dtype).removeprefix("torch."),
                "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}

    @classmethod
    def from_bnb(cls, tensors: dict[str, Tensor], compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Build from one layer of a transformers + bitsandbytes 4-bit checkpoint. `tensors` holds that
        module's entries without its prefix: 'weight' (packed), 'weight.absmax', 'weight.quant_map',
        ['weight.nested_absmax', 'weight.nested_quant_map'], 'weight.quant_state.bitsandbytes__nf4', ['bias']."""
        key = f"weight.{BNB_STATE}"
        if key not in tensors:
            raise ValueError(f"not a bitsandbytes NF4 layer: no {key!r} among {sorted(tensors)}")
        state = json.loads(bytes(tensors[key].tolist()))
        if state.get("quant_type") != "nf4":
            raise ValueError(f"bitsandbytes quant_type {state.get('quant_type')!r} is not supported; only 'nf4'")
        if not torch.equal(tensors["weight.quant_map"].float().cpu(), torch.tensor(nf4.NF4_CODE)):
            raise ValueError("the checkpoint's quant_map is not the NF4 codebook")
        packed = tensors["weight"].contiguous().view(torch.uint8).reshape(-1)  # any bnb_4bit_quant_storage
        q = nf4.NF4Weight(packed=packed, shape=torch.Size(state["shape"]),
                          dtype=getattr(torch, state["dtype"]), blocksize=int(state["blocksize"]))
        if "nested_blocksize" in state:
            if state["nested_blocksize"] != nf4.ABSMAX_BLOCKSIZE:
                raise ValueError(f"nested_blocksize {state['nested_blocksize']} is not supported (only 256)")
            q.qabsmax, q.absmax_scales = tensors["weight.absmax"], tensors["weight.nested_absmax"].float()
            q.absmax_offset = torch.tensor(state["nested_offset"], dtype=torch.float32)
        else:
            q.stored_absmax = tensors["weight.absmax"].float()
        return cls(q, tensors.get("bias"), compute_dtype)

    def bnb_state_dict(self) -> dict[str, Tensor]:
        """This layer in the transformers + bitsandbytes checkpoint layout (keys relative to the module)."""
        state = {"quant_type": "nf4", "blocksize": self.blocksize,
                 "dtype": str(self.weight_dtype).removeprefix("torch."), "shape": [self.out_features, self.in_features]}
        out = {"weight": self.packed.view(-1, 1), "weight.quant_map": torch.tensor(nf4.NF4_CODE)}
        if self.double_quant:
            out.update({"weight.absmax": self.qabsmax, "weight.nested_absmax": self.absmax_scales,
                        "weight.nested_quant_map": nf4.dynamic_map(self.packed.device)})
            state.update(nested_blocksize=nf4.ABSMAX_BLOCKSIZE, nested_dtype="float32",
                         nested_offset=self.absmax_offset.item())
        else:
            out["weight.absmax"] = self.stored_absmax
        out[f"weight.{BNB_STATE}"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def quantized(self) -> nf4.NF4Weight:
        return nf4.NF4Weight(packed=self.packed, shape=torch.Size((self.out_features, self.in_features)),
                             dtype=self.weight_dtype, blocksize=self.blocksize, stored_absmax=self.stored_absmax,
                             qabsmax=self.qabsmax, absmax_scales=self.absmax_scales, absmax_offset=self.absmax_offset)

    def dense(self, dtype: torch.dtype | None = None, scratch: bool = False) -> Tensor:
        """The dequantized weight. With scratch=True on a CPU, fp32 results are written into a per-thread
        buffer that the next call overwrites: for use inside one matmul, never to keep."""
        dtype = dtype or self.compute_dtype
        q = self.quantized()
        if scratch and dtype == torch.float32 and self.packed.device.type == "cpu":
            return nf4.dequantize(q, dtype, out=_scratch(nf4.padded_numel(q)))
        return nf4.dequantize(q, dtype)

    # WeightAccess: what LoRA's merge uses
    def get_dense_weight(self) -> Tensor:
        return self.dense(torch.float32)

    def set_dense_weight(self, weight: Tensor) -> None:
        warnings.warn("writing a dense weight into an NF4 layer requantizes it: the 4-bit rounding error changes "
                      "the result, and unmerging will not restore the original exactly. For an exact merge use "
                      "merge_and_unload(model, dtype=...), which returns dense layers.", stacklevel=4)
        self._set_buffers(nf4.quantize(weight.to(self.weight_dtype), self.blocksize, self.double_quant))

    def forward(self, x: Tensor) -> Tensor:
        out = _NF4Matmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.packed.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def quantize(model: nn.Module, method: str = "nf4", double_quant: bool = True, blocksize: int = 64,
             compute_dtype: torch.dtype | None = None, modules: list[str] | str | None = None) -> nn.Module:
    """Replace the model's linear layers (not the output head or embeddings, unless `modules` names them)
    by frozen NF4 layers, in place. Returns the model. LoRA can then be injected on top (QLoRA)."""
    if method != "nf4":
        raise ValueError(f"quantization method {method!r} is not supported; use 'nf4'")
    heads = output_head_names(model)
    chosen = []
    for name, module in named_modules_outside_wrappers(model):
        if isinstance(module, NF4Linear) and (modules is None or matches(modules, name)):
            raise ValueError(f"{name} is already NF4-quantized; quantize a model once")
        picked = matches(modules, name) if modules is not None else (is_linear_like(module) and name not in heads)
        if picked:
            if not (isinstance(module, nn.Linear) or is_conv1d(module)):
                raise ValueError(f"{name} ({type(module).__name__}) is not a linear layer and cannot be NF4-quantized")
            chosen.append((name, module))
    if not chosen:
        raise ValueError(f"no linear layer to quantize (modules={modules!r})")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(module, blocksize, double_quant, compute_dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4Linear (also the bases inside LoRA layers) by a dense nn.Linear, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, NF4Linear):
                setattr(module, child_name, child.to_linear(dtype))
    return model
