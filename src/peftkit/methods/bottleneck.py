"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021): a small residual MLP on a module's output.

    h' = h + up(act(down(h)))        down: hidden -> hidden // reduction_factor, up: back; up starts at zero

The layer WRAPS a targeted module (kept as `.base`, like LoraLayer) and adapts its output (element 0 of a
tuple output, as attention blocks return). Houlsby: an adapter after the attention block and one after the
feed-forward block of every layer; Pfeiffer: the second only. DEFAULT_TARGETS are the blocks' last projections:
in transformers' Llama family `o_proj` / `down_proj` are the last operations of `self_attn` / `mlp`, so their
outputs ARE the blocks' outputs, bit for bit; wrapping the linears (not the blocks) leaves every other module's
path where it was (LoRA on q/v, base checkpoint names) and gives the size from `out_features`. In GPT-2 the
block's residual dropout follows `c_proj`, so the adapter runs before it (identical at inference). Any module
can be targeted (a list or a regex, LoRA's rules) if its output's last dimension is the model's hidden size.

Active adapters run one after another in the given order (AdapterHub's "Stack"); `per_row` gives each row its
own. The non-linearity means an adapter cannot be merged into the base weights: `merge` refuses. Parameters are
`<module path>.bottleneck.<adapter>.{down,up}.{weight,bias}`; files drop the adapter name (bottleneck_io).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..inject import _replace, check_name, configs, mark_trainable, wrappers
from ..targeting import adaptable_kind, matches, named_modules_outside_wrappers

VARIANTS = ("houlsby", "pfeiffer")
NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

_LLAMA = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)}
# By `model.config.model_type`: the last projection of the attention block and of the feed-forward block.
DEFAULT_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "phi3": _LLAMA,
    "gpt2": {"houlsby": ("attn.c_proj", "mlp.c_proj"), "pfeiffer": ("mlp.c_proj",)},
}


@dataclass(frozen=True)
class BottleneckConfig:
    """A bottleneck adapter. target_modules: a list of module names (an entry matches a name equal to it or
    ending with "." + entry) or a regex that must fullmatch the name; None picks DEFAULT_TARGETS[variant]."""

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
        elif isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                problems.append(f"target_modules {self.target_modules!r} is not a valid regex: {err}")
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


def bottleneck_dim(size: int, reduction_factor: float) -> int:
    return int(size // reduction_factor)


class Bottleneck(nn.Module):
    """One adapter's weights: down (dim x size), up (size x dim), both with biases. forward gives the delta."""

    def __init__(self, size: int, dim: int, non_linearity: str, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(size, dim, device=device, dtype=dtype)
        self.up = nn.Linear(dim, size, device=device, dtype=dtype)
        self.non_linearity = non_linearity

    @torch.no_grad()
    def reset(self) -> None:
        """down: nn.Linear's kaiming-uniform, zero bias; up: all zero, so the delta starts exactly 0."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)

    def forward(self, h: Tensor) -> Tensor:
        return self.up(NON_LINEARITIES[self.non_linearity](self.down(h)))  # (B, T, dim) -> (B, T, size)


def _param_like(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the base; adapters train in fp32 over a half-precision or quantized base (as LoRA's)."""
    for t in (*base.parameters(), *base.buffers()):
        dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
        return t.device, dtype
    return torch.device("cpu"), torch.float32


class BottleneckLayer(nn.Module):
    """Wraps one module; holds any number of named bottleneck adapters applied to its output."""

    peftkit_wrapper = True
    mergeable = False

    def __init__(self, base: nn.Module, size: int, path: str = "") -> None:
        super().__init__()
        self.base = base
        self.size = size  # last dimension of the base's output, the hidden size
        self.path = path  # for error messages
        self.bottleneck = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.pending: tuple[str, ...] = ()  # active and present here: what forward applies, in order
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # set by peftkit.per_row for mixed batches
        self._refresh()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "base" and "bottleneck" in self._modules:  # a replaced base must be the one called
            self._refresh()

    # --- the wrapper protocol (peftkit.adapters) ---------------------------------------------------
    def add_adapter(self, name: str, reduction_factor: float, non_linearity: str, init: bool = True) -> None:
        if name in self.bottleneck:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        device, dtype = _param_like(self.base)
        adapter = Bottleneck(self.size, bottleneck_dim(self.size, reduction_factor), non_linearity, device, dtype)
        if init:
            adapter.reset()
        self.bottleneck[name] = adapter

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.bottleneck[name].parameters())

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active = tuple(names)
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self._refresh()

    def set_rows(self, rows: list[str | None] | None) -> None:
        self.row_adapters = rows
        self._refresh()

    def _refresh(self) -> None:
        self.pending = tuple(n for n in self.active if n in self.bottleneck)
        # With nothing to apply, calls go straight to the base's forward (no extra frame), as in LoraLayer.
        if (self.disabled or not self.pending) and self.row_adapters is None:
            self.__dict__["forward"] = self.base.forward
        else:
            self.__dict__.pop("forward", None)

    def delete_adapter(self, name: str) -> None:
        del self.bottleneck[name]
        self.set_active(tuple(n for n in self.active if n != name))

    def adapter_names(self) -> list[str]:
        return list(self.bottleneck.keys())

    def merge(self, name: str) -> None:
        raise ValueError(_cannot_merge([name]))

    # --- forward ----------------------------------------------------------------------------------
    def _split(self, out) -> tuple[Tensor, tuple | None]:
        """(hidden states, the rest of a tuple output or None), checking they fit the adapter."""
        rest = None
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            out, rest = out[0], out[1:]
        if not isinstance(out, Tensor):
            raise TypeError(f"bottleneck adapter on {self.path!r}: the module returned {type(out).__name__}, not a "
                            "tensor (or a tuple starting with one); target a module whose output is the hidden states")
        if out.shape[-1] != self.size:
            raise ValueError(f"bottleneck adapter on {self.path!r}: the module's output has shape {tuple(out.shape)}, "
                             f"but the adapter needs the hidden size {self.size} last; target hidden-state outputs")
        return out, rest

    def _apply(self, h: Tensor, name: str) -> Tensor:
        adapter = self.bottleneck[name]
        return h + adapter(h.to(adapter.up.weight.dtype)).to(h.dtype)  # (B, T, size)

    def forward(self, *args, **kwargs):  # blocks are often called with keywords only (hidden_states=...)
        out = self.base(*args, **kwargs)
        if self.disabled:
            return out
        h, rest = self._split(out)
        if self.row_adapters is not None:
            h = self._forward_rows(h)
        else:
            for name in self.pending:
                h = self._apply(h, name)
        return h if rest is None else (h, *rest)

    def _forward_rows(self, h: Tensor) -> Tensor:
        """One batch whose row i uses adapter row_adapters[i] (None, or one not placed here: unchanged)."""
        rows = self.row_adapters
        if len(rows) != h.shape[0]:
            raise ValueError(f"per_row got {len(rows)} adapter names for a batch of {h.shape[0]} rows")
        for name in dict.fromkeys(n for n in rows if n is not None and n in self.bottleneck):
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=h.device)
            part = h.index_select(0, idx)  # (b, T, size)
            h = h.index_copy(0, idx, self._apply(part, name))
        return h

    def extra_repr(self) -> str:
        dims = {n: a.down.out_features for n, a in self.bottleneck.items()}
        return f"size={self.size}, bottleneck_dims={dims}, active={list(self.active)}"


