"""Prompt tuning (HF PEFT's PROMPT_TUNING) and P-tuning (P_TUNING): configs, virtual tokens, the input hooks,
plan terms and the two registered methods."""

from .config import (KEY, P_TUNING, PROMPT_TUNING, PromptEncoderConfig, PromptGeometry, PromptTuningConfig,
                     prompt_geometry)
from .encoders import VirtualTokens
from .hooks import PromptAdapters
from .method import (PROMPT_METHOD, PTUNING_METHOD, fold_prompt_encoder, inject_prompt, load_prompt, prompt_configs,
                     remove_prompt, save_prompt, set_active_prompt, set_prompt_enabled)

__all__ = ["KEY", "PROMPT_METHOD", "PROMPT_TUNING", "PTUNING_METHOD", "P_TUNING", "PromptAdapters",
           "PromptEncoderConfig", "PromptGeometry", "PromptTuningConfig", "VirtualTokens", "fold_prompt_encoder",
           "inject_prompt", "load_prompt", "prompt_configs", "prompt_geometry", "remove_prompt", "save_prompt",
           "set_active_prompt", "set_prompt_enabled"]
