"""OFT's frozen config and its adapter_config.json form (peft_type "OFT", the field names of HF PEFT's OFTConfig)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ...patterns import pattern_problems
from ...targeting import as_tuple

PEFT_TYPE = "OFT"
BIAS_CHOICES = ("none", "all", "oft_only")
MAX_NEUMANN_TERMS = 64  # each term is one batched matmul per layer and forward: bounds what a file can ask for
# PeftConfig's bookkeeping: read and dropped (or rewritten on saving), never part of the math
METADATA = ("peft_type", "inference_mode", "revision", "peft_version", "auto_mapping")
# options newer PEFT versions may add to every method's config; a file that sets one is refused, naming it
UNSUPPORTED = ("layer_replication", "target_parameters", "trainable_token_indices", "modules_to_tie")
# HF PEFT 0.18 changed the Cayley-Neumann series (rotation.neumann is the new one); PEFT warns on a Neumann file
# whose peft_version is older or missing, so files written here say which form they hold
NEUMANN_FORM_VERSION = "0.18.0"


def older_neumann_form(data: dict[str, Any]) -> bool:
    """Whether an adapter_config.json of a Neumann adapter was written by PEFT older than 0.18 (another series)."""
    version = str(data.get("peft_version") or "").partition("@")[0]
    if not data.get("use_cayley_neumann") or not version:
        return False
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return parts < (0, 18)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class OFTConfig:
    """OFT (Qiu et al. 2023; Liu et al. 2024's Cayley-Neumann form): each adapted layer's input is rotated by a
    block-diagonal orthogonal matrix R before the frozen weight sees it, y = W (x R) (an embedding's output is
    rotated instead), so the angles between the weight's neurons are kept.

    Each of the r blocks (b x b, r * b = in_features) is R_i = (I - Q_i)(I + Q_i)^-1 (Cayley) of a skew-symmetric
    Q_i made from b(b-1)/2 trained numbers; use_cayley_neumann=True replaces the inverse by
    num_cayley_neumann_terms terms of its Neumann series (HF PEFT's default, cheaper, nearly orthogonal). Give r
    (blocks per layer) OR oft_block_size (b), the other 0; a value that does not divide a layer's width is
    moved to the nearest one that does, with a warning, as HF PEFT moves it. block_share=True trains one block
    shared by all r positions. coft=True (constrained OFT) keeps each Q_i within Frobenius norm eps / sqrt(rows)
    of zero, projecting the stored parameter in place at every forward, as PEFT does. module_dropout replaces
    that share of a layer's blocks by the identity in training (the multiplicative dropout PEFT documents).

    init_weights=True starts every Q at zero (R = I: the output is unchanged); False draws N(0, 0.1) (tests).
    Layers: nn.Linear (also a 4-bit NF4 base), nn.Conv2d with a 1x1 kernel, nn.Embedding. target_modules /
    exclude_modules follow LoRA's rules (list entries match a name or its "."-suffix, a string is a fullmatch
    regex, "all-linear"); None: PEFT's default table for the model type (LoRA's).
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False  # informational: OFT adapts no layer stored (in, out) (HF PEFT's neither)
    bias: str = "none"
    exclude_modules: tuple[str, ...] | str | None = None
    init_weights: bool = True
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    peft_type = PEFT_TYPE

    def __post_init__(self) -> None:
        for attr in ("target_modules", "exclude_modules"):
            if not isinstance(getattr(self, attr), str):
                object.__setattr__(self, attr, as_tuple(getattr(self, attr)))
        for attr in ("modules_to_save", "layers_to_transform", "layers_pattern"):
            object.__setattr__(self, attr, as_tuple(getattr(self, attr)))
        problems = self._problems() + self._unsupported()
        if problems:
            raise ValueError("invalid OFTConfig: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        for attr in ("r", "oft_block_size"):
            if not _is_int(getattr(self, attr)) or getattr(self, attr) < 0:
                problems.append(f"{attr} must be a whole number >= 0, got {getattr(self, attr)!r}")
        if not problems and (self.r == 0) == (self.oft_block_size == 0):
            problems.append(f"give exactly one of r (blocks per layer) and oft_block_size (the block width), the "
                            f"other 0 (r x oft_block_size = in_features); got r={self.r}, "
                            f"oft_block_size={self.oft_block_size}")
        value = self.module_dropout
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            problems.append(f"module_dropout must be in [0, 1), got {value!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (
                math.isfinite(self.eps) and self.eps >= 0):
            problems.append(f"eps must be a finite number >= 0 (COFT's radius), got {self.eps!r}")
        terms = self.num_cayley_neumann_terms
        if not _is_int(terms) or not 1 <= terms <= MAX_NEUMANN_TERMS:
            problems.append(f"num_cayley_neumann_terms must be a whole number in [1, {MAX_NEUMANN_TERMS}], got "
                            f"{terms!r}")
        for attr in ("coft", "block_share", "use_cayley_neumann", "init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, attr), bool):
                problems.append(f"{attr} must be true or false, got {getattr(self, attr)!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            problems.append("layers_pattern is set but layers_to_transform is not (HF PEFT requires both); "
                            "name the layer indices in layers_to_transform")
        if self.target_modules == ():
            problems.append("target_modules is empty; name the modules to adapt, or None for the defaults")
        return problems + pattern_problems(self.regexes())

    def _unsupported(self) -> list[str]:
        problems = []
        if self.bias not in BIAS_CHOICES:
            problems.append(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        elif self.bias != "none":
            problems.append(f"bias={self.bias!r} is not supported for OFT adapters yet (trained biases of the base "
                            "layers); use bias='none', or train LoRA with bias='lora_only'")
        if self.modules_to_save:
            problems.append(f"modules_to_save={list(self.modules_to_save)} is not supported for OFT adapters yet "
                            "(no trained copies of whole modules); leave it unset, or train LoRA with it")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear" and self.layers_to_transform:
            problems.append(f"layers_to_transform={list(self.layers_to_transform)} with a regex target_modules "
                            f"({self.target_modules!r}): HF PEFT then ignores layers_to_transform, which would "
                            "surprise; put the layer numbers into the regex, or list module names")
        return problems

    def regexes(self) -> list[tuple[str, str]]:
        """(field, pattern) for every regex this config holds (untrusted when it came from a file)."""
        found = [("layers_pattern", p) for p in self.layers_pattern or ()]
        found += [(attr, value) for attr in ("target_modules", "exclude_modules")
                  if isinstance(value := getattr(self, attr), str) and value != "all-linear"]
        return found

    # --- PEFT's adapter_config.json ----------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return d | {"peft_type": self.peft_type, "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> OFTConfig:
        """A config from adapter_config.json. An option peftkit cannot honour is refused, naming it; a key this
        version does not know is ignored with a warning naming it."""
        if data.get("peft_type") != PEFT_TYPE:
            raise ValueError(f"adapter_config.json has peft_type {data.get('peft_type')!r}; this reads 'OFT'")
        if "oft_block_size" not in data:
            raise ValueError("adapter_config.json of peft_type OFT has no oft_block_size: it was written by HF PEFT "
                             "older than 0.14, whose OFT computes something else (PEFT refuses it too); retrain "
                             "the adapter with a current version")
        bad = [f"{k}={data[k]!r}" for k in UNSUPPORTED if data.get(k) not in (None, False, [], {})]
        if bad:
            raise ValueError(f"adapter_config.json uses OFT options peftkit does not support yet: {', '.join(bad)}; "
                             "the adapter would compute something else here, so it is not loaded")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k, v in data.items() if k not in known and k not in METADATA
                         and k not in UNSUPPORTED and v not in (None, False, [], {}))
        if unknown:
            warnings.warn(f"adapter_config.json (OFT) has settings this peftkit version does not know: "
                          f"{', '.join(unknown)}; they are ignored", stacklevel=3)
        if older_neumann_form(data):
            warnings.warn(f"adapter_config.json (OFT) was written by HF PEFT {data['peft_version']}, whose "
                          "Cayley-Neumann series PEFT 0.18 changed; it is read with the new series (as PEFT reads "
                          "it), so its outputs differ a little from the ones it was trained with; retrain it to be "
                          "exact", stacklevel=3)
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("layers_to_transform"), int):
            kwargs["layers_to_transform"] = [kwargs["layers_to_transform"]]
        if isinstance(kwargs.get("layers_pattern"), str):
            kwargs["layers_pattern"] = [kwargs["layers_pattern"]]
        return cls(**kwargs)

    def replace(self, **changes: Any) -> OFTConfig:
        return replace(self, **changes)

    def describe(self) -> str:
        """One line for peftkit.summary."""
        targets = ("the architecture's default" if self.target_modules is None else self.target_modules
                   if isinstance(self.target_modules, str) else list(self.target_modules))
        size = f"r={self.r} blocks" if self.r else f"block size {self.oft_block_size}"
        form = f"Cayley-Neumann ({self.num_cayley_neumann_terms} terms)" if self.use_cayley_neumann else "Cayley"
        extras = "".join([", COFT eps=%g" % self.eps if self.coft else "", ", shared block" if self.block_share else ""])
        return f"OFT {size}, {form}{extras} on {targets}"
