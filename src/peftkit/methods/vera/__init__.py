"""VeRA (vector-based random matrix adaptation): config, layer, shared projections, placement, PEFT file keys,
plan terms, and the registered method."""

from .config import VeraConfig
from .layer import VeraLayer, vera_layers
from .method import METHOD
from .projection import VeraProjections
from .targets import select_vera_targets

__all__ = ["METHOD", "VeraConfig", "VeraLayer", "VeraProjections", "select_vera_targets", "vera_layers"]
