"""IA3's frozen config and its adapter_config.json form (peft_type "IA3", HF PEFT's IA3Config fields)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ...patterns import Matcher, pattern_problems
from ...targeting import as_tuple

# PEFT's IA3Config has no layers_to_transform / layers_pattern: they are written only when set (PEFT then
# warns, ignores them and adapts every layer, with a vector of ones, a no-op, where the file has none)
PEFT_LACKS = ("layers_to_transform", "layers_pattern")


def ends_with_regex(entries: tuple[str, ...]) -> str:
    """The regex that fullmatches exactly the names ending with one of `entries` (PEFT's feedforward list rule)."""
    return ".*(?:" + "|".join(map(re.escape, entries)) + ")"


@dataclass(frozen=True)
class IA3Config:
    """(IA)^3 (Liu et al. 2022): one learned vector per adapted linear layer. A target's OUTPUT is scaled,
    y = base(x) * l; a target in feedforward_modules has its INPUT scaled instead, y = base(x * l).

    target_modules / exclude_modules: LoRA's rules (a list entry matches a name equal to it or ending with
    "." + entry; a string is a regex that must fullmatch the name; "all-linear"). feedforward_modules: as PEFT
    reads it, a regex that must fullmatch the module name, or a list whose entries a name must END with (no
    "." boundary). None (either): the architecture's defaults (peftkit.hf.arch.IA3_DEFAULT_TARGETS).
    init_ia3_weights=True starts every vector at ones, an exact no-op; False draws them at random (tests).
    """

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False  # informational: each layer's kind (Linear or Conv1D) decides its layout
    modules_to_save: tuple[str, ...] | None = None
    init_ia3_weights: bool = True
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    peft_type = "IA3"

    def __post_init__(self) -> None:
        for attr in ("target_modules", "exclude_modules", "feedforward_modules"):
            if not isinstance(getattr(self, attr), str):
                object.__setattr__(self, attr, as_tuple(getattr(self, attr)))
        for attr in ("modules_to_save", "layers_to_transform", "layers_pattern"):
            object.__setattr__(self, attr, as_tuple(getattr(self, attr)))
        self._validate()

    def _validate(self) -> None:
        problems = []
        if self.modules_to_save:
            problems.append(f"modules_to_save={list(self.modules_to_save)} is not supported for IA3 adapters yet "
                            "(no trained copies of whole modules); leave it unset, or train LoRA with it")
        if not isinstance(self.init_ia3_weights, bool):
            problems.append(f"init_ia3_weights must be true or false, got {self.init_ia3_weights!r}")
        if self.feedforward_modules == "all-linear":
            problems.append("feedforward_modules='all-linear' is not a module pattern; name the feed-forward "
                            "modules (e.g. ['down_proj']) or leave it None for the architecture's default")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            problems.append(f"feedforward_modules must be a subset of target_modules (as in HF PEFT); "
                            f"{sorted(set(ff) - set(targets))} are not in target_modules {list(targets)}")
        problems += pattern_problems(self.regexes())
        if problems:
            raise ValueError("invalid IA3Config: " + "; ".join(problems))

    def regexes(self) -> list[tuple[str, str]]:
        """(field, pattern) for every regex this config holds (untrusted when it came from a file)."""
        found = [("layers_pattern", p) for p in self.layers_pattern or ()]
        found += [(attr, value) for attr in ("target_modules", "exclude_modules", "feedforward_modules")
                  if isinstance(value := getattr(self, attr), str) and value != "all-linear"]
        return found

    def is_feedforward(self, path: str, matcher: Matcher) -> bool:
        """Whether module `path` has its input scaled: PEFT's rule (a regex fullmatches the path; a list entry
        ends it). Call on a config whose feedforward_modules is resolved (not None)."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return matcher.fullmatch(ff, path, "feedforward_modules")
        return any(path.endswith(entry) for entry in ff or ())

    # --- PEFT's adapter_config.json ----------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        for key in PEFT_LACKS:
            if d[key] is None:
                del d[key]
        return d | {"peft_type": self.peft_type, "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> IA3Config:
        """Build a config from adapter_config.json; keys we do not know are ignored (newer PEFT adds fields)."""
        if data.get("peft_type") != "IA3":
            raise ValueError(f"adapter_config.json has peft_type {data.get('peft_type')!r}; this reads 'IA3'")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        ff, targets = kwargs.get("feedforward_modules"), kwargs.get("target_modules")
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            kwargs["feedforward_modules"] = ends_with_regex(tuple(ff))  # PEFT writes such files (all-linear
            # expanded to module paths, feedforward names kept) and cannot read them back; the regex reads the same
        if isinstance(kwargs.get("layers_to_transform"), int):
            kwargs["layers_to_transform"] = [kwargs["layers_to_transform"]]
        return cls(**kwargs)

    def replace(self, **changes: Any) -> IA3Config:
        return replace(self, **changes)

    def describe(self) -> str:
        """One line for peftkit.summary."""
        def shown(value):
            return "the architecture's default" if value is None else value if isinstance(value, str) else list(value)
        return f"IA3 on {shown(self.target_modules)}, feedforward {shown(self.feedforward_modules)}"
