"""The property checklist of shared/DESIGN.md, on a tiny MLP, a tiny Llama and a tiny GPT-2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import inputs, nonzero_adapter, run

import peftkit
from peftkit.methods.lora import lora_layers
from peftkit.methods.lora import LoraLayer


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_adapter_changes_output(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    base = run(model, ids)
    nonzero_adapter(model, targets)
    assert not torch.allclose(run(model, ids), base, atol=1e-3)


def test_default_init_is_a_noop_until_trained(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    base = run(model, ids)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=targets))
    assert torch.equal(run(model, ids), base)


def test_merged_equals_unmerged_and_unmerge_restores(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    nonzero_adapter(model, targets)
    unmerged = run(model, ids)
    peftkit.merge(model)
    assert peftkit.merged_adapters(model) == ["default"]
    merged = run(model, ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    before_second = base_state(model)
    peftkit.merge(model)  # merging twice changes nothing
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_second[k]), k
    peftkit.unmerge(model)
    for path, layer in lora_layers(model):
        for pname, p in layer.base.named_parameters():
            torch.testing.assert_close(p, plain[f"{path}.{pname}"], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, ids), unmerged, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_nan_and_leaves_weights_bit_identical(model_case):
    name, builder, targets = model_case
    model = builder()
    nonzero_adapter(model, targets)
    layers = [l for _, l in lora_layers(model)]
    with torch.no_grad():
        layers[-1].lora_B["default"][0, 0] = float("nan")
    before = base_state(model)
    with pytest.raises(ValueError, match="safe merge refused") as err:
        peftkit.merge(model, safe=True)
    assert "adapter 'default'" in str(err.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or (torch.isnan(v).any() and "lora_B" in k), k
    assert peftkit.merged_adapters(model) == []


def test_save_load_roundtrip_identical(model_case, tmp_path):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    nonzero_adapter(model, targets)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    fresh = builder()
    peftkit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(run(fresh, ids), expected)
    assert peftkit.trainable_parameters(fresh)[0] == 0  # trainable=False by default


def test_only_adapter_parameters_train(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    nonzero_adapter(model, targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model.train()
    out = model(ids)
    (out if isinstance(out, torch.Tensor) else out.logits).pow(2).mean().backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    t, total = peftkit.trainable_parameters(model)
    assert t == sum(p.numel() for n, p in model.named_parameters() if n in trainable) and t < total


def test_disable_gives_base_exactly_and_enable_restores(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    base = run(model, ids)
    nonzero_adapter(model, targets)
    adapted = run(model, ids)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, ids), base)
    assert torch.equal(run(model, ids), adapted)
    peftkit.merge(model)
    merged = run(model, ids)
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(run(model, ids), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(model, ids), merged, atol=1e-5, rtol=1e-5)


def test_mixed_batch_equals_each_row_alone(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name, batch=5)
    nonzero_adapter(model, targets, "a", seed=1)
    nonzero_adapter(model, targets[:2], "b", seed=2, r=2)
    rows = ["a", None, "b", "a", "b"]
    with peftkit.per_row(model, rows):
        mixed = run(model, ids)
    for i, adapter in enumerate(rows):
        if adapter is None:
            with peftkit.disable_adapters(model):
                alone = run(model, ids[i:i + 1])
        else:
            peftkit.set_active(model, [adapter])
            alone = run(model, ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)


def test_wrong_base_names_every_key_and_changes_nothing(tmp_path):
    from conftest import tiny_llama
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama()
    nonzero_adapter(model, ["q_proj", "v_proj"])
    peftkit.save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = copy.deepcopy(other.state_dict())
    modules_before = [n for n, _ in other.named_modules()]
    with pytest.raises(ValueError) as err:
        peftkit.load_adapter(other, tmp_path / "a")
    msg = str(err.value)
    assert "nothing was changed" in msg
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            assert f"model.layers.{layer}.self_attn.{proj}.lora_A.weight: file (4, 32)" in msg
    assert "model.layers.2.self_attn.q_proj.lora_A.weight" in msg  # missing in the file
    assert [n for n, _ in other.named_modules()] == modules_before
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert not hasattr(other, "peftkit_configs") or not other.peftkit_configs


def test_pickle_is_never_unpickled_without_opt_in(tmp_path):
    from conftest import tiny_mlp

    model = tiny_mlp()
    nonzero_adapter(model, ["fc1"])
    peftkit.save_adapter(model, tmp_path / "a")
    tensors = peftkit.read_adapter(tmp_path / "a")[1]
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model." + k: v for k, v in tensors.items()}, tmp_path / "a" / "adapter_model.bin")
    fresh = tiny_mlp()
    with pytest.raises(ValueError, match="allow_pickle=True"):
        peftkit.load_adapter(fresh, tmp_path / "a")
    assert not any(isinstance(m, LoraLayer) for m in fresh.modules())
    peftkit.load_adapter(fresh, tmp_path / "a", allow_pickle=True)
    ids = inputs("mlp")
    assert torch.equal(run(fresh, ids), run(model, ids))


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    from conftest import tiny_mlp

    model = tiny_mlp()
    nonzero_adapter(model, ["fc1"])
    peftkit.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        peftkit.load_adapter(tiny_mlp(), tmp_path / "a")


def test_merge_and_unload_leaves_no_trace(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    plain_types = {n: type(m) for n, m in model.named_modules()}
    nonzero_adapter(model, targets)
    adapted = run(model, ids)
    out = peftkit.merge_and_unload(model)
    assert out is model
    assert {n: type(m) for n, m in model.named_modules()} == plain_types
    assert "peftkit_configs" not in model.__dict__
    assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(run(model, ids), adapted, atol=1e-5, rtol=1e-5)


def test_deepcopy_and_pickle_keep_each_copy_on_its_own_weights(tmp_path):
    """Merged layers call their base directly; copies must call THEIR base, not the original's."""
    from conftest import tiny_llama

    model, ids = tiny_llama(), inputs("llama")
    nonzero_adapter(model, ["q_proj", "v_proj"])
    adapted = run(model, ids)
    peftkit.merge(model)
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    restored = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    for other in (clone, restored):
        torch.testing.assert_close(run(other, ids), adapted, atol=1e-5, rtol=0)
        peftkit.unmerge(other)
        torch.testing.assert_close(run(other, ids), adapted, atol=1e-5, rtol=0)
