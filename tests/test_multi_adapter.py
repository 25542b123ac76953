"""Several adapters on one model: activation, deletion, combination, saved copies, counting."""

from __future__ import annotations

import pytest
import torch
from conftest import inputs, nonzero_adapter, run, tiny_llama, tiny_mlp

import peftkit
from peftkit.methods.lora import lora_layers
from peftkit.methods.lora import LoraLayer


def two_adapters():
    model = tiny_llama()
    nonzero_adapter(model, ["q_proj", "v_proj"], "a", seed=1)
    nonzero_adapter(model, ["v_proj", "up_proj"], "b", seed=2, r=2)
    return model


def test_active_adapters_add_up():
    model, ids = two_adapters(), inputs("llama")
    with peftkit.disable_adapters(model):
        base = run(model, ids)
    peftkit.set_active(model, ["a"])
    a = run(model, ids)
    peftkit.set_active(model, ["b"])
    b = run(model, ids)
    peftkit.set_active(model, ["a", "b"])
    both = run(model, ids)
    peftkit.set_active(model, [])
    assert torch.equal(run(model, ids), base)
    assert not torch.allclose(both, a, atol=1e-3) and not torch.allclose(both, b, atol=1e-3)
    # merging both and running with none active gives the same as both unmerged
    peftkit.set_active(model, ["a", "b"])
    peftkit.merge(model)
    torch.testing.assert_close(run(model, ids), both, atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        peftkit.set_active(model, ["c"])


def test_delete_adapter_and_last_one_restores_plain_modules():
    model, ids = two_adapters(), inputs("llama")
    peftkit.set_active(model, "b")
    b = run(model, ids)
    peftkit.delete_adapter(model, "a")
    assert list(model.peftkit_configs) == ["b"]
    assert not any("a" in m.lora_A for m in model.modules() if isinstance(m, LoraLayer))
    assert torch.equal(run(model, ids), b)
    peftkit.delete_adapter(model, "b")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert torch.equal(run(model, ids), run(tiny_llama(), ids))


def test_combine_cat_is_exact_weighted_sum():
    model, ids = two_adapters(), inputs("llama")
    peftkit.combine(model, {"a": 0.7, "b": 0.3}, name="ab", how="cat")
    assert model.peftkit_configs["ab"].r == 4 + 2
    combined = run(model, ids)
    for _, layer in lora_layers(model):
        expected = sum(w * layer.delta_weight(s) for s, w in {"a": 0.7, "b": 0.3}.items() if s in layer.lora_A)
        torch.testing.assert_close(layer.delta_weight("ab"), expected, atol=1e-6, rtol=0)
    peftkit.set_active(model, [])
    assert not torch.allclose(run(model, ids), combined, atol=1e-4)


def test_combine_svd_truncates_and_linear_needs_equal_ranks():
    model = two_adapters()
    peftkit.combine(model, {"a": 1.0, "b": 1.0}, name="full", how="svd", rank=6)
    peftkit.combine(model, {"a": 1.0, "b": 1.0}, name="low", how="svd", rank=1)
    for _, layer in lora_layers(model):
        exact = sum(layer.delta_weight(s) for s in ("a", "b") if s in layer.lora_A)
        torch.testing.assert_close(layer.delta_weight("full"), exact, atol=1e-5, rtol=0)
        assert torch.linalg.matrix_rank(layer.delta_weight("low")) <= 1
    with pytest.raises(ValueError, match="one rank"):
        peftkit.combine(model, {"a": 0.5, "b": 0.5}, name="lin", how="linear")
    nonzero_adapter(model, ["q_proj", "v_proj"], "c", seed=3)
    peftkit.combine(model, {"a": 0.5, "c": 0.5}, name="lin", how="linear")
    layer = model.model.layers[0].self_attn.q_proj
    s = layer.scaling["a"]
    A = (0.5 * s) ** 0.5 * (layer.lora_A["a"] + layer.lora_A["c"])
    B = (0.5 * s) ** 0.5 * (layer.lora_B["a"] + layer.lora_B["c"])
    torch.testing.assert_close(layer.delta_weight("lin"), B @ A, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="how must be"):
        peftkit.combine(model, {"a": 1.0}, name="x", how="ties")


def test_modules_to_save_copy_trains_saves_and_routes_per_row(tmp_path):
    model, ids = tiny_mlp(), inputs("mlp", batch=3)
    nonzero_adapter(model, ["fc1"], "a", modules_to_save=["fc2"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["fc1.lora_A.a", "fc1.lora_B.a", "fc2.copies.a.bias", "fc2.copies.a.weight"]
    with torch.no_grad():
        model.fc2.copies["a"].weight.add_(0.5)
    adapted = run(model, ids)
    peftkit.save_adapter(model, tmp_path / "a", name="a")
    fresh = tiny_mlp()
    peftkit.load_adapter(fresh, tmp_path / "a", name="a")
    assert torch.equal(run(fresh, ids), adapted)
    with peftkit.per_row(fresh, ["a", None, "a"]):
        mixed = run(fresh, ids)
    with peftkit.disable_adapters(fresh):
        base = run(fresh, ids)
    assert torch.equal(mixed[0], adapted[0]) and torch.equal(mixed[2], adapted[2])
    assert torch.equal(mixed[1], base[1])
    merged = peftkit.merge_and_unload(fresh)
    assert isinstance(merged.fc2, torch.nn.Linear) and torch.equal(merged.fc2.weight, model.fc2.copies["a"].weight)
    torch.testing.assert_close(run(merged, ids), adapted, atol=1e-5, rtol=0)


def test_load_trainable_and_summary(tmp_path):
    model = tiny_llama()
    nonzero_adapter(model, ["q_proj"])
    peftkit.save_adapter(model, tmp_path / "a")
    fresh = peftkit.load_adapter(tiny_llama(), tmp_path / "a", trainable=True)
    t, total = peftkit.trainable_parameters(fresh)
    assert t == 2 * (4 * 32 + 32 * 4)  # two q_proj layers, A and B
    text = peftkit.summary(fresh)
    assert f"trainable params: {t:,}" in text and "adapter 'default': r=4" in text and "on 2 modules" in text


def test_per_row_checks_names_and_merged_state():
    model, ids = two_adapters(), inputs("llama")
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        with peftkit.per_row(model, ["a", "zz", None]):
            pass
    with pytest.raises(ValueError, match="2 adapter names for a batch of 3 rows"):
        with peftkit.per_row(model, ["a", None]):
            run(model, ids)
    peftkit.merge(model, ["a"])
    with pytest.raises(RuntimeError, match="unmerged"):
        with peftkit.per_row(model, ["a", "b", None]):
            pass
