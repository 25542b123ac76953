"""Common GPUs, what fits on them, and a recommendation in words.

Capacities are the cards' memory in GiB as the driver reports it (a "48 GB" card has 48 GiB). An estimate
fits when it is at most the capacity; within 10% of it the fit is called tight (allocator fragmentation and
longer batches can push it over). When a setup does not fit, `fixes` names the single changes that make it fit
(gradient checkpointing, a smaller micro-batch, a smaller rank, an 8-bit optimizer, a 4-bit base) and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .memory import OPTIMIZERS, Estimate, Settings, estimate, quantized_base, ranked
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


def legend() -> str:
    """What the fit words of the GPU table mean."""
    return (f"fits: the estimate is at most {TIGHT:.0%} of the card's memory; tight: between {TIGHT:.0%} and 100% "
            "(it should run, but allocator fragmentation or longer sequences can push it over); no: more than "
            "the card holds.")


def target_gpu(max_memory_gib: float | None = None) -> GPU:
    """The memory a setup has to fit: --max-memory when given, else the largest card in the table."""
    return GPU("the --max-memory budget", max_memory_gib) if max_memory_gib else GPUS[-1]


def _halvings(value: int) -> list[int]:
    """value // 2, value // 4, ... down to 1."""
    out = []
    while value > 1:
        value //= 2
        out.append(value)
    return out


def _candidates(s: Settings) -> list[tuple[str, list[tuple[str, Settings]]]]:
    """Each kind of single change, with its steps from the mildest to the strongest."""
    kinds = []
    if not s.gradient_checkpointing:
        kinds.append(("gradient checkpointing", [("--gradient-checkpointing", replace(s, gradient_checkpointing=True))]))
    kinds.append(("smaller micro-batch", [
        (f"--batch-size {b} with {s.batch_size // b} gradient-accumulation steps (same global batch)",
         replace(s, batch_size=b)) for b in _halvings(s.batch_size)]))
    if ranked(s.method):
        kinds.append(("smaller rank", [(f"--r {r}", replace(s, r=r)) for r in _halvings(s.r)]))
    if OPTIMIZERS[s.optimizer] > OPTIMIZERS["adamw8bit"]:
        kinds.append(("8-bit optimizer", [("--optimizer adamw8bit", replace(s, optimizer="adamw8bit"))]))
    if not quantized_base(s.method):
        kinds.append(("QLoRA", [(f"--method qlora (r={s.r})", replace(s, method="qlora", num_gpus=1))]))
    return kinds


def fixes(est: Estimate, gpu: GPU) -> list[dict]:
    """The single changes that make a setup that does not fit `gpu` fit it, best (smallest total) first: for
    the micro-batch and the rank, the mildest step that fits. Empty when the setup already fits."""
    if fit(est.total, gpu) != "no":
        return []
    found = []
    for kind, steps in _candidates(est.settings):
        for change, settings in steps:
            total = estimate(est.shape, settings).total
            if fit(total, gpu) != "no":
                found.append({"kind": kind, "change": change, "total_gib": round(total / GIB, 2),
                              "saving_gib": round((est.total - total) / GIB, 2), "fit": fit(total, gpu)})
                break
    return sorted(found, key=lambda f: f["total_gib"])


def _one(name: str) -> str:
    return name if name.startswith("the ") else "one " + name


def fixes_text(est: Estimate, gpu: GPU) -> list[str]:
    """Lines for the text report: each fix with its new total and saving, or why none is listed."""
    if fit(est.total, gpu) != "no":
        return []
    found = fixes(est, gpu)
    head = f"{est.total / GIB:.1f} GiB does not fit {_one(gpu.name)} ({gpu.memory_gib:g} GiB)"
    if not found:
        return [f"{head}; no single change makes it fit (combine them, or shard across GPUs)."]
    lines = [f"{head}; each of these changes alone makes it fit, best first:"]
    for f in found:
        lines.append(f"  {f['total_gib']:>8.2f} GiB  (saves {f['saving_gib']:.2f} GiB, {f['fit']})  {f['change']}")
    return lines
