"""Where IA3 vectors go: the architecture's defaults, then peftkit.targeting's rules (PEFT's), checked before
anything changes."""

from __future__ import annotations

import copy

from torch import nn

from ...hf.arch import IA3_DEFAULT_TARGETS, ia3_defaults, model_type
from ...patterns import matcher_for
from ...targeting import adaptable_kind, own_base, select_targets
from .config import IA3Config
from .layer import IA3Layer


def resolved(model: nn.Module, config: IA3Config) -> IA3Config:
    """The config with target_modules / feedforward_modules that are None filled in from the architecture's
    table (PEFT's, which fills them in after its checks too); raises, naming the model type, when one is None
    and the table has no entry. The copy shares the config's pattern budget."""
    if config.target_modules is not None and config.feedforward_modules is not None:
        return config
    defaults = ia3_defaults(model)
    if defaults is None:
        missing = [f for f in ("target_modules", "feedforward_modules") if getattr(config, f) is None]
        raise ValueError(f"{' and '.join(missing)} is None and there is no IA3 default for model type "
                         f"{model_type(model)!r} (defaults exist for {', '.join(IA3_DEFAULT_TARGETS)}); pass "
                         "target_modules=[...] and feedforward_modules=[...] (the targets whose input is scaled; "
                         "[] for none)")
    targets, feedforward = defaults
    matcher_for(config)  # made before the copy, so that both share it
    full = copy.copy(config)  # not replace(): PEFT checks only the user's own lists against each other
    for attr, default in (("target_modules", targets), ("feedforward_modules", feedforward)):
        if getattr(config, attr) is None:
            object.__setattr__(full, attr, default)
    return full


def select_ia3_targets(model: nn.Module, config: IA3Config) -> list[tuple[str, nn.Module, str, bool]]:
    """(path, module or its IA3Layer, kind, scales the input) for every module the config adapts. `config`
    must be resolved. Raises, naming every offending module, before anything changes."""
    found = select_targets(model, config)  # its own IA3 layers are judged by the modules they wrap
    matcher = matcher_for(config)
    selected, problems = [], []
    for path, module in found:
        kind = adaptable_kind(own_base(module, config))
        what = f"{path} ({type(module).__name__})"
        if getattr(module, "peftkit_wrapper", False) and not isinstance(module, IA3Layer):
            problems.append(f"{what} is already wrapped by another peftkit adapter; one module cannot carry both")
        elif kind not in ("linear", "conv1d"):
            problems.append(f"{what}: IA3 scales linear layers (nn.Linear, Conv1D) only")
        else:
            selected.append((path, module, kind, config.is_feedforward(path, matcher)))
    if problems:
        raise ValueError(f"target_modules {config.target_modules!r} selects modules IA3 cannot adapt:\n  "
                         + "\n  ".join(problems))
    return selected
