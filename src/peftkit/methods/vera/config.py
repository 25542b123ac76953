"""VeRA's frozen config and its adapter_config.json form (peft_type "VERA", HF PEFT's VeraConfig fields)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ...patterns import pattern_problems
from ...targeting import as_tuple

PEFT_TYPE = "VERA"
BIAS_CHOICES = ("none", "all", "vera_only")
SEED_RANGE = (-0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class VeraConfig:
    """VeRA (Kopiczko et al. 2024): one pair of frozen random matrices shared by every adapted layer, and per
    layer two trained vectors that scale them:  y = W x + lambda_b * (B_l (lambda_d * (A_l x))).

    vera_A (r, max in_features) and vera_B (max out_features, r) are drawn once per adapter from
    `projection_prng_key` exactly as HF PEFT draws them; layer l uses the top-left slices A_l = vera_A[:, :in] and
    B_l = vera_B[:out, :]. lambda_d (r,) starts at d_initial and lambda_b (out,) at zero: a new adapter is an exact
    no-op. save_projection=True writes vera_A / vera_B into the file; False writes only the vectors (the loader
    draws the matrices again from the key). init_weights=False starts lambda_b at ones and lambda_d at random
    (tests). target_modules: LoRA's rules (a list entry matches a name equal to it or ending with "." + entry; a
    string is a regex that must fullmatch the name; "all-linear"); None: PEFT's VeRA defaults for the
    architecture. r is usually far larger than a LoRA rank (PEFT's default is 256): only r + out trains per layer.
    """

    r: int = 256
    target_modules: tuple[str, ...] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False  # informational: each layer's kind (Linear or Conv1D) decides its layout
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    init_weights: bool = True
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    peft_type = PEFT_TYPE
    exclude_modules = None  # PEFT's VeraConfig has no exclude_modules; the shared targeting reads it

    def __post_init__(self) -> None:
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", as_tuple(self.target_modules))
        for attr in ("modules_to_save", "layers_to_transform", "layers_pattern"):
            object.__setattr__(self, attr, as_tuple(getattr(self, attr)))
        self._validate()

    def _validate(self) -> None:
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or not SEED_RANGE[0] <= key <= SEED_RANGE[1]:
            problems.append(f"projection_prng_key must be an integer seed (a torch.Generator seed), got {key!r}")
        if not isinstance(self.vera_dropout, (int, float)) or not 0.0 <= float(self.vera_dropout) < 1.0:
            problems.append(f"vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        if not isinstance(self.d_initial, (int, float)) or not math.isfinite(self.d_initial):
            problems.append(f"d_initial must be a finite number, got {self.d_initial!r}")
        for attr in ("save_projection", "init_weights"):
            if not isinstance(getattr(self, attr), bool):
                problems.append(f"{attr} must be true or false, got {getattr(self, attr)!r}")
        if self.bias not in BIAS_CHOICES:
            problems.append(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        elif self.bias != "none":
            problems.append(f"bias={self.bias!r} is not supported for VeRA adapters yet (trained biases of the base "
                            "layers); use bias='none', or train LoRA with bias='lora_only'")
        if self.modules_to_save:
            problems.append(f"modules_to_save={list(self.modules_to_save)} is not supported for VeRA adapters yet "
                            "(no trained copies of whole modules); leave it unset, or train LoRA with it")
        if self.layers_pattern and self.layers_to_transform is None:
            problems.append("layers_pattern is set but layers_to_transform is not (HF PEFT requires both); "
                            "name the layer indices in layers_to_transform")
        if self.target_modules == ():
            problems.append("target_modules is empty; name the modules to adapt, or None for the defaults")
        problems += pattern_problems(self.regexes())
        if problems:
            raise ValueError("invalid VeraConfig: " + "; ".join(problems))

    def regexes(self) -> list[tuple[str, str]]:
        """(field, pattern) for every regex this config holds (untrusted when it came from a file)."""
        found = [("layers_pattern", p) for p in self.layers_pattern or ()]
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            found.append(("target_modules", self.target_modules))
        return found

    # --- PEFT's adapter_config.json ----------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return d | {"peft_type": self.peft_type, "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> VeraConfig:
        """Build a config from adapter_config.json; keys we do not know are ignored (newer PEFT adds fields),
        keys whose value we cannot honour raise instead of being dropped."""
        if data.get("peft_type") != PEFT_TYPE:
            raise ValueError(f"adapter_config.json has peft_type {data.get('peft_type')!r}; this reads 'VERA'")
        if data.get("exclude_modules") not in (None, [], ""):
            raise ValueError(f"adapter_config.json sets exclude_modules={data['exclude_modules']!r}, which VeRA "
                             "configs do not have (HF PEFT's VeraConfig neither); list the targets instead")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("layers_to_transform"), int):
            kwargs["layers_to_transform"] = [kwargs["layers_to_transform"]]
        return cls(**kwargs)

    def replace(self, **changes: Any) -> VeraConfig:
        return replace(self, **changes)

    def describe(self) -> str:
        """One line for peftkit.summary."""
        targets = ("the architecture's default" if self.target_modules is None else self.target_modules
                   if isinstance(self.target_modules, str) else list(self.target_modules))
        return (f"VeRA r={self.r} on {targets}, projection key {self.projection_prng_key} "
                f"({'saved' if self.save_projection else 'not saved'} with the adapter)")