# --- where adapters go ------------------------------------------------------------------------------
def hidden_size(model: nn.Module) -> int | None:
    """The model's hidden size from its config (transformers' hidden_size / n_embd / d_model), else None."""
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


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
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type][variant]
    raise ValueError(f"target_modules is None and there is no {variant} default for model type {model_type!r} "
                     f"(defaults exist for {', '.join(DEFAULT_TARGETS)}); pass target_modules=[...]: the modules "
                     "after whose outputs an adapter goes, e.g. the attention and MLP output projections")


def select_bottleneck_targets(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, nn.Module, int]]:
    """(path, module, output size) for every module the config places an adapter after. Raises, naming every
    offending module, before anything changes."""
    targets = config.target_modules if config.target_modules is not None else default_bottleneck_targets(
        model, config.variant)
    hidden = hidden_size(model)
    selected: list[tuple[str, nn.Module, int]] = []
    problems: list[str] = []
    for path, module in named_modules_outside_wrappers(model):
        if not matches(targets, path):
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


# --- inject / unload --------------------------------------------------------------------------------
def inject_bottleneck(model: nn.Module, config: BottleneckConfig, name: str = "default", *,
                      init: bool = True) -> nn.Module:
    """Add bottleneck adapter `name` to `model` in place and make it the one active, trainable adapter.
    Everything else is frozen. `init=False` skips the initialisation (the loader fills the weights)."""
    check_name(name)
    if name in configs(model):
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")
    if not isinstance(config, BottleneckConfig):
        raise TypeError(f"inject_bottleneck expects a BottleneckConfig, got {type(config).__name__}")
    for path, module, size in select_bottleneck_targets(model, config):  # raises before anything changes
        layer = module if isinstance(module, BottleneckLayer) else BottleneckLayer(module, size, path)
        layer.add_adapter(name, config.reduction_factor, config.non_linearity, init=init)
        if layer is not module:
            _replace(model, path, layer)
    configs(model)[name] = config
    from ..adapters import set_active

    set_active(model, [name])
    mark_trainable(model, name)  # asks every wrapper for the adapter's parameters
    return model


def bottleneck_layers(model: nn.Module) -> Iterator[tuple[str, BottleneckLayer]]:
    """Every BottleneckLayer in the model, with its module path."""
    for path, w in wrappers(model):
        if isinstance(w, BottleneckLayer):
            yield path, w


def _cannot_merge(names: list[str]) -> str:
    return (f"bottleneck adapters {names} cannot be merged into the base weights: the non-linearity between "
            "their down- and up-projection means no change of the wrapped module's weights computes the same. "
            "Keep them unmerged (they cost one small MLP per wrapped module), or train LoRA when a merged, "
            "zero-latency model is needed")


def merge_check(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Raise if any of `names` (default: every adapter in the model) is a bottleneck adapter; peftkit.merge
    calls this before merging anything."""
    names = list(configs(model)) if names is None else [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if isinstance(configs(model).get(n), BottleneckConfig)]
    if bad:
        raise ValueError(_cannot_merge(bad))


def unload_bottleneck(model: nn.Module) -> nn.Module:
    """Put every module wrapped by a BottleneckLayer back and forget the bottleneck adapters; other
    methods' adapters stay. The model then computes what it did before any bottleneck was added."""
    for path, w in list(bottleneck_layers(model)):
        _replace(model, path, w.base)
    cfgs = configs(model)
    for name in [n for n, c in cfgs.items() if isinstance(c, BottleneckConfig)]:
        del cfgs[name]
    if not cfgs:
        model.__dict__.pop("peftkit_configs", None)
    return model
