"""LoRA and DoRA: config, layers (linear-like, embedding, convolution, attention), PEFT file keys, combination, and
the registered method."""

from .combine import combine
from .config import LoraConfig
from .layer import LoraLayer, lora_layers
from .mha import LoraMhaLayer
from ...weights import WeightAccess, base_device, get_dense_weight
from .weights import factor_shapes, parameter_count
from .method import METHOD
from .saved_copy import SavedCopy

__all__ = ["METHOD", "LoraConfig", "LoraLayer", "LoraMhaLayer", "SavedCopy", "WeightAccess", "base_device", "combine",
           "factor_shapes", "get_dense_weight", "lora_layers", "parameter_count"]
