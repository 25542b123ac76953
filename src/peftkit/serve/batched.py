"""Many LoRA adapters in one forward: each row of a batch picks its adapter by a slot index.

Every wrapped linear layer keeps the loaded adapters stacked in slots,

    A_slots (capacity, r_slot, in)     B_slots (capacity, out, r_slot), the scaling folded into B

so rank_pattern, alpha_pattern and rsLoRA are only numbers folded into B, and an adapter of a smaller rank
is zero-padded up to r_slot (zero rows of A and zero columns of B add nothing). For a batch whose row i
uses slot idx[i] (-1: the base alone) a layer computes the base output for every row, then ONE gathered,
batched low-rank product for the rows that have an adapter, as Punica's and S-LoRA's BGMV kernels do:

    y = base(x);  y[rows] += bmm(bmm(x[rows], A_slots[idx[rows]]^T), B_slots[idx[rows]]^T)

(when every adapter row uses the same slot, two plain matmuls with that slot's A and B instead). There is no
loop over adapters and no merge per request; a batch without adapter rows costs the base alone.
Slots grow on demand (capacity doubles up to max_slots, r_slot grows to the largest rank written), so memory
follows what is loaded, not max_loaded * max_rank. A layer that an adapter does not target holds zeros in its
slot. The slot index is set for the whole model at once with `SlotBank.rows(idx)`; it is per thread, so a
forward on another thread is never routed by it.

Thread safety: the registry writes only into slots no running row uses, and a growth replaces the (A, B)
pair as one attribute, so a forward running on another thread reads either the old pair or the new one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..methods.lora import LoraConfig
from ..methods.lora import factor_shapes
from ..weights import WeightAccess, base_device
from ..targeting import adaptable_kind, select_targets


class _RowState(threading.local):
    """The current forward's routing, per thread: rows with an adapter and their slots (None: base only)."""

    sel: Tensor | None = None  # (n,) batch rows that use an adapter
    slots: Tensor | None = None  # (n,) their slot indices
    single: int | None = None  # the one slot every adapter row uses, when they all use the same
    batch: int | None = None  # the batch size the routing was set for


class SlotLoraLayer(nn.Module):
    """Wraps one frozen linear (or Conv1D, or a linear-like quantized base) and adds the slot adapters."""

    peftkit_wrapper = True  # targeting sees this as the linear it wraps (module paths stay the same)

    def __init__(self, base: nn.Module, kind: str, state: _RowState, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if kind not in ("linear", "conv1d"):
            raise ValueError(f"SlotLoraLayer wraps linear layers, not a module of kind {kind!r}")
        self.base = base
        self.training = base.training
        self.peftkit_kind = kind
        (_, self.in_features), (self.out_features, _) = factor_shapes(kind, base, 1)
        if dtype is None:  # fp32 over 16-bit and quantized bases (PEFT's autocast_adapter_dtype), else the base's
            weight = None if isinstance(base, WeightAccess) else getattr(base, "weight", None)
            wide = weight is not None and weight.dtype in (torch.float32, torch.float64)
            dtype = weight.dtype if wide else torch.float32
        device = base_device(base)
        self._state = state
        # One attribute holds both stacks, so a reader never pairs an old A with a new B.
        self.slots: tuple[Tensor, Tensor] = (
            torch.zeros(0, 0, self.in_features, dtype=dtype, device=device),  # (C, r, in)
            torch.zeros(0, self.out_features, 0, dtype=dtype, device=device),  # (C, out, r)
        )

    @property
    def capacity(self) -> int:
        return self.slots[0].shape[0]

    @property
    def r_slot(self) -> int:
        return self.slots[0].shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots)

    # --- slot writes (registry thread) ------------------------------------------------------------
    @torch.no_grad()
    def _grown(self, capacity: int, rank: int) -> tuple[Tensor, Tensor]:
        """A new (A, B) pair at least `capacity` x `rank`, the old slots copied in (zero-padded)."""
        A, B = self.slots
        if capacity <= A.shape[0] and rank <= A.shape[1]:
            return A, B
        cap, r = max(capacity, A.shape[0]), max(rank, A.shape[1])
        A2 = A.new_zeros(cap, r, self.in_features)  # (C', r', in)
        B2 = B.new_zeros(cap, self.out_features, r)  # (C', out, r')
        A2[: A.shape[0], : A.shape[1]] = A
        B2[: B.shape[0], :, : B.shape[2]] = B
        return A2, B2

    @torch.no_grad()
    def write(self, slot: int, capacity: int, A: Tensor | None, B: Tensor | None) -> None:
        """Put factors A (r, in) and scaled B (out, r) into `slot` (None: this adapter does not target the
        layer, the slot is zeroed). `capacity` is the bank's slot count, which every layer follows."""
        rank = 0 if A is None else A.shape[0]
        with torch.inference_mode(False):  # plain tensors even when called under inference_mode, so later
            new_A, new_B = self._grown(capacity, rank)  # in-place writes work from any thread and mode
            if new_A.shape[1] > 0:
                new_A[slot].zero_()
                new_B[slot].zero_()
            if A is not None:
                new_A[slot, :rank] = A.to(new_A)
                new_B[slot, :, :rank] = B.to(new_B)
        self.slots = (new_A, new_B)

    # --- forward (engine thread) ------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)  # (B, ..., out)
        state = self._state
        sel = state.sel
        A_all, B_all = self.slots
        if sel is None or A_all.shape[1] == 0:
            return out  # no adapter rows in this batch, or no loaded adapter targets this layer
        if x.shape[0] != state.batch:
            raise ValueError(f"the slot routing was set for a batch of {state.batch} rows, but this layer got "
                             f"{x.shape[0]}; call SlotBank.rows() with one slot index per row")
        n = sel.shape[0]
        xs = x.index_select(0, sel).reshape(n, -1, self.in_features).to(A_all.dtype)  # (n, T, in)
        if state.single is not None:  # one adapter for all of them: two plain matmuls, no per-row copies
            delta = (xs @ A_all[state.single].T) @ B_all[state.single].T  # (n, T, out)
        else:
            A = A_all.index_select(0, state.slots)  # (n, r, in)
            B = B_all.index_select(0, state.slots)  # (n, out, r)
            hidden = torch.bmm(xs, A.transpose(1, 2))  # (n, T, r)
            delta = torch.bmm(hidden, B.transpose(1, 2))  # (n, T, out)
        if delta.dtype == out.dtype:
            return out.index_add(0, sel, delta.reshape(n, *out.shape[1:]))
        # a 16-bit base: the sum in the slots' dtype, rounded once to the output's (as PEFT adds an fp32 adapter)
        summed = out.index_select(0, sel).to(delta.dtype).add_(delta.reshape(n, *out.shape[1:]))
        return out.index_copy(0, sel, summed.to(out.dtype))

    def extra_repr(self) -> str:
        return f"kind={self.peftkit_kind}, capacity={self.capacity}, r_slot={self.r_slot}"


