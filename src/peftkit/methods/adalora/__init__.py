"""AdaLoRA: config, SVD-form layer, rank allocator, PEFT file keys, plan terms, and the registered method."""

from .config import AdaLoraConfig
from .layer import AdaLoraLayer, adalora_layers
from .method import METHOD

__all__ = ["METHOD", "AdaLoraConfig", "AdaLoraLayer", "adalora_layers"]
