"""LoraConfig validation and PEFT dict form; target selection by PEFT's rules; clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_mlp

import peftkit
from peftkit.methods.lora import LoraConfig
from peftkit.targeting import select_targets


def names(model, **kw):
    return [n for n, _ in select_targets(model, LoraConfig(**kw))]


def test_list_entries_match_whole_name_or_suffix():
    got = names(tiny_llama(), target_modules=["q_proj", "mlp.up_proj"])
    assert got == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                   "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        names(tiny_llama(), target_modules=["proj"])


def test_regex_must_fullmatch():
    assert names(tiny_llama(), target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        names(tiny_llama(), target_modules=r"q_proj")  # a regex must match the whole name


def test_all_linear_skips_the_output_head_and_includes_conv1d():
    llama = names(tiny_llama(), target_modules="all-linear")
    assert len(llama) == 2 * 7 and "lm_head" not in llama
    gpt2 = names(tiny_gpt2(), target_modules="all-linear")
    assert len(gpt2) == 2 * 4 and "lm_head" not in gpt2


def test_exclude_layers_and_modules_to_save():
    got = names(tiny_llama(), target_modules="all-linear", exclude_modules=["o_proj", "mlp"],
                layers_to_transform=[1])
    # "mlp" excludes nothing (no module is named "...mlp" that is linear): exclusion is by name, not subtree
    assert got == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                   "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.gate_proj",
                   "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert names(tiny_mlp(), target_modules=["fc1", "fc2"], modules_to_save=["fc2"]) == ["fc1"]


def test_no_match_error_names_patterns_and_existing_modules():
    with pytest.raises(ValueError) as err:
        peftkit.inject(tiny_llama(), LoraConfig(target_modules=["query", "value"]))
    msg = str(err.value)
    assert "['query', 'value']" in msg or "('query', 'value')" in msg
    assert "q_proj" in msg and "self_attn" in msg


def test_unsupported_module_type_is_named():
    with pytest.raises(ValueError, match=r"model.norm \(LlamaRMSNorm\)"):
        peftkit.inject(tiny_llama(), LoraConfig(target_modules=["norm"]))


def test_default_targets_by_model_type_and_error_without_one():
    model = peftkit.inject(tiny_llama(), LoraConfig())
    assert {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, peftkit.LoraLayer)} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="no default for model type None"):
        peftkit.inject(tiny_mlp(), LoraConfig())


def test_rank_alpha_patterns_and_rslora_scaling():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\..*": 2},
                     use_rslora=True)
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(16 / math.sqrt(8))
    assert cfg.scaling_for("model.layers.1.self_attn.q_proj") == pytest.approx(2 / math.sqrt(8))
    assert LoraConfig(r=8, lora_alpha=16).scaling_for("x") == 2.0


@pytest.mark.parametrize("bad, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(lora_dropout=1.5), "lora_dropout"),
    (dict(bias="some"), "bias must be one of"),
    (dict(init_lora_weights="olora"), "init_lora_weights"),
    (dict(target_modules="(unclosed"), "not a valid regex"),
])
def test_bad_config_values_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**bad)


def test_peft_dict_roundtrip_ignores_unknown_keys():
    cfg = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q": 2}, modules_to_save=["lm_head"])
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["target_modules"] == ["q_proj"]
    d["some_future_field"] = {"x": 1}
    assert LoraConfig.from_peft_dict(d) == cfg
    with pytest.raises(ValueError, match="BOFT"):  # a peft_type no registered method reads
        peftkit.registry.config_from_peft_dict({"peft_type": "BOFT"})
    assert peftkit.registry.config_from_peft_dict({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 5}
                                                 ).num_virtual_tokens == 5
    with pytest.raises(ValueError, match="layer_replication"):
        LoraConfig.from_peft_dict({**d, "layer_replication": [[0, 1]]})


def test_gaussian_and_pissa_inits():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 5))
    base = model(ids).logits.detach()
    peftkit.inject(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].std().item() == pytest.approx(1 / 4, rel=0.3)
    assert torch.equal(model(ids).logits, base)

    model = tiny_llama()
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peftkit.inject(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    layer = model.model.layers[0].self_attn.q_proj
    # the residual base plus the principal adapter is the original weight, and the output is unchanged
    torch.testing.assert_close(layer.base.weight + layer.delta_weight("default"), W, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids).logits, base, atol=1e-5, rtol=0)
    assert layer.lora_B["default"].abs().sum() > 0


def test_adapter_names_are_checked():
    with pytest.raises(ValueError, match="not a plain name"):
        peftkit.inject(tiny_mlp(), LoraConfig(target_modules=["fc1"]), name="../x")
    model = peftkit.inject(tiny_mlp(), LoraConfig(target_modules=["fc1"]))
    with pytest.raises(ValueError, match="already exists"):
        peftkit.inject(model, LoraConfig(target_modules=["fc1"]))
