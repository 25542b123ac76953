"""Bottleneck adapters (Houlsby, Pfeiffer): config, layer, placement, file keys, and the registered method."""

from .config import BottleneckConfig
from .io import bottleneck_layers
from .layer import Bottleneck, BottleneckLayer, bottleneck_dim
from .method import (METHOD, bottleneck_state_dict, inject_bottleneck, load_bottleneck, merge_check,
                     read_bottleneck, save_bottleneck, unload_bottleneck)
from .targets import default_bottleneck_targets, select_bottleneck_targets

__all__ = ["METHOD", "Bottleneck", "BottleneckConfig", "BottleneckLayer", "bottleneck_dim", "bottleneck_layers",
           "bottleneck_state_dict", "default_bottleneck_targets", "inject_bottleneck", "load_bottleneck",
           "merge_check", "read_bottleneck", "save_bottleneck", "select_bottleneck_targets", "unload_bottleneck"]
