"""SlotLoraLayer: one forward serves rows of different adapters and equals each row run alone with peftkit's
LoRA; base rows equal the base exactly; slots grow with what is loaded."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from serve_helpers import ADAPTERS, make_adapters, reference_model, save_lora

import peftkit
from peftkit.serve import AdapterRegistry, SlotLoraLayer, unwrap_linears, wrap_linears

torch.set_num_threads(1)


def ids(batch: int, seq: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"))


@torch.no_grad()
def test_mixed_batch_equals_each_row_alone_with_peftkit_lora(adapters):
    served = tiny_llama().double()
    registry = AdapterRegistry(served, adapters=adapters, max_loaded=4)
    leases = {name: registry.acquire(name) for name in ADAPTERS}
    plan = ["alpha", None, "beta", "gamma", "alpha", None, "gamma"]  # different ranks, patterns, rsLoRA
    x = ids(len(plan))
    with registry.bank.rows([leases[n].slot if n else -1 for n in plan]):
        got = served(x).logits  # (7, T, V)
    ref = reference_model(adapters)
    base = tiny_llama().double()(x).logits
    for i, name in enumerate(plan):
        if name is None:
            assert torch.equal(got[i], base[i])  # base rows: exactly the base
            continue
        peftkit.set_active(ref, [name])
        alone = ref(x[i:i + 1]).logits[0]
        assert (alone - base[i]).abs().max() > 1e-2  # the adapter changes the output (else this proves nothing)
        torch.testing.assert_close(got[i], alone, atol=1e-12, rtol=0)


@torch.no_grad()
def test_rows_sharing_one_adapter_take_the_plain_matmuls_and_equal_the_gathered_product(adapters, monkeypatch):
    served = tiny_llama().double()
    registry = AdapterRegistry(served, adapters=adapters, max_loaded=4)
    alpha, beta = registry.acquire("alpha").slot, registry.acquire("beta").slot
    x = ids(4)
    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: bmm_calls.append(1) or real_bmm(*a))
    with registry.bank.rows([alpha, -1, alpha, alpha]):
        single = served(x).logits
    assert bmm_calls == []  # one adapter in the batch: no per-row gather
    with registry.bank.rows([alpha, -1, alpha, beta]):
        gathered = served(x).logits
    assert bmm_calls  # two adapters: the gathered product
    torch.testing.assert_close(single[:3], gathered[:3], atol=1e-12, rtol=0)
    assert not torch.allclose(single[3], gathered[3])


@torch.no_grad()
def test_batch_without_adapter_rows_is_the_base_exactly(adapters):
    served = tiny_llama().double()
    registry = AdapterRegistry(served, adapters=adapters, max_loaded=2)
    registry.acquire("alpha")
    x = ids(3)
    base = tiny_llama().double()(x).logits
    with registry.bank.rows([-1, -1, -1]):
        assert torch.equal(served(x).logits, base)
    with registry.bank.rows(None):
        assert torch.equal(served(x).logits, base)
    assert torch.equal(served(x).logits, base)  # no routing set: the base


@torch.no_grad()
def test_slots_grow_with_what_is_loaded_and_repadding_keeps_outputs(tmp_path):
    paths = {f"r{r}": save_lora(tmp_path / f"r{r}", seed=r, r=r, lora_alpha=2 * r, target_modules="all-linear")
             for r in (2, 4, 8)}
    served = tiny_llama().double()
    registry = AdapterRegistry(served, adapters=paths, max_loaded=8, max_rank=8)
    layer = served.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SlotLoraLayer) and layer.capacity == 0 and registry.bank.nbytes() == 0
    x = ids(1)
    first = registry.acquire("r2")
    with registry.bank.rows([first.slot]):
        before = served(x).logits
    assert (layer.capacity, layer.r_slot) == (1, 2)
    small = registry.bank.nbytes()
    registry.acquire("r4")
    registry.acquire("r8")
    assert (layer.capacity, layer.r_slot) == (4, 8)  # capacity doubles 1 -> 2 -> 4; r_slot = largest rank
    assert registry.bank.nbytes() == small * 4 * 4  # 4x the slots, 4x the rank: proportional, not max_loaded
    with registry.bank.rows([first.slot]):
        torch.testing.assert_close(served(x).logits, before, atol=1e-13, rtol=0)  # zero padding adds nothing


def test_wrap_skips_the_head_and_unwrap_restores_the_model():
    model = tiny_llama()
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    bank = wrap_linears(model, max_slots=4)
    assert "lm_head" not in bank.layers and isinstance(model.lm_head, torch.nn.Linear)
    assert set(bank.layers) == set(originals) - {"lm_head"}
    with pytest.raises(ValueError, match="already has adapter layers"):
        wrap_linears(model, max_slots=4)
    unwrap_linears(model)
    assert {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == originals


@torch.no_grad()
def test_routing_must_match_the_batch(adapters):
    served = tiny_llama().double()
    registry = AdapterRegistry(served, adapters=adapters, max_loaded=2)
    lease = registry.acquire("alpha")
    with registry.bank.rows([lease.slot, -1]), pytest.raises(ValueError, match="one slot index per row"):
        served(ids(3))
    with pytest.raises(ValueError, match="not loaded"):
        with registry.bank.rows([5]):
            pass


@torch.no_grad()
def test_gpt2_conv1d_layers(tmp_path):
    """transformers' Conv1D (weight stored (in, out)) is wrapped as well: GPT-2 adapters batch too."""
    source = tiny_gpt2()
    torch.manual_seed(1)
    peftkit.inject(source, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                              init_lora_weights=False))
    path = peftkit.save_adapter(source, tmp_path / "g")
    served = tiny_gpt2().double()
    registry = AdapterRegistry(served, adapters={"g": path}, max_loaded=2)
    lease = registry.acquire("g")
    x = ids(2)
    with registry.bank.rows([lease.slot, -1]):
        got = served(x).logits
    ref = tiny_gpt2().double()
    peftkit.load_adapter(ref, path)
    torch.testing.assert_close(got[0], ref(x[:1]).logits[0], atol=1e-12, rtol=0)
    assert torch.equal(got[1], tiny_gpt2().double()(x).logits[1])


def test_slots_can_be_written_under_inference_mode_and_after_it(adapters):
    served = tiny_llama().double()
    registry = AdapterRegistry(served, adapters=adapters, max_loaded=2)
    with torch.inference_mode():
        registry.acquire("alpha").release()
        beta = registry.acquire("beta")  # the slots are (re)allocated here, under inference mode
    registry.unload("alpha")
    gamma = registry.acquire("gamma")  # written in place into alpha's old slot, outside inference mode
    with torch.inference_mode(), registry.bank.rows([gamma.slot, beta.slot]):
        out = served(ids(2)).logits
    assert torch.isfinite(out).all() and gamma.slot == 0
