"""Where AdaLoRA layers go: peftkit.targeting's rules (PEFT's; LoRA's defaults for target_modules=None, which
are PEFT's AdaLoRA defaults for the decoder models peftkit trains), linear layers only, checked before
anything changes."""

from __future__ import annotations

from torch import nn

from ...targeting import adaptable_kind, own_base, select_targets
from .config import AdaLoraConfig
from .layer import AdaLoraLayer


def select_adalora_targets(model: nn.Module, config: AdaLoraConfig) -> list[tuple[str, nn.Module, str]]:
    """(path, module or its AdaLoraLayer, kind) for every module the config adapts. Raises, naming every
    offending module, before anything changes."""
    selected, problems = [], []
    for path, module in select_targets(model, config):  # its own layers are judged by the modules they wrap
        kind = adaptable_kind(own_base(module, config))
        what = f"{path} ({type(module).__name__})"
        if getattr(module, "peftkit_wrapper", False) and not isinstance(module, AdaLoraLayer):
            problems.append(f"{what} is already wrapped by another peftkit adapter; one module cannot carry both")
        elif kind not in ("linear", "conv1d"):
            problems.append(f"{what}: AdaLoRA adapts linear layers (nn.Linear, Conv1D) only")
        else:
            selected.append((path, module, kind))
    if problems:
        raise ValueError(f"target_modules {config.target_modules!r} selects modules AdaLoRA cannot adapt:\n  "
                         + "\n  ".join(problems))
    return selected
