"""Common GPUs, what fits on them, and a recommendation in words.

Capacities are the cards' memory in GiB as the driver reports it (a "48 GB" card has 48 GiB). An estimate
fits when it is at most the capacity; within 10% of it the fit is called tight (allocator fragmentation and
longer batches can push it over).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .memory import Estimate, Settings, estimate, quantized_base, ranked
from .presets import ModelShape

GIB = 2**30
TIGHT = 0.90
MAX_GPUS = 1024


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float


GPUS = (
    GPU("24 GB consumer (RTX 3090 / 4090)", 24),
    GPU("A100 40GB", 40),
    GPU("48 GB (RTX A6000 / L40S)", 48),
    GPU("A100 80GB", 80),
    GPU("H100 80GB", 80),
    GPU("H200 141GB", 140),
)


def fit(total_bytes: float, gpu: GPU) -> str:
    """'fits', 'tight' or 'no'."""
    share = total_bytes / (gpu.memory_gib * GIB)
    return "no" if share > 1.0 else "tight" if share > TIGHT else "fits"


def gpus_needed(shape: ModelShape, s: Settings, gpu: GPU) -> int | None:
    """Fewest GPUs of this kind that hold full fine-tuning with weights, gradients and optimizer states
    sharded across them (FSDP / ZeRO-3); None if even MAX_GPUS do not (activations do not shard)."""
    n = 1
    while n <= MAX_GPUS:
        if estimate(shape, replace(s, num_gpus=n)).total <= gpu.memory_gib * GIB:
            return n
        n *= 2
    return None


def table(est: Estimate) -> list[dict]:
    """One row per GPU: fit on one card, and for full fine-tuning the sharded GPU count."""
    rows = []
    for gpu in GPUS:
        row = {"gpu": gpu.name, "memory_gib": gpu.memory_gib, "one_gpu": fit(est.total, gpu),
               "headroom_gib": round(gpu.memory_gib - est.total / GIB, 2)}
        if est.settings.method == "full":
            row["gpus_sharded"] = gpus_needed(est.shape, replace(est.settings, num_gpus=1), gpu)
        rows.append(row)
    return rows


def recommend(est: Estimate) -> str:
    """A few sentences: which card to use, and what to change when nothing fits."""
    s, shape, total = est.settings, est.shape, est.total / GIB
    what = f"{s.method} on {shape.name}" + (f" (r={s.r})" if ranked(s.method) else "")
    if s.num_gpus > 1:
        what += f" on each of {s.num_gpus} GPUs"
    holding = [g for g in GPUS if fit(est.total, g) != "no"]
    roomy = [g for g in GPUS if fit(est.total, g) == "fits"]
    lines = []
    if holding and holding[0] in roomy:
        lines.append(f"{what} needs about {total:.1f} GiB per GPU: the smallest card that holds it is the "
                     f"{holding[0].name}.")
    elif holding:
        lines.append(f"{what} needs about {total:.1f} GiB per GPU: it fits {_a(holding[0].name)} with little "
                     "headroom" + (f"; {_a(roomy[0].name)} leaves room for longer batches." if roomy else "."))
    else:
        lines.append(f"{what} needs about {total:.1f} GiB: more than any single GPU in the table.")
    if not holding:
        lines.extend(_alternatives(est))
    if s.method == "full" and holding:
        lines.append(_sharded(est))
        lines.append(f"A parameter-efficient method trains {_cheaper(est)}.")
    return " ".join(lines)


def _sharded(est: Estimate, lead: str = "With states sharded (FSDP / ZeRO-3) it also runs on") -> str:
    """The cheapest (least total memory) way to shard full fine-tuning over GPUs of one kind."""
    counts = {g.name: gpus_needed(est.shape, replace(est.settings, num_gpus=1), g) for g in GPUS}
    options = [(n * g.memory_gib, n, g.name) for g in GPUS if (n := counts[g.name]) and n > 1]
    if not options:
        return ""
    _, n, name = min(options)
    return f"{lead} {n} x {name}."


def _a(name: str) -> str:
    """The card's name with its article: "an A100 80GB", "an H100 80GB", "a 48 GB card"."""
    return ("an " if name[0] in "AEFHILMNORSX" else "a ") + name


def _cheaper(est: Estimate) -> str:
    s = est.settings
    lora = estimate(est.shape, replace(s, method="lora", num_gpus=1))
    qlora = estimate(est.shape, replace(s, method="qlora", num_gpus=1))
    return f"in {lora.total / GIB:.1f} GiB with LoRA r={s.r} or {qlora.total / GIB:.1f} GiB with QLoRA"


def _alternatives(est: Estimate) -> list[str]:
    s, shape, out = est.settings, est.shape, []
    biggest = GPUS[-1]
    if not s.gradient_checkpointing:
        gc = estimate(shape, replace(s, gradient_checkpointing=True))
        if fit(gc.total, biggest) != "no":
            out.append(f"With gradient checkpointing it needs {gc.total / GIB:.1f} GiB.")
    if not quantized_base(s.method):  # the same setup on an NF4 base
        q = estimate(shape, replace(s, method="qlora", num_gpus=1, gradient_checkpointing=True))
        card = next((g.name for g in GPUS if fit(q.total, g) == "fits"), None)
        if card:
            out.append(f"QLoRA r={s.r} with gradient checkpointing needs {q.total / GIB:.1f} GiB and fits {_a(card)}.")
    if s.method == "full":
        out.append(_sharded(est, "With states sharded (FSDP / ZeRO-3) full fine-tuning runs on"))
    if s.batch_size > 1:
        out.append(f"A micro-batch of 1 with {s.batch_size} gradient-accumulation steps lowers the activations.")
    return out
