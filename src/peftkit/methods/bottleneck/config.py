"""The bottleneck adapter's frozen config and its adapter_config.json form."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch.nn.functional as F

from ...patterns import pattern_problems

VARIANTS = ("houlsby", "pfeiffer")
NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

@dataclass(frozen=True)
class BottleneckConfig:
    """A bottleneck adapter. target_modules: a list of module names (an entry matches a name equal to it or
    ending with "." + entry) or a regex that must fullmatch the name; None picks the variant's default for the architecture (peftkit.hf.BOTTLENECK_DEFAULT_TARGETS)."""

    variant: str = "houlsby"
    reduction_factor: int | float = 16
    non_linearity: str = "relu"
    target_modules: tuple[str, ...] | str | None = None
    peft_type: str = "BOTTLENECK"
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple, set, frozenset)):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.non_linearity not in NON_LINEARITIES:
            problems.append(f"non_linearity must be one of {tuple(NON_LINEARITIES)}, got {self.non_linearity!r}")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0 or not math.isfinite(rf):
            problems.append(f"reduction_factor must be a positive number, got {rf!r}")
        if self.peft_type != "BOTTLENECK":
            problems.append(f"peft_type must be 'BOTTLENECK', got {self.peft_type!r}")
        if self.target_modules == "all-linear":
            problems.append("target_modules='all-linear' is a LoRA option; name the modules whose outputs get an "
                            "adapter (e.g. ['o_proj', 'down_proj']) or leave it None for the variant's default")
        elif isinstance(self.target_modules, str):  # untrusted when it came from a file: checked before any match
            problems += pattern_problems([("target_modules", self.target_modules)])
        if problems:
            raise ValueError("invalid BottleneckConfig: " + "; ".join(problems))

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json dict (peft_type "BOTTLENECK")."""
        d = asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        d["inference_mode"] = True
        return d

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> BottleneckConfig:
        """Build a config from adapter_config.json; keys we do not know are ignored."""
        if data.get("peft_type") != "BOTTLENECK":
            raise ValueError(f"adapter_config.json has peft_type {data.get('peft_type')!r}; this reads 'BOTTLENECK'")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> BottleneckConfig:
        return replace(self, **changes)

    def describe(self) -> str:
        """One line for peftkit.summary."""
        return f"bottleneck {self.variant}, reduction_factor={self.reduction_factor}, {self.non_linearity}"
