"""Forward hooks that a user registered on a module keep firing after peftkit wraps it, in every state of
the adapter: active, inactive, disabled, merged (the wrapper never swaps in the base's bound forward)."""

from __future__ import annotations

import pytest
import torch

import peftkit
from conftest import inputs, tiny_llama


def _hooked(model, path: str) -> list[tuple]:
    calls: list[tuple] = []
    model.get_submodule(path).register_forward_hook(lambda m, args, out: calls.append(tuple(out.shape)))
    return calls


def _states(model, ids, config, mergeable: bool):
    """(state name, whether the base ran) for each adapter state, running the model once in each."""
    peftkit.inject(model, config)
    yield "active"
    peftkit.set_active(model, [])
    yield "inactive"
    peftkit.set_active(model, ["default"])
    with peftkit.disable_adapters(model):
        yield "disabled"
    if mergeable:
        peftkit.merge(model)
        yield "merged"
        peftkit.unmerge(model)
        yield "unmerged"


@pytest.mark.parametrize("config, path, mergeable", [
    (peftkit.LoraConfig(r=2, target_modules=["q_proj"]), "model.layers.0.self_attn.q_proj", True),
    (peftkit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "model.layers.0.self_attn.q_proj", True),
    (peftkit.BottleneckConfig(target_modules=["o_proj"]), "model.layers.0.self_attn.o_proj", False),
], ids=["lora", "dora", "bottleneck"])
def test_hook_on_the_wrapped_base_fires_in_every_state(config, path, mergeable):
    model, ids = tiny_llama(), inputs("llama")
    calls = _hooked(model, path)  # registered on the plain module, before peftkit wraps it
    seen = []
    for state in _states(model, ids, config, mergeable):
        before = len(calls)
        with torch.no_grad():
            model(ids)
        seen.append((state, len(calls) - before))
    assert seen and all(n == 1 for _, n in seen), f"hook calls per state: {seen}"
    assert isinstance(model.get_submodule(path), torch.nn.Module) and model.get_submodule(path).base is not None


def test_hook_output_changes_are_kept_when_the_wrapper_bypasses_itself():
    """A hook that edits the base's output still takes effect when the wrapper has nothing to add."""
    model, ids = tiny_llama(), inputs("llama")
    path = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        plain = model(ids).logits
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["q_proj"]))
    peftkit.set_active(model, [])
    model.get_submodule(path).base.register_forward_hook(lambda m, args, out: out * 0)
    with torch.no_grad():
        zeroed = model(ids).logits
    assert not torch.allclose(plain, zeroed)