class SlotBank:
    """The slot layers of one model: writing an adapter into a slot across all layers, and routing rows."""

    def __init__(self, model: nn.Module, layers: dict[str, SlotLoraLayer], state: _RowState, max_slots: int) -> None:
        self.model = model
        self.layers = layers  # module path -> layer
        self.max_slots = max_slots
        self._state = state
        self.capacity = 0

    def write(self, slot: int, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Load one adapter into `slot`: factors maps a module path to (A (r, in), scaled B (out, r)); every
        other layer gets zeros there. The caller guarantees that no running row uses `slot`."""
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.max_slots - 1}")
        unknown = sorted(set(factors) - set(self.layers))
        if unknown:
            raise KeyError(f"no slot layer at {unknown}; the adapter targets modules this bank does not wrap")
        while slot >= self.capacity:  # doubling, up to max_slots
            self.capacity = min(self.max_slots, max(1, 2 * self.capacity))
        for path, layer in self.layers.items():
            A, B = factors.get(path, (None, None))
            layer.write(slot, self.capacity, A, B)

    def nbytes(self) -> int:
        """Bytes the slots hold now, in every layer (padding and free slots included)."""
        return sum(layer.nbytes() for layer in self.layers.values())

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype()).element_size()

    def dtype(self) -> torch.dtype:
        """The slots' dtype (adapters are cast to it when written)."""
        for layer in self.layers.values():
            return layer.slots[0].dtype
        return torch.float32

    @contextmanager
    def rows(self, idx: Tensor | list[int] | None) -> Iterator[None]:
        """Route the forwards in this block (on this thread): row i uses slot idx[i], -1 the base alone."""
        state = self._state
        saved = (state.sel, state.slots, state.single, state.batch)
        try:
            if idx is None:
                state.sel, state.slots, state.single, state.batch = None, None, None, None
            else:
                idx = torch.as_tensor(idx, dtype=torch.long).cpu()  # (B,), a list of slots stays on the host
                if idx.numel() and int(idx.max()) >= self.capacity:
                    raise ValueError(f"slot index {int(idx.max())} is not loaded (capacity {self.capacity})")
                sel = (idx >= 0).nonzero().flatten()  # (n,), computed once per forward, not per layer
                device = self._device()
                state.sel = sel.to(device) if sel.numel() else None
                used = idx[sel]
                state.slots = used.to(device)
                state.single = int(used[0]) if used.numel() and bool((used == used[0]).all()) else None
                state.batch = idx.shape[0]
            yield
        finally:
            state.sel, state.slots, state.single, state.batch = saved

    def _device(self) -> torch.device:
        for layer in self.layers.values():
            return layer.slots[0].device
        return torch.device("cpu")


def wrap_linears(model: nn.Module, max_slots: int, dtype: torch.dtype | None = None) -> SlotBank:
    """Wrap every linear layer of `model` but the output head ("all-linear", PEFT's rule) in a SlotLoraLayer,
    in place, and return the bank that loads adapters into them. Wrap after moving the model to its device."""
    if max_slots < 1:
        raise ValueError(f"max_slots must be at least 1, got {max_slots}")
    present = [n for n, m in model.named_modules() if getattr(m, "peftkit_wrapper", False)]
    if present:
        raise ValueError(f"the model already has adapter layers ({present[:3]}...); merge_and_unload() it, or load "
                         "a clean base, before serving adapters on it")
    state = _RowState()
    layers: dict[str, SlotLoraLayer] = {}
    for path, module in select_targets(model, LoraConfig(target_modules="all-linear")):
        layer = SlotLoraLayer(module, adaptable_kind(module), state, dtype)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
        layers[path] = layer
    return SlotBank(model, layers, state, max_slots)


def unwrap_linears(model: nn.Module) -> nn.Module:
    """Put every SlotLoraLayer's base back in its place (the model as it was before wrap_linears)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, SlotLoraLayer):
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module.base)
    return model
