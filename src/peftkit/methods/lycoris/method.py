"""LoHa and LoKr as registered methods: one class, two instances (LOHA_METHOD, LOKR_METHOD), each with its family
(the factors and their maths) and its config class."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor, nn

from ... import hf
from ...files import PREFIX
from ...record import replace_module
from ...registry import Expected
from ...targeting import target_spec
from . import io
from .config import LoHaConfig, LoKrConfig
from .family import LOHA, LOKR, Family
from .layer import LycorisLayer
from .plan import PlanTerms
from .targets import select_lycoris_targets


class LycorisMethod:
    """peft_type LOHA or LOKR: a structured weight update (Hadamard or Kronecker product of small factors) beside
    frozen nn.Linear, nn.Conv2d and nn.Conv1d layers; merges into the base weights."""

    merge_refusal = None
    file_key_prefix = PREFIX
    ranked = True  # has a rank r and target layers (the planner's and sweep's rank candidates)
    nf4_train_names = ()

    def __init__(self, family: Family, config_class: type, train_help: str) -> None:
        self.family = family
        self.peft_type = family.peft_type
        self.config_class = config_class
        self.train_names = (family.peft_type.lower(),)
        self.train_help = {self.train_names[0]: train_help}
        # the default --lr: 5x LoRA's (on the built-in task 1e-2 reached 98% / 97% exact match, LoRA's 2e-3 14% / 26%)
        self.lr_scales = {self.train_names[0]: 5.0}
        self.plan = PlanTerms(family, config_class)

    def read_config(self, data: dict[str, Any]) -> Any:
        return self.config_class.from_peft_dict(data)

    def inject(self, model: nn.Module, config: Any, name: str, init: bool) -> None:
        targets = select_lycoris_targets(model, config)  # raises before anything changes
        for path, module, kind in targets:
            layer = module if isinstance(module, LycorisLayer) else LycorisLayer(module, kind, self.family, path)
            layer.add_adapter(name, r=config.rank_for(path), alpha=config.alpha_for(path), config=config,
                              init=config.init_weights if init else True)
            if layer is not module:
                replace_module(model, path, layer)

    def extra_trainable(self, model: nn.Module, name: str, config: Any) -> list[nn.Parameter]:
        return []

    def state_dict(self, model: nn.Module, name: str, config: Any) -> dict[str, Tensor]:
        return io.state_dict(model, self.family, name)

    def expected(self, model: nn.Module, config: Any) -> Expected:
        return io.expected(model, self.family, config)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        io.load_tensors(model, self.family, name, tensors)

    def file_config(self, model: nn.Module, name: str, config: Any) -> dict[str, Any]:
        if config.base_model_name_or_path is None:
            config = config.replace(base_model_name_or_path=hf.name_or_path(model))
        return config.to_peft_dict()

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        return nullcontext()  # no fused nodes: the model's own forward

    def config_from_options(self, o: Any) -> Any:
        """--r and --lora-alpha are the rank and alpha (the update is scaled by alpha / r); --target-modules as
        for LoRA (all-linear by default)."""
        return self.config_class(r=o.r, alpha=o.lora_alpha, target_modules=target_spec(o.target_modules))

    def describe_options(self, o: Any) -> str:
        return f"{o.method} r={o.r} alpha={o.lora_alpha:g} on {o.target_modules}"

    def describe(self, config: Any) -> str:
        return config.describe()


LOHA_METHOD = LycorisMethod(LOHA, LoHaConfig, "low-rank Hadamard product (LoHa, LyCORIS)")
LOKR_METHOD = LycorisMethod(LOKR, LoKrConfig, "low-rank Kronecker product (LoKr, LyCORIS)")
