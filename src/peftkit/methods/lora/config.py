"""LoRA's frozen configuration object and its PEFT `adapter_config.json` form.

A config travels as a whole: the layer reads its rank and scaling from it, the checkpoint writes it,
the loader rebuilds it. Field names are HF PEFT's, so a PEFT user's config carries over unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ...patterns import Matcher, matcher_for, pattern_problems
from ...targeting import as_tuple

INIT_CHOICES = (True, False, "gaussian", "pissa")
# initialisations that change the base weights (PEFT's; "pissa" with a full SVD is rebuilt on load instead)
BASE_CHANGING_INITS = ("olora", "corda", "loftq")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA: W x + (alpha / r) * B A x, with A (r x in) and B (out x r) trained and W frozen.
    use_dora=True: DoRA, a trained magnitude per output feature times the direction of W + (alpha / r) B A.

    target_modules: a list of module names (an entry matches a name that equals it or ends with
    "." + entry), a regex string that must fullmatch the module name, or "all-linear" (every linear
    layer except the output head). None picks a default for known model types (see targeting.py).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    peft_type = "LORA"

    def __post_init__(self) -> None:
        # Lists become tuples so the config is hashable and cannot be changed behind a layer's back.
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", as_tuple(self.target_modules))
        if not isinstance(self.exclude_modules, str):
            object.__setattr__(self, "exclude_modules", as_tuple(self.exclude_modules))
        object.__setattr__(self, "modules_to_save", as_tuple(self.modules_to_save))
        object.__setattr__(self, "layers_to_transform", as_tuple(self.layers_to_transform))
        object.__setattr__(self, "layers_pattern", as_tuple(self.layers_pattern))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        self._validate()

    def _validate(self) -> None:
        problems = []
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            problems.append(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_CHOICES:
            problems.append(f"init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}")
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                problems.append(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")
        problems += pattern_problems(self.regexes())
        if problems:
            raise ValueError("invalid LoraConfig: " + "; ".join(problems))

    def regexes(self) -> list[tuple[str, str]]:
        """(field, pattern) for every regex this config holds: untrusted when it came from a file, so each is
        checked here and matched through a bounded Matcher (peftkit.patterns)."""
        found = [(f"{attr} key", key) for attr in ("rank_pattern", "alpha_pattern") for key in getattr(self, attr)]
        found += [("layers_pattern", p) for p in self.layers_pattern or ()]
        found += [(attr, value) for attr, value in (("target_modules", self.target_modules),
                                                    ("exclude_modules", self.exclude_modules))
                  if isinstance(value, str) and value != "all-linear"]
        return found

    # --- per-module values -------------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """The rank for one module: the first rank_pattern key whose regex ends the name, else r."""
        key = _pattern_key(self.rank_pattern, module_name, matcher_for(self), "rank_pattern key")
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name, matcher_for(self), "alpha_pattern key")
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- PEFT's adapter_config.json ----------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The dict HF PEFT writes to adapter_config.json (and reads back)."""
        d = asdict(self)
        for key in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform",
                    "layers_pattern"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        d["peft_type"] = self.peft_type
        d["inference_mode"] = True
        d["lora_bias"] = False
        return d

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build a config from adapter_config.json. Keys we do not know are ignored (newer PEFT versions
        add fields freely); keys whose value we cannot honour raise instead of being dropped."""
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"adapter_config.json has peft_type {peft_type!r}; this loader reads 'LORA'")
        known = {f.name for f in fields(cls)}
        bad = [f"{k}={data[k]!r}"[:200] for k, default in UNSUPPORTED_OPTIONS.items()
               if k in data and data[k] not in (default, None, False, [], {}, "")]
        if bad:
            raise ValueError("adapter_config.json uses options peftkit does not support yet: " + ", ".join(bad)
                             + "; they change the adapter's outputs, so it is not loaded without them (load it "
                             "with HF PEFT, or retrain without them)")
        kwargs = {k: v for k, v in data.items() if k in known}
        init = kwargs.get("init_lora_weights")
        if isinstance(init, str) and (init in BASE_CHANGING_INITS or init.startswith("pissa_niter_")):
            raise ValueError(
                f"adapter_config.json has init_lora_weights={init!r}: the adapter trained on a base that this "
                "initialisation changed (a residual of the weights), which the file does not hold, so on the "
                "original model it would give wrong outputs. Convert it to a plain LoRA file first: in HF PEFT, "
                "save it with save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter as "
                "saved right after initialisation>), which writes an adapter (rank 2r) for the untouched base")
        if isinstance(init, str) and init not in INIT_CHOICES:
            kwargs["init_lora_weights"] = True  # weights come from the file; the init scheme is moot
        if isinstance(kwargs.get("layers_to_transform"), int):
            kwargs["layers_to_transform"] = [kwargs["layers_to_transform"]]
        return cls(**kwargs)

    def replace(self, **changes: Any) -> LoraConfig:
        return replace(self, **changes)


# PEFT LoRA options that change what the adapter computes and that peftkit does not implement, with the value
# that means "off": a file setting one is refused, naming it, instead of loading into something else.
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "lora_bias": False, "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
    "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": None, "kasa_config": None,
    "use_kasa": False, "velora_config": None, "monteclora_config": None, "arrow_config": None,
}


def _pattern_key(patterns: dict[str, Any], module_name: str, matcher: Matcher, what: str) -> str | None:
    """PEFT's rule: a pattern key applies when `(.*\\.)?(key)$` matches the module name (through the config's
    bounded matcher: the keys may come from an untrusted file)."""
    for key in patterns:
        if matcher.groups(key, module_name, what, rf"(.*\.)?({key})$") is not None:
            return key
    return None
