"""LoRA and DoRA: config, layer, PEFT file keys, combination, and the registered method."""

from .combine import combine
from .config import LoraConfig
from .layer import LoraLayer, lora_layers
from ...weights import WeightAccess, base_device, get_dense_weight
from .weights import factor_shapes
from .method import METHOD
from .saved_copy import SavedCopy

__all__ = ["METHOD", "LoraConfig", "LoraLayer", "SavedCopy", "WeightAccess", "base_device", "combine",
           "factor_shapes", "get_dense_weight", "lora_layers"]
