"""LoHa's and LoKr's terms in the memory plan (peftkit.plan.memory). The planner's shapes are Llama-family blocks
of linear layers; the factors per layer come from shapes.py (the same rules the layers are built by) with the
config's defaults for everything `peftkit train` does not set (no CP cores on linears; LoKr: decompose_factor -1,
decompose_both false). `shape` is a plan ModelShape, `s` the plan Settings."""

from __future__ import annotations

import math
from typing import Any

from ..lora.plan import INPUT_OF
from .family import Family
from .shapes import Geometry


class PlanTerms:
    """problems / trainable / activations for one family, with `config` the config the train options make."""

    def __init__(self, family: Family, config_class: type) -> None:
        self.family = family
        self.config_class = config_class

    def _factors(self, n_in: int, n_out: int, r: int) -> dict[str, tuple[int, ...]]:
        return self.family.shapes(Geometry("linear", n_out, n_in), r, self.config_class(r=r))

    def problems(self, shape: Any, s: Any) -> list[str]:
        unknown = sorted(set(s.target_names(shape)) - set(shape.linears()))
        if unknown or not s.target_names(shape):
            return [f"{self.family.label} targets {unknown or list(s.targets)} are not linear layers of {shape.name} "
                    f"(its layers: {', '.join(shape.linears())}; or 'all-linear', 'attention')"]
        return []

    def trainable(self, shape: Any, s: Any) -> int:
        linears = shape.linears()
        per_block = sum(math.prod(f) for n in s.target_names(shape)
                        for f in self._factors(*linears[n], s.r).values())
        return per_block * shape.num_layers

    def activations(self, shape: Any, s: Any, width: dict[str, int], act: int, adt: int) -> float:
        """Bytes per token per block. Each adapted layer's F.linear(x, delta) keeps its input (shared by the layers
        reading the same tensor when no cast is needed) and the dense delta (out, in), a per-step cost spread here
        over the step's tokens; LoKr also keeps w1 and w2 for kron's backward when they are products."""
        names, linears = s.target_names(shape), shape.linears()
        if adt == act:  # one saved input per distinct tensor read
            inputs = {INPUT_OF.get(n, n): width[INPUT_OF[n]] if INPUT_OF.get(n) in width else linears[n][0]
                      for n in names}
            total = float(sum(inputs.values()) * act)
        else:  # each layer casts its input to the adapter's dtype and keeps that copy
            total = float(sum(linears[n][0] for n in names) * adt)
        dense = 0
        for n in names:
            n_in, n_out = linears[n]
            factors = self._factors(n_in, n_out, s.r)
            dense += n_in * n_out
            for a, b in (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")):
                if a in factors:
                    dense += factors[a][0] * factors[b][1]
        return total + dense * adt / max(1, s.batch_size * s.seq_len)
