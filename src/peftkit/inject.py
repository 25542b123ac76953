"""Put an adapter into a model in place, whatever its method.

The user's model stays the user's model: the method (found in the registry by the config's type) replaces
targeted submodules by wrappers that keep the original as `.base`, or registers a container; the config goes
into the model's record (`peftkit.record`), the adapter becomes the one active and the only trainable part.
"""

from __future__ import annotations

from torch import nn

from .record import configs, mark_trainable, require_new, set_active
from .registry import AdapterConfig, for_config


def inject(model: nn.Module, config: AdapterConfig, name: str = "default", *, init: bool = True) -> nn.Module:
    """Add adapter `name` (any registered method: LoraConfig, BottleneckConfig, PrefixConfig, ...) to `model`
    in place and make it the one active, trainable adapter. Everything else is frozen. Returns the same model.

    LoRA works on any torch module tree: the nn.Linear, transformers' Conv1D and nn.Embedding modules that
    the config's target_modules select are wrapped. The method checks the whole fit before changing
    anything. `init=False` skips the initialisation (the caller fills the weights, as the loader does).
    """
    method = for_config(config)
    require_new(model, name)
    method.inject(model, config, name, init)
    configs(model)[name] = config
    set_active(model, [name])
    mark_trainable(model, name)
    return model
