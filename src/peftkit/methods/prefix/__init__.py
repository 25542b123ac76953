"""Prefix tuning (HF PEFT's PREFIX_TUNING): config, model geometry, cache hooks, and the registered method."""

from .config import KEY, PEFT_TYPE, PrefixConfig, PrefixGeometry, prefix_geometry
from .hooks import PrefixAdapters, PrefixEncoder
from .method import (METHOD, active_prefix, fold_prefix, inject_prefix, load_prefix, prefix_configs,
                     prefix_state_dict, read_prefix, remove_prefix, save_prefix, set_active_prefix,
                     set_prefix_enabled, set_prefix_trainable)

__all__ = ["KEY", "METHOD", "PEFT_TYPE", "PrefixAdapters", "PrefixConfig", "PrefixEncoder", "PrefixGeometry",
           "active_prefix", "fold_prefix", "inject_prefix", "load_prefix", "prefix_configs", "prefix_geometry",
           "prefix_state_dict", "read_prefix", "remove_prefix", "save_prefix", "set_active_prefix",
           "set_prefix_enabled", "set_prefix_trainable"]
