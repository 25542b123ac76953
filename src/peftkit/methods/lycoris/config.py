"""LoHa's and LoKr's frozen configs and their adapter_config.json form (peft_type "LOHA" / "LOKR", the field names
of HF PEFT's LoHaConfig and LoKrConfig). The two share every field but LoKr's three; the shared checks and the
file reading are functions here, used by both classes."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ...patterns import Matcher, matcher_for, pattern_problems
from ...targeting import as_tuple

# PeftConfig's bookkeeping: read and dropped (or rewritten on saving), never part of the math
METADATA = ("peft_type", "inference_mode", "revision", "peft_version", "auto_mapping")
# options newer PEFT versions may add to every method's config; a file that sets one is refused, naming it
UNSUPPORTED = ("layer_replication", "target_parameters", "trainable_token_indices", "modules_to_tie")
LOKR_INITS = (True, False, "lycoris")


def _common_problems(c: Any, inits: tuple) -> list[str]:
    problems = []
    if isinstance(c.r, bool) or not isinstance(c.r, int) or c.r <= 0:
        problems.append(f"r must be a positive integer, got {c.r!r}")
    if isinstance(c.alpha, bool) or not isinstance(c.alpha, (int, float)):
        problems.append(f"alpha must be a number, got {c.alpha!r}")
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            problems.append(f"{name} must be in [0, 1), got {value!r}")
    if not isinstance(c.use_effective_conv2d, bool):
        problems.append(f"use_effective_conv2d must be true or false, got {c.use_effective_conv2d!r}")
    if not any(c.init_weights is i or (isinstance(i, str) and c.init_weights == i) for i in inits):
        problems.append(f"init_weights must be one of {list(inits)}, got {c.init_weights!r}")
    for key, rank in c.rank_pattern.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            problems.append(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
    for key, alpha in c.alpha_pattern.items():
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            problems.append(f"alpha_pattern[{key!r}] must be a number, got {alpha!r}")
    if c.modules_to_save:
        problems.append(f"modules_to_save={list(c.modules_to_save)} is not supported for {c.peft_type} adapters yet "
                        "(no trained copies of whole modules); leave it unset, or train LoRA with it")
    if c.layers_pattern and c.layers_to_transform is None:
        problems.append("layers_pattern is set but layers_to_transform is not; give both (as HF PEFT requires)")
    return problems + pattern_problems(_regexes(c))


def _warn_ignored(c: Any) -> None:
    """HF PEFT's LoHa/LoKr silently adapt every layer when target_modules is a regex, whatever layers_to_transform
    says (its LoRA refuses the pair); peftkit selects as PEFT does, so that files agree, and says so."""
    if isinstance(c.target_modules, str) and c.target_modules != "all-linear" and c.layers_to_transform is not None:
        warnings.warn(f"{c.peft_type}: layers_to_transform={list(c.layers_to_transform)} has no effect with a regex "
                      f"target_modules ({c.target_modules!r}), as in HF PEFT; put the layer numbers into the regex "
                      "instead, or list module names", stacklevel=4)


def _regexes(c: Any) -> list[tuple[str, str]]:
    """(field, pattern) for every regex a config holds (untrusted when it came from a file)."""
    found = [(f"{attr} key", key) for attr in ("rank_pattern", "alpha_pattern") for key in getattr(c, attr)]
    found += [("layers_pattern", p) for p in c.layers_pattern or ()]
    found += [(attr, value) for attr in ("target_modules", "exclude_modules")
              if isinstance(value := getattr(c, attr), str) and value != "all-linear"]
    return found


def _normalize(c: Any) -> None:
    """Lists become tuples (hashable, frozen); pattern dicts become plain dicts."""
    for attr in ("target_modules", "exclude_modules"):
        if not isinstance(getattr(c, attr), str):
            object.__setattr__(c, attr, as_tuple(getattr(c, attr)))
    for attr in ("modules_to_save", "layers_to_transform", "layers_pattern"):
        object.__setattr__(c, attr, as_tuple(getattr(c, attr)))
    for attr in ("rank_pattern", "alpha_pattern"):
        object.__setattr__(c, attr, dict(getattr(c, attr) or {}))


def pattern_value(patterns: dict[str, Any], path: str, matcher: Matcher, what: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key whose regex `(.*\\.)?(key)$` matches the module
    path at its start (through the config's bounded matcher), else `default`."""
    for key, value in patterns.items():
        if matcher.groups(key, path, what, rf"(.*\.)?({key})$") is not None:
            return value
    return default


def _to_peft_dict(c: Any) -> dict[str, Any]:
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(c).items()}
    return d | {"peft_type": c.peft_type, "inference_mode": True}


