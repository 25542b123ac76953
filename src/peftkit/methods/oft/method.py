"""OFT as a registered method: how a config becomes layers, files and training options."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor, nn

from ... import hf
from ...files import PREFIX
from ...record import replace_module
from ...registry import Expected
from ...targeting import default_targets, target_spec
from . import io, plan
from .config import NEUMANN_FORM_VERSION, PEFT_TYPE, OFTConfig
from .layer import OFTLayer, adapter_settings, rotated_width
from .targets import select_oft_targets


def _warn_moved(config: OFTConfig, moved: dict[str, str]) -> None:
    """PEFT moves an r / oft_block_size that does not divide a layer's width to the nearest one that does, and
    warns; so do we, once per inject, naming the layers."""
    if not moved:
        return
    asked = f"r={config.r}" if config.r else f"oft_block_size={config.oft_block_size}"
    shown = "; ".join(f"{path}: {layout}" for path, layout in list(moved.items())[:6])
    more = f" (and {len(moved) - 6} more)" if len(moved) > 6 else ""
    warnings.warn(f"OFT {asked} does not divide the width of {len(moved)} layer(s), moved as HF PEFT moves it "
                  f"(blocks x size): {shown}{more}; choose a divisor of the layers' widths to avoid it", stacklevel=4)


class OFTMethod:
    """peft_type OFT: a trained block-diagonal orthogonal rotation of each adapted layer's input (an embedding's
    output); merges into the base weights."""

    peft_type = PEFT_TYPE
    config_class = OFTConfig
    train_names = ("oft",)
    train_help = {"oft": "orthogonal finetuning, a block-diagonal Cayley rotation of each layer's input (OFT; --r is "
                         "the block size, e.g. 16 or 32)"}
    merge_refusal = None
    file_key_prefix = PREFIX
    ranked = True  # --r (the block size) sizes it: the planner's and sweep's rank candidates
    nf4_train_names = ()
    plan = plan

    def read_config(self, data: dict[str, Any]) -> OFTConfig:
        return OFTConfig.from_peft_dict(data)

    def inject(self, model: nn.Module, config: OFTConfig, name: str, init: bool) -> None:
        targets = select_oft_targets(model, config)  # raises before anything changes
        moved: dict[str, str] = {}
        for path, module, kind in targets:
            width = rotated_width(getattr(module, "base", module), kind)
            settings = adapter_settings(config, width)
            if (settings.blocks if config.r else settings.block_size) != (config.r or config.oft_block_size):
                moved[path] = f"{settings.blocks} x {settings.block_size} over {width}"
            layer = module if isinstance(module, OFTLayer) else OFTLayer(module, kind, path)
            layer.add_adapter(name, settings, init=config.init_weights if init else True)
            if layer is not module:
                replace_module(model, path, layer)
        _warn_moved(config, moved)

    def extra_trainable(self, model: nn.Module, name: str, config: OFTConfig) -> list[nn.Parameter]:
        return []  # bias training is refused by the config

    def state_dict(self, model: nn.Module, name: str, config: OFTConfig) -> dict[str, Tensor]:
        return io.state_dict(model, name)

    def expected(self, model: nn.Module, config: OFTConfig) -> Expected:
        return io.expected(model, config)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        io.load_tensors(model, name, tensors)

    def file_config(self, model: nn.Module, name: str, config: OFTConfig) -> dict[str, Any]:
        """As PEFT writes it: target_modules None resolved to the architecture's defaults, and the PEFT version
        whose Cayley-Neumann series the file holds (so that PEFT does not warn that it is an older one)."""
        extra: dict[str, Any] = {}
        if config.target_modules is None:
            extra["target_modules"] = default_targets(model)
        if config.base_model_name_or_path is None:
            extra["base_model_name_or_path"] = hf.name_or_path(model)
        return config.replace(**extra).to_peft_dict() | {"peft_version": NEUMANN_FORM_VERSION}

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        return nullcontext()  # no fused nodes: the model's own forward

    def config_from_options(self, o: Any) -> OFTConfig:
        """--r is OFT's block size (oft_block_size; r, the block count, follows from each layer's width), and
        --target-modules its targets (all-linear by default)."""
        if o.r < 2:
            raise ValueError(f"--r {o.r} is OFT's block size, and a block of {o.r} has no trainable parameter; "
                             "use 2 or more (e.g. 16 or 32)")
        return OFTConfig(r=0, oft_block_size=o.r, target_modules=target_spec(o.target_modules))

    def describe_options(self, o: Any) -> str:
        return f"oft block size {o.r} on {o.target_modules}"

    def describe(self, config: OFTConfig) -> str:
        return config.describe()


METHOD = OFTMethod()
