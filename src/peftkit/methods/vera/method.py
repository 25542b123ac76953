"""VeRA as a registered method: how a config becomes layers, files and training options."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor, nn

from ... import hf
from ...record import configs, replace_module
from ...registry import Expected
from ...targeting import target_spec
from ...weights import adapter_dtype, base_device
from . import io, plan
from .config import PEFT_TYPE, VeraConfig
from .layer import VeraLayer, vera_layers
from .projection import VeraProjections, draw
from .targets import base_of, largest_shape, resolved, select_vera_targets


def model_projections(model: nn.Module) -> VeraProjections:
    """The VeraProjections every VeRA layer of the model shares (a new one when it has none yet)."""
    found = next((layer.projections for _, layer in vera_layers(model)), None)
    return VeraProjections() if found is None else found


class VeraMethod:
    """peft_type VERA: frozen shared random projections, two trained scaling vectors per adapted linear layer;
    merges into the base weights."""

    peft_type = PEFT_TYPE
    config_class = VeraConfig
    train_names = ("vera",)
    train_help = {"vera": "shared frozen random projections with trained scaling vectors (VeRA; use a large "
                          "--r such as 256; its default --lr is 25x LoRA's)"}
    # scaling vectors train at a high rate: on the built-in task, r 256, 5e-2 (25x) reached 94% exact match, 1e-2
    # 0%; 25x LoRA's 2e-4 is 5e-3, near the 4e-3 of VeRA's paper for instruction tuning
    lr_scales = {"vera": 25.0}
    merge_refusal = None
    file_key_prefix = ""  # whole keys: the shared projections sit under base_model., not base_model.model. (io.py)
    ranked = True  # has a rank and target layers (the planner's and sweep's rank candidates)
    nf4_train_names = ()
    plan = plan

    def read_config(self, data: dict[str, Any]) -> VeraConfig:
        return VeraConfig.from_peft_dict(data)

    def inject(self, model: nn.Module, config: VeraConfig, name: str, init: bool) -> None:
        """Draw adapter `name`'s projections from its key (sized by its largest target), then wrap its targets."""
        targets = select_vera_targets(model, resolved(model, config))  # raises before anything changes
        max_in, max_out = largest_shape(targets)
        first = base_of(targets[0][1])
        vera_a, vera_b = draw(config.projection_prng_key, config.r, max_in, max_out)
        device, dtype = base_device(first), adapter_dtype(first)
        projections = model_projections(model)
        projections.add(name, vera_a.to(device, dtype), vera_b.to(device, dtype))
        for path, module, kind in targets:
            layer = module if isinstance(module, VeraLayer) else VeraLayer(module, kind, projections, path)
            layer.add_adapter(name, config.r, config.vera_dropout, config.d_initial,
                              init=config.init_weights if init else True)
            if layer is not module:
                replace_module(model, path, layer)

    def extra_trainable(self, model: nn.Module, name: str, config: VeraConfig) -> list[nn.Parameter]:
        return []  # bias training is refused by the config

    def state_dict(self, model: nn.Module, name: str, config: VeraConfig) -> dict[str, Tensor]:
        return io.state_dict(model, name, config)

    def expected(self, model: nn.Module, config: VeraConfig) -> Expected:
        return io.expected(model, config)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        io.load_tensors(model, name, tensors, configs(model)[name])

    def file_config(self, model: nn.Module, name: str, config: VeraConfig) -> dict[str, Any]:
        """As PEFT writes it: the default targets resolved, fan_in_fan_out true over Conv1D layers."""
        config = resolved(model, config)
        kinds = {layer.kind for _, layer in vera_layers(model) if name in layer.vera_lambda_b}
        extra: dict[str, Any] = {"fan_in_fan_out": "conv1d" in kinds}
        if config.base_model_name_or_path is None:
            extra["base_model_name_or_path"] = hf.name_or_path(model)
        return config.replace(**extra).to_peft_dict()

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        return nullcontext()  # no fused nodes: the model's own forward

    def config_from_options(self, o: Any) -> VeraConfig:
        """--r is VeRA's r, --target-modules its targets (all-linear by default: one projection pair sized by the
        largest linear layer), --lora-dropout its vera_dropout."""
        return VeraConfig(r=o.r, target_modules=target_spec(o.target_modules), vera_dropout=o.lora_dropout)

    def describe_options(self, o: Any) -> str:
        return f"vera r={o.r} on {o.target_modules}"

    def describe(self, config: VeraConfig) -> str:
        return config.describe()


METHOD = VeraMethod()
