"""Shared by the serve tests: PEFT-format adapters with non-zero weights for the tiny Llama, a reference model
that runs them with peftkit's own LoRA layers, and greedy decoding by full recomputation (no KV cache)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import tiny_llama

import peftkit

# name -> LoraConfig options: different ranks, targets, rank/alpha patterns and rsLoRA
ADAPTERS = {
    "alpha": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "beta": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj"],
             "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3.0}},
    "gamma": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["up_proj", "down_proj", "gate_proj"]},
}


def save_lora(directory: Path, seed: int = 0, scale: float = 1.0, **options) -> Path:
    """Save an adapter for tiny_llama() whose A and B are random (init_lora_weights=False), B times `scale`."""
    model = tiny_llama()
    torch.manual_seed(seed)
    peftkit.inject(model, peftkit.LoraConfig(init_lora_weights=False, **options), "default")
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
    return peftkit.save_adapter(model, directory)


def make_adapters(root: Path, names=tuple(ADAPTERS)) -> dict[str, Path]:
    return {name: save_lora(root / name, seed=i + 1, **ADAPTERS[name]) for i, name in enumerate(names)}


def reference_model(paths: dict[str, Path], dtype=torch.float64):
    """tiny_llama with every adapter loaded through peftkit.load_adapter; set_active picks one."""
    model = tiny_llama().to(dtype)
    for name, path in paths.items():
        peftkit.load_adapter(model, path, name)
    peftkit.set_active(model, [])
    return model


@torch.no_grad()
def greedy(model, adapter: str | None, prompt: list[int], max_tokens: int, stop=()) -> tuple[list[int], list[float]]:
    """(tokens, their log-probabilities), each step a full forward of the whole sequence."""
    peftkit.set_active(model, [adapter] if adapter else [])
    ids, out, logprobs = list(prompt), [], []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        logprobs.append(float(torch.log_softmax(logits.float(), -1)[token]))
        out.append(token)
        if token in stop:
            break
        ids.append(token)
    return out, logprobs
