"""LoRA's (and DoRA's, QLoRA's) terms in the memory plan (peftkit.plan.memory): trainable parameters, the
activations its layers keep per token, and the settings it cannot take. `shape` is a plan ModelShape, `s`
the plan Settings."""

from __future__ import annotations

from typing import Any

# which input each linear of a Llama block reads: q/k/v share the first norm's output, gate/up the second's
INPUT_OF = {"q_proj": "ln1", "k_proj": "ln1", "v_proj": "ln1", "o_proj": "attn", "gate_proj": "ln2",
            "up_proj": "ln2", "down_proj": "mid"}


def problems(shape: Any, s: Any) -> list[str]:
    found = []
    unknown = sorted(set(s.target_names(shape)) - set(shape.linears()))
    if unknown or not s.target_names(shape):
        found.append(f"targets {unknown or list(s.targets)} are not linear layers of {shape.name} "
                     f"(its layers: {', '.join(shape.linears())}; or 'all-linear', 'attention')")
    chosen = s.target_names(shape)
    too_big = [n for n, (i, o) in shape.linears().items() if n in chosen and s.r > min(i, o)]
    if too_big:
        found.append(f"rank {s.r} is larger than the layers {', '.join(too_big)} "
                     f"(smallest side {min(min(shape.linears()[n]) for n in too_big)}): a rank above it "
                     "adds parameters but no expressive power")
    return found


def trainable(shape: Any, s: Any) -> int:
    per_block = sum(s.r * (i + o) + (o if s.method == "dora" else 0)
                    for n, (i, o) in shape.linears().items() if n in s.target_names(shape))
    return per_block * shape.num_layers


def activations(shape: Any, s: Any, width: dict[str, int], act: int, adt: int) -> float:
    """Bytes per token per block the adapters add to what the block saves itself."""
    names = s.target_names(shape)
    total = 0.0
    if adt == act:  # adapters read the layer's own tensors: one saved copy per distinct input
        total += sum(width[g] for g in {INPUT_OF[n] for n in names}) * act
    else:  # each adapter casts its input to its own dtype and autograd keeps that copy
        total += sum(shape.linears()[n][0] for n in names) * adt
    total += len(names) * s.r * act  # A's output, as B reads it
    if s.method == "dora":
        total += sum(o for n, (_, o) in shape.linears().items() if n in names) * 2 * act
    return total
