"""PiSSA (and any LoRA whose initialisation moved part of W into A and B) to a plain LoRA file for the
untouched base: HF PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=...)`.

PiSSA trains on W_res = W - s B0 A0 with A, B starting at A0, B0. After training the model computes
W_res + s B A = W + s (B A - B0 A0), and B A - B0 A0 = [B | -B0] [A ; A0]: a rank-2r LoRA on W itself. Its
scaling must stay s, so alpha doubles with r (alpha / r), or grows by sqrt(2) with rsLoRA (alpha / sqrt(r)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .config import LoraConfig


def to_plain_lora(state: dict[str, Tensor], file_config: dict[str, Any], initial: LoraConfig,
                  initial_tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The file (tensors, adapter_config dict) that gives the trained adapter's outputs on the original base,
    from its tensors and file config and the adapter as saved right after initialisation (`initial`)."""
    if file_config.get("use_dora"):
        raise ValueError("a DoRA adapter cannot be converted to a plain LoRA file: its magnitude is measured on "
                         "the residual base, so no low-rank update of the original base reproduces it")
    if file_config.get("use_rslora") and (file_config.get("rank_pattern") or file_config.get("alpha_pattern")):
        raise ValueError("converting an rsLoRA adapter that has rank_pattern or alpha_pattern is not supported "
                         "(as in HF PEFT): its per-module scalings cannot all be kept by one alpha")
    factor_keys = sorted(k for k in state if ".lora_A." in k or ".lora_B." in k)
    missing = [k for k in factor_keys if k not in initial_tensors]
    wrong = [f"{k} {tuple(initial_tensors[k].shape)} != {tuple(state[k].shape)}" for k in factor_keys
             if k in initial_tensors and initial_tensors[k].shape != state[k].shape]
    if missing or wrong or initial.r != file_config.get("r"):
        raise ValueError("the initial adapter does not match this one (save it right after inject, before "
                         f"training, with the same config): r {initial.r} vs {file_config.get('r')}; missing keys: "
                         f"{', '.join(missing[:5]) or 'none'}; different shapes: {', '.join(wrong[:5]) or 'none'}")
    out = dict(state)
    for key in factor_keys:
        start = initial_tensors[key].to(state[key].dtype)
        if ".lora_A." in key:  # (r, in) -> (2r, in)
            out[key] = torch.cat([state[key], start], dim=0).contiguous()
        else:  # (out, r) -> (out, 2r)
            out[key] = torch.cat([state[key], -start], dim=1).contiguous()
    return out, _doubled(file_config)


def _doubled(file_config: dict[str, Any]) -> dict[str, Any]:
    config = dict(file_config, init_lora_weights=True, r=2 * file_config["r"])
    config["lora_alpha"] = file_config["lora_alpha"] * (2 ** 0.5 if file_config.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            config[key] = {k: 2 * v for k, v in config[key].items()}
    return config
