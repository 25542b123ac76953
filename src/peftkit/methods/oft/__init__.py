"""OFT (orthogonal finetuning, HF PEFT's peft_type OFT): config, the block-diagonal Cayley rotation, the layer,
placement, PEFT file keys, plan terms, and the registered method."""

from .config import OFTConfig
from .layer import OFTLayer, oft_layers
from .method import METHOD
from .targets import select_oft_targets

__all__ = ["METHOD", "OFTConfig", "OFTLayer", "oft_layers", "select_oft_targets"]
