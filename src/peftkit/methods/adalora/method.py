"""AdaLoRA as a registered method: how a config becomes layers, files and training options, and the trainer's
hooks that drive the rank allocator (allocator.py)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor, nn

from ... import hf
from ...files import PREFIX
from ...record import configs, replace_module
from ...registry import Expected
from ...targeting import target_spec
from . import allocator, io, plan
from .config import AdaLoraConfig
from .layer import AdaLoraLayer
from .targets import select_adalora_targets


class AdaLoraMethod:
    """peft_type ADALORA: LoRA in SVD form whose rank budget the trainer reallocates by importance; merges into
    the base weights."""

    peft_type = "ADALORA"
    config_class = AdaLoraConfig
    train_names = ("adalora",)
    train_help = {"adalora": "LoRA in SVD form whose ranks shrink from --r to 2/3 of it where least important "
                             "(AdaLoRA; its default --lr is 5x LoRA's)"}
    merge_refusal = None
    file_key_prefix = PREFIX
    ranked = False  # the sweep's rank candidates and --suggest-rank read LoRA's factors; AdaLoRA's differ
    nf4_train_names = ()
    # the default --lr: 5x LoRA's (on the built-in task 1e-2 reached 94% exact match, LoRA's 2e-3 0%)
    lr_scales = {"adalora": 5.0}
    plan = plan

    def read_config(self, data: dict[str, Any]) -> AdaLoraConfig:
        return AdaLoraConfig.from_peft_dict(data)

    def inject(self, model: nn.Module, config: AdaLoraConfig, name: str, init: bool) -> None:
        """Layers at init_r for training (PEFT ignores rank_pattern when it creates an adapter); for loading a
        file (init=False) at the ranks its rank_pattern keeps."""
        targets = select_adalora_targets(model, config)  # raises before anything changes
        for path, module, kind in targets:
            layer = module if isinstance(module, AdaLoraLayer) else AdaLoraLayer(module, kind, path)
            r = config.init_r if init else config.loaded_rank(path)
            layer.add_adapter(name, r, config.init_r, config.lora_alpha, config.lora_dropout,
                              init=config.init_lora_weights if init else True)
            if layer is not module:
                replace_module(model, path, layer)

    def allocated_ranks(self, config: AdaLoraConfig) -> dict[str, int]:
        """The ranks the budget allocator left each module (the file's rank_pattern)."""
        return config.final_ranks()

    def extra_trainable(self, model: nn.Module, name: str, config: AdaLoraConfig) -> list[nn.Parameter]:
        return []

    def state_dict(self, model: nn.Module, name: str, config: AdaLoraConfig) -> dict[str, Tensor]:
        return io.state_dict(model, name, config)

    def expected(self, model: nn.Module, config: AdaLoraConfig) -> Expected:
        return io.expected(model, config)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        io.load_tensors(model, name, tensors)

    def file_config(self, model: nn.Module, name: str, config: AdaLoraConfig) -> dict[str, Any]:
        """As PEFT writes it: fan_in_fan_out true over Conv1D, the rank_pattern the allocator left."""
        kinds = {layer.kind for _, layer in allocator.layers_of(model, name)}
        extra: dict[str, Any] = {"fan_in_fan_out": "conv1d" in kinds}
        if config.base_model_name_or_path is None:
            extra["base_model_name_or_path"] = hf.name_or_path(model)
        return config.replace(**extra).to_peft_dict()

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        return nullcontext()  # no fused nodes: the model's own forward

    # --- the trainer's hooks --------------------------------------------------------------------------------
    def training_loss_extra(self, model: nn.Module, names: list[str]) -> Tensor | None:
        """orth_reg_weight x the orthogonality regularizer of each AdaLoRA adapter that trains (PEFT adds it to
        the batch's mean loss)."""
        extra = None
        for name, config in _training(model, names):
            reg = allocator.orth_regularizer(model, name) if config.orth_reg_weight > 0 else None
            if reg is not None:
                extra = config.orth_reg_weight * reg if extra is None else extra + config.orth_reg_weight * reg
        return extra

    def after_optimizer_step(self, model: nn.Module, names: list[str], step: int, total_steps: int) -> None:
        """PEFT's update_and_allocate(step) for each AdaLoRA adapter that trains; total_step, when the config
        leaves it None, is the run's `total_steps` (recorded in the config, so the saved file has it)."""
        for name, config in _training(model, names):
            configs(model)[name] = allocator.update_and_allocate(model, name, config.with_total(total_steps), step)

    def trainer_state(self, model: nn.Module, names: list[str]) -> dict[str, Any]:
        """What a checkpoint needs beyond the parameters: each adapter's running scores and rank pattern."""
        return {name: {"scores": allocator.scores_state(model, name), "rank_pattern": config.rank_pattern or {}}
                for name, config in _training(model, names)}

    def load_trainer_state(self, model: nn.Module, names: list[str], state: dict[str, Any]) -> None:
        for name, config in _training(model, names):
            saved = state.get(name, {"scores": {}, "rank_pattern": {}})
            allocator.load_scores_state(model, name, saved["scores"])
            configs(model)[name] = config.replace(rank_pattern=saved["rank_pattern"] or None)

    # --- options ----------------------------------------------------------------------------------------------
    def config_from_options(self, o: Any) -> AdaLoraConfig:
        """--r is init_r; target_r is two thirds of it (PEFT's 12 -> 8); total_step is the run's (set at its
        first step); tinit, tfinal, deltaT are PEFT's defaults (0, 0, 1): ranks shrink from the first step.
        Not with --fsdp: the allocator ranks whole tensors, and FSDP leaves each process a shard of them."""
        if getattr(o, "fsdp", False):
            raise ValueError("--method adalora cannot run with --fsdp (its rank allocator scores whole A, E and B "
                             "tensors, which FSDP shards); use --nproc N without --fsdp")
        return AdaLoraConfig(init_r=o.r, target_r=target_rank(o.r), lora_alpha=o.lora_alpha,
                             lora_dropout=o.lora_dropout, target_modules=target_spec(o.target_modules))

    def describe_options(self, o: Any) -> str:
        return f"adalora r={o.r}->{target_rank(o.r)} on {o.target_modules}"

    def describe(self, config: AdaLoraConfig) -> str:
        return config.describe()


def target_rank(init_r: int) -> int:
    return max(1, round(init_r * 2 / 3))


def _training(model: nn.Module, names: list[str]) -> list[tuple[str, AdaLoraConfig]]:
    """(name, config) of the AdaLoRA adapters among `names` whose weights train."""
    found = []
    for name in names:
        config = configs(model).get(name)
        if isinstance(config, AdaLoraConfig) and any(
                layer.lora_A[name].requires_grad for _, layer in allocator.layers_of(model, name)):
            found.append((name, config))
    return found


METHOD = AdaLoraMethod()
