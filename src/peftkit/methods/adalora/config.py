"""AdaLoRA's frozen config and its adapter_config.json form (peft_type "ADALORA", HF PEFT's AdaLoraConfig
fields: LoRA's, plus the rank budget schedule)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ...patterns import pattern_problems
from ...targeting import as_tuple

PEFT_TYPE = "ADALORA"
# options of PEFT's LoraConfig that AdaLoRA files may carry but peftkit cannot honour (key -> harmless values)
UNSUPPORTED = {"use_dora": (False, None), "modules_to_save": (None, []), "bias": ("none",),
               "layer_replication": (None,), "loftq_config": ({}, None), "use_rslora": (False, None),
               "lora_bias": (False, None), "target_parameters": (None, []), "trainable_token_indices": (None,)}


@dataclass(frozen=True)
class AdaLoraConfig:
    """AdaLoRA (Zhang et al. 2023): LoRA in SVD form, delta W = B diag(E) A * lora_alpha / init_r, whose rank
    budget shrinks during training from init_r per layer to target_r on average. The allocator scores each
    singular triplet (A row, E entry, B column) by its smoothed sensitivity |w * grad| (EMA beta1) times its
    uncertainty (EMA beta2) and zeroes the E entries of the least important, every deltaT steps, on a cubic
    schedule between step tinit and total_step - tfinal; the loss gains orth_reg_weight times the mean
    ||P P^T - I||_F of every A and B (they should stay orthogonal, like singular vectors).

    total_step: the run's optimizer steps (PEFT requires it); None lets `peftkit train` fill in its own total.
    rank_pattern: what the allocator kept, {"<module path>.lora_E": [True, False, ...] (init_r entries)}; a file
    holds only the kept triplets, and loading makes each layer that many ranks (PEFT's format).
    target_modules / exclude_modules: LoRA's rules (a list entry equals a name or ends it after "."; a string
    is a regex that must fullmatch; "all-linear"); None: LoRA's defaults for the architecture.
    init_lora_weights=True: A, B ~ N(0, 0.02), E = 0 (an exact no-op, PEFT's init); False also draws E (tests).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    r: int = 8  # LoRA's field: AdaLoRA ignores it (init_r is the starting rank); written for PEFT's loader
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    init_lora_weights: bool = True
    fan_in_fan_out: bool = False  # informational: each layer's kind (Linear or Conv1D) decides its layout
    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    peft_type = PEFT_TYPE

    def __post_init__(self) -> None:
        for attr in ("target_modules", "exclude_modules"):
            if not isinstance(getattr(self, attr), str):
                object.__setattr__(self, attr, as_tuple(getattr(self, attr)))
        for attr in ("modules_to_save", "layers_to_transform", "layers_pattern"):
            object.__setattr__(self, attr, as_tuple(getattr(self, attr)))
        if self.rank_pattern:
            object.__setattr__(self, "rank_pattern", {k: [bool(b) for b in v] if isinstance(v, (list, tuple)) else v
                                                      for k, v in self.rank_pattern.items()})
        else:
            object.__setattr__(self, "rank_pattern", None)
        self._validate()

    def _validate(self) -> None:
        problems = []
        for attr in ("init_r", "deltaT"):
            if not _whole(getattr(self, attr)) or getattr(self, attr) <= 0:
                problems.append(f"{attr} must be a positive integer, got {getattr(self, attr)!r}")
        for attr in ("target_r", "tinit", "tfinal"):
            if not _whole(getattr(self, attr)) or getattr(self, attr) < 0:
                problems.append(f"{attr} must be a whole number >= 0, got {getattr(self, attr)!r}")
        if not problems and self.target_r > self.init_r:
            problems.append(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): the budget only "
                            "shrinks")
        for attr in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, attr)) < 1.0:
                problems.append(f"{attr} must be in (0, 1), got {getattr(self, attr)!r}")
        if float(self.orth_reg_weight) < 0:
            problems.append(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None and (not _whole(self.total_step) or self.total_step <= 0):
            problems.append(f"total_step must be a positive integer (or None: the trainer's own), got "
                            f"{self.total_step!r}")
        elif self.total_step is not None and not problems and self.tinit >= self.total_step - self.tfinal:
            problems.append(f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no "
                            "budgeting phase (tinit must be < total_step - tfinal); lower tinit or tfinal")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.init_lora_weights, bool):
            problems.append(f"init_lora_weights must be true or false, got {self.init_lora_weights!r}")
        if self.modules_to_save:
            problems.append(f"modules_to_save={list(self.modules_to_save)} is not supported for AdaLoRA adapters "
                            "yet; leave it unset, or train LoRA with it")
        problems += self._rank_pattern_problems()
        problems += pattern_problems(self.regexes())
        if problems:
            raise ValueError("invalid AdaLoraConfig: " + "; ".join(problems))

    def _rank_pattern_problems(self) -> list[str]:
        bad = [k for k, v in (self.rank_pattern or {}).items()
               if not (isinstance(k, str) and k.endswith(".lora_E") and isinstance(v, list) and len(v) == self.init_r)]
        if not bad:
            return []
        return [f"rank_pattern entries must map '<module path>.lora_E' to a list of init_r={self.init_r} true/false "
                f"values (PEFT's format); these do not: {bad[:8]}"]

    def regexes(self) -> list[tuple[str, str]]:
        """(field, pattern) for every regex this config holds (untrusted when it came from a file)."""
        found = [("layers_pattern", p) for p in self.layers_pattern or ()]
        found += [(attr, value) for attr in ("target_modules", "exclude_modules")
                  if isinstance(value := getattr(self, attr), str) and value != "all-linear"]
        return found

    # --- per-module values -------------------------------------------------------------------------
    def kept(self, path: str) -> list[bool] | None:
        """The rank_pattern entry of module `path` (None: every one of its init_r triplets)."""
        return (self.rank_pattern or {}).get(f"{path}.lora_E")

    def loaded_rank(self, path: str) -> int:
        """The rank module `path` has in a file of this config: the triplets its rank_pattern keeps, else init_r."""
        kept = self.kept(path)
        return self.init_r if kept is None else sum(kept)

    def final_ranks(self) -> dict[str, int]:
        """Module path -> the rank the allocator left it (its rank_pattern's kept triplets); {} before any."""
        return {key.removesuffix(".lora_E"): sum(kept) for key, kept in (self.rank_pattern or {}).items()}

    def with_total(self, total_steps: int) -> AdaLoraConfig:
        """The config with total_step set to a run's total when it is None (what `peftkit train` does)."""
        return self if self.total_step is not None else replace(self, total_step=total_steps)

    # --- PEFT's adapter_config.json ----------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if d["total_step"] is None:  # PEFT requires one; an adapter that never trained has no schedule to keep
            d["total_step"] = self.tinit + self.tfinal + 1
        return d | {"peft_type": self.peft_type, "inference_mode": True, "bias": "none", "use_dora": False,
                    "use_rslora": False}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> AdaLoraConfig:
        """Build a config from adapter_config.json; unknown keys are ignored (newer PEFT adds fields), options
        peftkit cannot honour raise."""
        if data.get("peft_type") != PEFT_TYPE:
            raise ValueError(f"adapter_config.json has peft_type {data.get('peft_type')!r}; this reads {PEFT_TYPE!r}")
        bad = [f"{k}={data[k]!r}" for k, fine in UNSUPPORTED.items() if k in data and data[k] not in fine
               and not (isinstance(data[k], (list, dict)) and not data[k])]
        if bad:
            raise ValueError("adapter_config.json uses AdaLoRA options peftkit does not support yet: " + ", ".join(bad))
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("layers_to_transform"), int):
            kwargs["layers_to_transform"] = [kwargs["layers_to_transform"]]
        if not isinstance(kwargs.get("init_lora_weights", True), bool):
            kwargs["init_lora_weights"] = True  # the weights come from the file; the init scheme is moot
        return cls(**kwargs)

    def replace(self, **changes: Any) -> AdaLoraConfig:
        return replace(self, **changes)

    def describe(self) -> str:
        kept = "" if not self.rank_pattern else f", {sum(map(sum, self.rank_pattern.values()))} ranks kept"
        return (f"AdaLoRA init_r={self.init_r} -> target_r={self.target_r} alpha={self.lora_alpha}, "
                f"steps {self.tinit}..{self.total_step}-{self.tfinal} every {self.deltaT}{kept}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
