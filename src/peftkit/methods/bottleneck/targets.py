"""Where bottleneck adapters go: the modules whose outputs they adapt, checked before anything changes."""

from __future__ import annotations

from torch import nn

from ... import hf
from ...patterns import matcher_for
from ...targeting import adaptable_kind, matches, named_modules_outside_wrappers
from .config import BottleneckConfig
from .layer import BottleneckLayer, bottleneck_dim


def output_size(module: nn.Module, hidden: int | None) -> int | None:
    """Last dimension of the module's output: from a linear's out_features / Conv1D's nf / an embedding's
    dim; for any other module, the model's hidden size (checked when it runs), or None when unknown."""
    kind = adaptable_kind(module)
    if kind == "conv1d":
        return module.nf
    if kind == "embedding":
        return module.embedding_dim
    if kind == "linear":
        return module.out_features if hasattr(module, "out_features") else module.weight.shape[0]
    return hidden


def default_bottleneck_targets(model: nn.Module, variant: str) -> tuple[str, ...]:
    targets = hf.bottleneck_default_targets(model, variant)
    if targets is not None:
        return targets
    raise ValueError(f"target_modules is None and there is no {variant} default for model type "
                     f"{hf.model_type(model)!r} (defaults exist for {', '.join(hf.BOTTLENECK_DEFAULT_TARGETS)}); pass "
                     "target_modules=[...]: the modules after whose outputs an adapter goes, e.g. the attention and "
                     "MLP output projections")


def select_bottleneck_targets(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, nn.Module, int]]:
    """(path, module, output size) for every module the config places an adapter after. Raises, naming every
    offending module, before anything changes."""
    targets = config.target_modules if config.target_modules is not None else default_bottleneck_targets(
        model, config.variant)
    hidden = hf.hidden_size(model)
    selected: list[tuple[str, nn.Module, int]] = []
    problems: list[str] = []
    matcher = matcher_for(config)  # one time budget for the config's regex over every module name
    for path, module in named_modules_outside_wrappers(model):
        if not matches(targets, path, matcher):
            continue
        what = f"{path} ({type(module).__name__})"
        if getattr(module, "peftkit_wrapper", False) and not isinstance(module, BottleneckLayer):
            problems.append(f"{what} is already wrapped by another peftkit adapter; one module cannot carry both")
            continue
        size = output_size(module.base if isinstance(module, BottleneckLayer) else module, hidden)
        if size is None:
            problems.append(f"{what}: its output size is unknown (the model has no config.hidden_size); "
                            "target linear layers, whose out_features give it")
        elif hidden is not None and size != hidden:
            problems.append(f"{what} outputs {size} features, not the model's hidden size {hidden}")
        elif bottleneck_dim(size, config.reduction_factor) < 1:
            problems.append(f"{what}: hidden size {size} // reduction_factor {config.reduction_factor} is 0")
        elif any(path.startswith(p + ".") for p, _, _ in selected):
            parent = next(p for p, _, _ in selected if path.startswith(p + "."))
            problems.append(f"{what} is inside {parent}, which is also matched; an output would be adapted twice")
        else:
            selected.append((path, module, size))
    if problems:
        raise ValueError(f"target_modules {targets!r} selects modules a bottleneck adapter cannot follow:\n  "
                         + "\n  ".join(problems))
    if not selected:
        short = (n.split(".")[-1] for n, _ in named_modules_outside_wrappers(model))
        names = list(dict.fromkeys(n for n in short if not n.isdigit()))[:12]
        raise ValueError(f"target_modules {targets!r} matched no module. Module names in this model include: "
                         f"{', '.join(names)}")
    return selected
