"""Prompt tuning (PROMPT_TUNING) and P-tuning (P_TUNING) as registered methods, and their model-level
functions. One method class serves both (they differ only in their config and plan terms); their adapters share
the container `model.peftkit_prompt`, in which one adapter is active at a time."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ... import hf
from ...adapters import delete_adapter
from ...checkpoint import load_adapter, save_adapter
from ...inject import inject
from ...record import active_adapters, configs, set_active
from ...registry import Expected
from .config import KEY, P_TUNING, PROMPT_TUNING, PromptEncoderConfig, PromptTuningConfig, prompt_geometry
from .encoders import VirtualTokens, init_from_vocabulary
from .hooks import PromptAdapters
from .plan import PromptPlan

MERGE_REFUSAL = ("prompt adapters {names} cannot be merged into the base weights: they are extra input "
                 "positions (virtual tokens), not a change of any weight; keep them as adapters")
CONFIGS = (PromptTuningConfig, PromptEncoderConfig)


def container(model: nn.Module) -> PromptAdapters | None:
    found = getattr(model, "peftkit_prompt", None)
    return found if isinstance(found, PromptAdapters) else None


def require_prompt(model: nn.Module, name: str) -> PromptAdapters:
    adapters = container(model)
    if adapters is None or name not in adapters.encoders:
        known = ", ".join(adapters.encoders) if adapters else "none"
        raise KeyError(f"no prompt tuning / P-tuning adapter named {name!r} in this model (they are: {known})")
    return adapters


class PromptMethod:
    """Virtual tokens put in front of the input embeddings: trained directly (prompt tuning) or through an
    encoder that is folded into them on save (P-tuning)."""

    merge_refusal = MERGE_REFUSAL
    file_key_prefix = ""  # PEFT stores prompt_embeddings without the base_model.model. prefix
    ranked = False
    nf4_train_names = ()

    def __init__(self, peft_type: str, config_class: type, train_help: dict[str, str],
                 encoders: dict[str, str | None], lr_scales: dict[str, float] | None = None) -> None:
        self.peft_type, self.config_class, self.train_help = peft_type, config_class, train_help
        self.lr_scales = dict(lr_scales or {})  # train name -> default --lr as a multiple of LoRA's
        self.train_names = tuple(train_help)
        self.encoders = encoders  # train name -> P-tuning's encoder type (None: prompt tuning)
        self.plan = PromptPlan(encoders)

    def read_config(self, data: dict[str, Any]) -> Any:
        """A file holds the virtual tokens themselves (P-tuning's encoder output, folded by PEFT on save)."""
        return self.config_class.from_peft_dict(data).replace(inference_mode=True)

    def inject(self, model: nn.Module, config: Any, name: str, init: bool) -> None:
        geometry = prompt_geometry(model)  # raises, naming the model class, when it cannot take virtual tokens
        tokens = VirtualTokens(config, geometry.token_dim, init=init)
        if init:
            init_from_vocabulary(tokens, model)  # TEXT / SAMPLE_VOCAB; raises before the model changes
        param = next(model.parameters(), None)
        adapters = container(model)
        if adapters is None:
            adapters = PromptAdapters(model)
            model.add_module("peftkit_prompt", adapters)
        adapters.encoders[name] = tokens.to(param.device) if param is not None else tokens
        adapters.enabled = True

    def extra_trainable(self, model: nn.Module, name: str, config: Any) -> list[nn.Parameter]:
        return []

    def state_dict(self, model: nn.Module, name: str, config: Any) -> dict[str, Tensor]:
        """{"prompt_embeddings": (P, token_dim)}, P-tuning's encoder folded in (its output in eval mode)."""
        return {KEY: require_prompt(model, name).encoders[name].folded()}

    def expected(self, model: nn.Module, config: Any) -> Expected:
        try:
            geometry = prompt_geometry(model)
        except ValueError as err:
            return Expected(problems=[str(err)])
        want = Expected(required={KEY: (config.num_virtual_tokens, geometry.token_dim)})
        want.notes[KEY] = "(num_virtual_tokens, token_dim = the width of the model's input embeddings)"
        if config.token_dim is not None and config.token_dim != geometry.token_dim:
            want.problems.append(f"token_dim: file {config.token_dim}, model {geometry.token_dim}")
        return want

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        with torch.no_grad():
            model.peftkit_prompt.encoders[name].prompt_embeddings.copy_(tensors[KEY])

    def file_config(self, model: nn.Module, name: str, config: Any) -> dict[str, Any]:
        """PEFT's config with the model's geometry; inference_mode=True, as PEFT writes it (for P-tuning: the
        file holds the encoder's output). A TEXT init whose tokenizer was given as an object is written with the
        tokenizer's name, or as RANDOM when it has none (PEFT refuses TEXT without a tokenizer name)."""
        config = require_prompt(model, name).encoders[name].config.replace(inference_mode=True)
        if config.base_model_name_or_path is None:
            config = config.replace(base_model_name_or_path=hf.name_or_path(model))
        if isinstance(config, PromptTuningConfig) and config.prompt_tuning_init == "TEXT":
            named = config.tokenizer_name_or_path or getattr(config.tokenizer, "name_or_path", None) or None
            config = (config.replace(tokenizer_name_or_path=named) if named else
                      config.replace(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_kwargs=None))
        return config.to_peft_dict(prompt_geometry(model))

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        return nullcontext()  # no fused nodes: the model's own forward

    def positions_in_front(self, model: nn.Module) -> int | None:
        """Virtual tokens this method's active adapter puts before the input through hooks on the model's own
        forward (peftkit.train.loss then goes through that forward, the labels shifted by them); None when none
        is active."""
        adapters = container(model)
        if adapters is None or not adapters.in_front():
            return None
        if adapters.encoders[adapters.current].config.peft_type != self.peft_type:
            return None
        return adapters.in_front()

    def config_from_options(self, o: Any) -> Any:
        kind = self.encoders[o.method]
        if kind is None:
            return PromptTuningConfig(num_virtual_tokens=o.num_virtual_tokens)
        return PromptEncoderConfig(num_virtual_tokens=o.num_virtual_tokens, encoder_reparameterization_type=kind,
                                   encoder_hidden_size=o.prefix_projection)

    def describe_options(self, o: Any) -> str:
        kind = self.encoders[o.method]
        if kind is None:
            return f"prompt tuning ({o.num_virtual_tokens} virtual tokens)"
        width = o.prefix_projection or "hidden size"
        return f"P-tuning ({o.num_virtual_tokens} virtual tokens, {kind} encoder of width {width})"

    def describe(self, config: Any) -> str:
        if isinstance(config, PromptTuningConfig):
            return f"prompt tuning, {config.num_virtual_tokens} virtual tokens, init {config.prompt_tuning_init}"
        encoder = "folded" if config.inference_mode else config.encoder_reparameterization_type
        return f"P-tuning, {config.num_virtual_tokens} virtual tokens, encoder {encoder}"


PROMPT_METHOD = PromptMethod(PROMPT_TUNING, PromptTuningConfig,
                             {"prompt": "prompt tuning: trained virtual tokens before the input "
                                        "(--num-virtual-tokens; its default --lr is 15x LoRA's)"},
                             {"prompt": None},
                             {"prompt": 15.0})  # embeddings alone train at a high rate (PEFT's examples: 3e-2)
PTUNING_METHOD = PromptMethod(P_TUNING, PromptEncoderConfig,
                              {"ptuning": "P-tuning: virtual tokens through an MLP encoder (--num-virtual-tokens; "
                                          "--prefix-projection sets the encoder width)",
                               "ptuning-lstm": "P-tuning with a bidirectional-LSTM encoder"},
                              {"ptuning": "MLP", "ptuning-lstm": "LSTM"})


# --- the model-level API -----------------------------------------------------------------------------------
def prompt_configs(model: nn.Module) -> dict[str, Any]:
    """The configs of the prompt tuning / P-tuning adapters in this model, by name."""
    return {n: c for n, c in configs(model).items() if isinstance(c, CONFIGS)}


def inject_prompt(model: nn.Module, config: PromptTuningConfig | PromptEncoderConfig, name: str = "default", *,
                  tokenizer: Any = None, init: bool = True) -> nn.Module:
    """Add prompt tuning / P-tuning adapter `name` to `model` in place and make it the active, only trainable
    part. `tokenizer` serves prompt_tuning_init='TEXT'. Returns the model."""
    if not isinstance(config, CONFIGS):
        raise TypeError("inject_prompt expects a PromptTuningConfig or PromptEncoderConfig, got "
                        f"{type(config).__name__}")
    if tokenizer is not None:
        if not isinstance(config, PromptTuningConfig):
            raise TypeError("a tokenizer serves PromptTuningConfig(prompt_tuning_init='TEXT') only")
        config = config.replace(tokenizer=tokenizer)
    return inject(model, config, name, init=init)


def set_active_prompt(model: nn.Module, name: str | None) -> None:
    """Make prompt adapter `name` the one the model uses (None: none); other methods' active adapters stay."""
    if name is not None:
        require_prompt(model, name)
    others = [n for n in active_adapters(model) if n not in prompt_configs(model)]
    set_active(model, others + ([name] if name is not None else []))


def set_prompt_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the active prompt adapter off (the model computes its base output exactly) or on again."""
    adapters = container(model)
    if adapters is not None:
        adapters.set_disabled(not enabled)


def fold_prompt_encoder(model: nn.Module, name: str = "default") -> None:
    """Replace P-tuning adapter `name`'s encoder by the virtual tokens it computes (same outputs)."""
    tokens = require_prompt(model, name).encoders[name]
    tokens.fold()
    configs(model)[name] = tokens.config


def remove_prompt(model: nn.Module, name: str = "default") -> nn.Module:
    """Delete prompt adapter `name`; with the last one gone the hooks and `model.peftkit_prompt` go too."""
    require_prompt(model, name)
    delete_adapter(model, name)
    return model


def save_prompt(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write prompt adapter `name` in PEFT's format (P-tuning's encoder folded into prompt_embeddings)."""
    require_prompt(model, name)
    return save_adapter(model, directory, name)


def load_prompt(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                trainable: bool = False) -> nn.Module:
    """Load a PEFT PROMPT_TUNING or P_TUNING adapter as plain virtual tokens (checked first; on any problem the
    error lists them all and the model is left unchanged)."""
    return load_adapter(model, directory, name, trainable=trainable)
