"""IA3 ((IA)^3): config, layer, placement, PEFT file keys, plan terms, and the registered method."""

from .config import IA3Config
from .layer import IA3Layer, ia3_layers
from .method import METHOD
from .targets import select_ia3_targets

__all__ = ["METHOD", "IA3Config", "IA3Layer", "ia3_layers", "select_ia3_targets"]
