"""Serving on every architecture of the parity matrix (issue 15): for each model type in hf.arch.PARITY_TYPES,
a tiny random model served by the Engine with two LoRA adapters and the base, requests of different prompt
lengths batched together (left-padded prefill, shared KV cache, rows of different adapters in one forward),
gives for every request the greedy tokens of the same request decoded alone by full recomputation on a model
with that one adapter loaded. The types that pass are the ones hf.arch marks "serve"; `peftkit serve`
refuses the others (test at the end)."""

from __future__ import annotations

import pytest
import torch
from test_arch_parity import tiny_base

import peftkit
from peftkit import hf
from peftkit.serve import AdapterRegistry, Engine, GenRequest

torch.set_num_threads(1)
SERVED = sorted(t for t in hf.arch.PARITY_TYPES if "serve" in hf.arch.VERIFIED.get(t, ()))
# the MoE types' expert kernels (torch._grouped_mm) take float32, not float64
DTYPES = {"mixtral": torch.float32, "qwen3_moe": torch.float32, "granitemoe": torch.float32}
# (adapter, prompt length, max_tokens)
CASES = [(None, 5, 6), ("one", 9, 5), ("two", 3, 7), ("one", 7, 4)]


def _adapter(model_type: str, directory, seed: int, r: int):
    model = tiny_base(model_type)
    torch.manual_seed(seed)
    peftkit.inject(model, peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                             init_lora_weights=False))
    return peftkit.save_adapter(model, directory)


@torch.no_grad()
def _alone(model_type: str, adapter_dir, prompt: list[int], max_tokens: int) -> list[int]:
    model = tiny_base(model_type).to(DTYPES.get(model_type, torch.float64)).eval()
    if adapter_dir is not None:
        peftkit.load_adapter(model, adapter_dir)
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.parametrize("model_type", SERVED)
def test_served_greedy_tokens_equal_each_request_decoded_alone(model_type, tmp_path):
    adapters = {"one": _adapter(model_type, tmp_path / "one", 1, 4), "two": _adapter(model_type, tmp_path / "two", 2, 2)}
    model = tiny_base(model_type).to(DTYPES.get(model_type, torch.float64)).eval()
    engine = Engine(model, AdapterRegistry(model, adapters=adapters, max_loaded=2), max_batch=4)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for _, n, _ in CASES]
    handles = [engine.submit(GenRequest(p, a, m)) for p, (a, _, m) in zip(prompts, CASES)]  # one batched prefill
    engine.start()
    try:
        for h in handles:
            h.wait(60)
    finally:
        engine.close()
    for h, p, (a, _, m) in zip(handles, prompts, CASES):
        assert h.finish_reason == "length", (a, h.error if hasattr(h, "error") else None)
        assert h.token_ids == _alone(model_type, adapters[a] if a else None, p, m), a


@pytest.mark.parametrize("model_type", sorted(hf.SERVE_UNVERIFIED))
def test_unverified_architectures_are_refused_naming_why(model_type):
    model = tiny_base(model_type)
    with pytest.raises(ValueError, match=rf"serving is not verified for architecture '{model_type}': .*Verified: "):
        Engine(model, AdapterRegistry(model, adapters={}, max_loaded=1))


def test_every_parity_type_is_either_served_or_refused():
    assert set(SERVED) | set(hf.SERVE_UNVERIFIED) == set(hf.arch.PARITY_TYPES)
    assert len(SERVED) >= 20