def _from_peft_dict(cls: type, data: dict[str, Any]) -> Any:
    """A config from adapter_config.json. An option that would change the math and that peftkit cannot honour is
    refused, naming it; a key this version does not know is ignored with a warning naming it."""
    if data.get("peft_type") != cls.peft_type:
        raise ValueError(f"adapter_config.json has peft_type {data.get('peft_type')!r}; this reads {cls.peft_type!r}")
    known = {f.name for f in fields(cls)}
    bad = [f"{k}={data[k]!r}" for k in UNSUPPORTED if data.get(k) not in (None, False, [], {})]
    if bad:
        raise ValueError(f"adapter_config.json uses {cls.peft_type} options peftkit does not support yet: "
                         f"{', '.join(bad)}; the adapter would compute something else here, so it is not loaded")
    unknown = sorted(k for k, v in data.items()
                     if k not in known and k not in METADATA and k not in UNSUPPORTED and v not in (None, False, [], {}))
    if unknown:
        warnings.warn(f"adapter_config.json ({cls.peft_type}) has settings this peftkit version does not know: "
                      f"{', '.join(unknown)}; they are ignored", stacklevel=3)
    kwargs = {k: v for k, v in data.items() if k in known}
    if isinstance(kwargs.get("layers_to_transform"), int):
        kwargs["layers_to_transform"] = [kwargs["layers_to_transform"]]
    if isinstance(kwargs.get("layers_pattern"), str):
        kwargs["layers_pattern"] = [kwargs["layers_pattern"]]
    return cls(**kwargs)


def _describe(c: Any, name: str, extra: str = "") -> str:
    targets = c.target_modules if isinstance(c.target_modules, str) or c.target_modules is None else list(c.target_modules)
    return f"{name} r={c.r} alpha={c.alpha}{extra} on {targets if targets is not None else 'the default targets'}"


class _LycorisConfig:
    """What LoHa's and LoKr's configs share beyond their fields: per-module rank and alpha, the file form."""

    def rank_for(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, matcher_for(self), "rank_pattern key", self.r)

    def alpha_for(self, path: str) -> float:
        return pattern_value(self.alpha_pattern, path, matcher_for(self), "alpha_pattern key", self.alpha)

    def regexes(self) -> list[tuple[str, str]]:
        return _regexes(self)

    def to_peft_dict(self) -> dict[str, Any]:
        return _to_peft_dict(self)

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> Any:
        return _from_peft_dict(cls, data)

    def replace(self, **changes: Any) -> Any:
        return replace(self, **changes)


@dataclass(frozen=True)
class LoHaConfig(_LycorisConfig):
    """LoHa (FedPara, Hyeon-Woo et al. 2022; LyCORIS): W x + delta x with delta = (w1_a w1_b) * (w2_a w2_b) *
    alpha / r, the Hadamard product of two rank-r products (rank up to r^2 for 2 r (in + out) parameters).

    Layers: nn.Linear (also a 4-bit NF4 base), nn.Conv2d and nn.Conv1d; use_effective_conv2d=True decomposes a
    k x k kernel with CP cores (hada_t1, hada_t2). target_modules / exclude_modules follow LoRA's rules (list
    entries match a name or its "."-suffix, a string is a fullmatch regex, "all-linear"); None: PEFT's default
    table for the model type. init_weights=True starts w2_b at zero (output unchanged); False draws every factor
    at random. rank_dropout drops whole output rows of delta in training (rescaled by the kept share);
    module_dropout skips the whole adapter for a training step with that probability.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    init_weights: bool = True
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    peft_type = "LOHA"

    def __post_init__(self) -> None:
        _normalize(self)
        _warn_ignored(self)
        problems = _common_problems(self, (True, False))
        if problems:
            raise ValueError("invalid LoHaConfig: " + "; ".join(problems))

    def describe(self) -> str:
        return _describe(self, "LoHa")


@dataclass(frozen=True)
class LoKrConfig(_LycorisConfig):
    """LoKr (LyCORIS; Yeh et al. 2024): W x + delta x with delta = kron(w1, w2) * alpha / r, where out = a * b and
    in = c * d are split near their square roots (decompose_factor > 0: one side that factor) and w1 (a, c),
    w2 (b, d) are full matrices or rank-r products: w2 when r < max(b, d) / 2, w1 too with decompose_both when
    r < max(a, c) / 2 (HF PEFT's rules, shapes.lokr_split).

    Layers, targeting, rank_dropout and module_dropout as LoHaConfig; rank_dropout_scale=True rescales the kept
    rows by the kept share (PEFT's default False leaves them). init_weights=True starts w1 (or w1_a) at zero;
    "lycoris" starts w2 (or w2_b) at zero instead; False draws every factor at random.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    peft_type = "LOKR"

    def __post_init__(self) -> None:
        _normalize(self)
        _warn_ignored(self)
        problems = _common_problems(self, LOKR_INITS)
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or (factor != -1 and factor <= 0):
            problems.append(f"decompose_factor must be -1 (split near the square root) or a positive integer, "
                            f"got {factor!r}")
        if problems:
            raise ValueError("invalid LoKrConfig: " + "; ".join(problems))

    def describe(self) -> str:
        return _describe(self, "LoKr", " decompose_both" if self.decompose_both else "")

