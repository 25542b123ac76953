"""`--dtype auto`: the base model's dtype chosen from what the device runs fast, with the reason.

A 16-bit base halves the weights' and activations' memory, but it is only faster where the hardware has
16-bit matrix units: a CUDA GPU that supports bfloat16 (Ampere and later), or a CPU with AMX (`amx_bf16`) or
AVX-512 BF16 (`avx512_bf16`) instructions. On a CPU without them (AVX2 only, say) torch converts bfloat16 to
float32 and back around every matmul, and a bf16 training step is slower than an fp32 one. So `auto` picks
bfloat16 where those units are present and float32 otherwise, and says why; adapters train in float32 over
a 16-bit base in any case (as PEFT's `autocast_adapter_dtype`).

The decision is a pure function of the facts (`choose_dtype`, testable with any flag set); `resolve_dtype`
reads this machine's facts (/proc/cpuinfo's flags, torch.cuda's bf16 support) and applies it. Nothing here
imports torch at module level (the `peftkit` command reads its options before torch loads).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = ("auto", *DTYPES)
# CPU flags (as /proc/cpuinfo names them) whose presence makes bfloat16 matmuls fast
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# the same for float16 (Sapphire Rapids' AVX512-FP16, Granite Rapids' AMX-FP16)
CPU_FP16_FLAGS = ("amx_fp16", "avx512_fp16")
_CPU_FAST = {"bfloat16": CPU_BF16_FLAGS, "float16": CPU_FP16_FLAGS}
_CPUINFO_MAX_LINES = 100_000  # a machine's first processor block is a few dozen lines; never read a huge file


@dataclass(frozen=True)
class DtypeChoice:
    """The base's dtype ('float32', 'bfloat16' or 'float16') and why it was chosen, for headers and
    summary.json."""

    dtype: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"dtype": self.dtype, "dtype_reason": self.reason}

    def torch_dtype(self) -> Any:
        """The torch.dtype of the choice."""
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        """One line for a command's header."""
        return f"base dtype {self.dtype} ({self.reason})"


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo text (x86 'flags', ARM 'Features'); empty when
    there is no such line."""
    for line in cpuinfo.splitlines()[:_CPUINFO_MAX_LINES]:
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=4)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """This machine's CPU flags, None where they cannot be read (no /proc/cpuinfo: macOS, Windows)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = [line for _, line in zip(range(_CPUINFO_MAX_LINES), f)]
    except OSError:
        return None
    flags = parse_cpu_flags("".join(head))
    return flags or None


def choose_dtype(requested: str, device_type: str, cpu_flags: Iterable[str] | None = None,
                 cuda_bf16: bool = False) -> DtypeChoice:
    """The dtype for `requested` ('auto' or a dtype name) on a device of `device_type` ('cpu', 'cuda', ...),
    given the CPU's flags (None: unknown) and whether the CUDA device runs bfloat16 natively."""
    if requested not in CHOICES:
        raise ValueError(f"dtype {requested!r} is not one of {', '.join(CHOICES)}; use auto to let peftkit choose")
    if requested != "auto":
        slow = device_type == "cpu" and _lacks_units(requested, cpu_flags)
        return DtypeChoice(requested, f"--dtype {requested}" + (
            f"; warning: this CPU has neither {' nor '.join(_CPU_FAST[requested])}, so {requested} matmuls run "
            "many times slower than float32 here (--dtype auto picks float32)" if slow else ""))
    if device_type == "cuda":
        if cuda_bf16:
            return DtypeChoice("bfloat16", "auto: the CUDA device supports bfloat16")
        return DtypeChoice("float32", "auto: the CUDA device has no native bfloat16 (before Ampere)")
    if device_type != "cpu":
        return DtypeChoice("float32", f"auto: bfloat16 speed on {device_type!r} devices is not verified")
    if cpu_flags is None:
        return DtypeChoice("float32", "auto: the CPU's flags cannot be read (no /proc/cpuinfo)")
    fast = [f for f in CPU_BF16_FLAGS if f in set(cpu_flags)]
    if fast:
        return DtypeChoice("bfloat16", f"auto: the CPU has {' and '.join(fast)}")
    return DtypeChoice("float32", "auto: the CPU has neither amx_bf16 nor avx512_bf16, so bfloat16 matmuls "
                       "would be slower than float32 here")


def _lacks_units(dtype: str, cpu_flags: Iterable[str] | None) -> bool:
    """Whether an x86 CPU with these flags (None: unknown, so not known to lack them) has no matrix units for
    `dtype`'s matmuls (float32 needs none). Only x86 flags are judged: an ARM CPU names its units otherwise
    (bf16, asimdhp), so it is not warned about."""
    wanted = _CPU_FAST.get(dtype)
    if not wanted or cpu_flags is None or "sse2" not in set(cpu_flags):
        return False
    return not set(wanted) & set(cpu_flags)


def default_device() -> str:
    """'cuda' when torch sees a GPU, else 'cpu' (the training default for --device)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_bf16(device: Any) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    index = getattr(device, "index", None)
    with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_dtype(requested: str, device: Any = None) -> DtypeChoice:
    """`choose_dtype` with this machine's facts for `device` (a torch.device or a string such as 'cpu',
    'cuda:1'; default: cuda when available, else cpu)."""
    import torch

    try:
        device = torch.device(device if device is not None else default_device())
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ({err}); use cpu, cuda or cuda:N") from None
    flags = cpu_flags() if device.type == "cpu" else None
    if requested != "auto":
        return choose_dtype(requested, device.type, flags)
    return choose_dtype("auto", device.type, flags, _cuda_bf16(device) if device.type == "cuda" else False)


def machine_facts() -> dict[str, Any]:
    """What `auto` reads on this machine, for benchmark reports: the CPU's bf16-relevant flags (and its
    highest AVX level), the CPU model, and the CUDA device if any."""
    import torch

    flags = cpu_flags() or frozenset()
    model = None
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")[:200_000]
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                     None)
    except OSError:
        pass
    avx = sorted(f for f in flags if f.startswith(("avx", "amx")))
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "cpu_flags": avx, "bf16_flags": [f for f in CPU_BF16_FLAGS if f in flags], "cuda": cuda,
            "auto": resolve_dtype("auto").as_dict()}


def describe_machine() -> str:
    """One line for a benchmark's header: the CPU model, cores, the vector flags that matter for torch's kernels
    (AVX2, AVX-512, AVX512-BF16, AMX), the CUDA device if any."""
    import os

    facts = machine_facts()
    wanted = [f for f in facts["cpu_flags"] if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]
    gpu = f"; cuda: {facts['cuda']}" if facts["cuda"] else ""
    return (f"{facts['cpu'] or '?'}; {os.cpu_count()} cores; flags: {' '.join(wanted) or 'none of avx2/avx512/amx'}"
            f"{gpu}")
