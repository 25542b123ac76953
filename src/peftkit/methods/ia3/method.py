"""IA3 as a registered method: how a config becomes layers, files and training options."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor, nn

from ... import hf
from ...files import PREFIX
from ...record import replace_module
from ...registry import Expected
from ...targeting import target_spec
from . import io, plan
from .config import IA3Config, ends_with_regex
from .layer import IA3Layer, ia3_layers
from .targets import resolved, select_ia3_targets


class IA3Method:
    """peft_type IA3: a learned vector scaling each adapted linear layer's output (or, for feed-forward
    modules, its input); merges into the base weights."""

    peft_type = "IA3"
    config_class = IA3Config
    train_names = ("ia3",)
    train_help = {"ia3": "learned scaling vectors on keys, values and the feed-forward input (IA3; its default "
                         "--lr is 15x LoRA's)"}
    # scaling vectors around 1 need a higher rate than LoRA's factors: on the built-in task 3e-2 (15x) reached 90%
    # exact match, 1e-2 45%; 15x LoRA's 2e-4 is T-Few's 3e-3
    lr_scales = {"ia3": 15.0}
    merge_refusal = None
    file_key_prefix = PREFIX
    ranked = False  # no rank: the planner's and sweep's rank candidates leave it out
    nf4_train_names = ()
    plan = plan

    def read_config(self, data: dict[str, Any]) -> IA3Config:
        return IA3Config.from_peft_dict(data)

    def inject(self, model: nn.Module, config: IA3Config, name: str, init: bool) -> None:
        targets = select_ia3_targets(model, resolved(model, config))  # raises before anything changes
        for path, module, kind, feedforward in targets:
            layer = module if isinstance(module, IA3Layer) else IA3Layer(module, kind, path)
            layer.add_adapter(name, feedforward, init=config.init_ia3_weights if init else True)
            if layer is not module:
                replace_module(model, path, layer)

    def extra_trainable(self, model: nn.Module, name: str, config: IA3Config) -> list[nn.Parameter]:
        return []

    def state_dict(self, model: nn.Module, name: str, config: IA3Config) -> dict[str, Tensor]:
        return io.state_dict(model, name)

    def expected(self, model: nn.Module, config: IA3Config) -> Expected:
        return io.expected(model, config)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        io.load_tensors(model, name, tensors)

    def file_config(self, model: nn.Module, name: str, config: IA3Config) -> dict[str, Any]:
        """As PEFT writes it: the targets and feedforward modules resolved, fan_in_fan_out true over Conv1D.
        init_ia3_weights is written true: the file's vectors are the adapter, and a reader that adapts more
        layers than the file fills (PEFT ignores layers_to_transform) then starts those at ones, a no-op."""
        config = resolved(model, config)
        layers = [(path, layer) for path, layer in ia3_layers(model) if name in layer.ia3_l]
        scales_input = {path: layer.feedforward[name] for path, layer in layers}
        extra: dict[str, Any] = {"fan_in_fan_out": any(layer.kind == "conv1d" for _, layer in layers),
                                 "init_ia3_weights": True,
                                 "feedforward_modules": peft_feedforward(config, scales_input)}
        if config.base_model_name_or_path is None:
            extra["base_model_name_or_path"] = hf.name_or_path(model)
        return config.replace(**extra).to_peft_dict()

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        return nullcontext()  # no fused nodes: the model's own forward

    def config_from_options(self, o: Any) -> IA3Config:
        """--target-modules all-linear (the default) means IA3's defaults for the architecture (PEFT's table);
        anything else names the targets, and the table still says which of them are feed-forward."""
        return IA3Config(target_modules=None if o.target_modules == "all-linear" else target_spec(o.target_modules))

    def describe_options(self, o: Any) -> str:
        on = "the architecture's default targets" if o.target_modules == "all-linear" else o.target_modules
        return f"ia3 on {on}"

    def describe(self, config: IA3Config) -> str:
        return config.describe()


def peft_feedforward(config: IA3Config, scales_input: dict[str, bool]) -> tuple[str, ...] | str:
    """feedforward_modules in a form HF PEFT accepts and reads to the same layers (`scales_input`: adapted
    path -> whether its input is scaled). PEFT requires a list to be a subset of a list of target_modules; a
    list that is not (the default down_proj with targets q_proj,v_proj) keeps its entries that are targets
    when they still pick the same layers, or else becomes the regex fullmatching what the entries end."""
    ff, targets = config.feedforward_modules, config.target_modules
    if isinstance(ff, str) or not isinstance(targets, tuple) or set(ff) <= set(targets):
        return ff
    kept = tuple(e for e in ff if e in targets)
    if all(any(path.endswith(e) for e in kept) == flag for path, flag in scales_input.items()):
        return kept
    return ends_with_regex(ff)


METHOD = IA3Method()
