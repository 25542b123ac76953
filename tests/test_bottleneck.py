"""Bottleneck adapters (Houlsby, Pfeiffer): the method checklist on tiny Llama and GPT-2 models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import inputs, nonzero_adapter, run, tiny_gpt2, tiny_llama, tiny_mlp
from safetensors.torch import load_file

import peftkit
from peftkit.methods.bottleneck import (
    BottleneckConfig,
    BottleneckLayer,
    bottleneck_layers,
    inject_bottleneck,
    merge_check,
    unload_bottleneck,
)
from peftkit.methods.bottleneck import (
    bottleneck_state_dict,
    load_bottleneck,
    save_bottleneck,
)

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
PLACES = {
    ("llama", "houlsby"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    ("llama", "pfeiffer"): ["model.layers.{i}.mlp.down_proj"],
    ("gpt2", "houlsby"): ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
    ("gpt2", "pfeiffer"): ["transformer.h.{i}.mlp.c_proj"],
}


def randomize(model, name: str = "default", seed: int = 0, std: float = 0.2) -> None:
    """Give adapter `name` random weights everywhere (a fresh one is an exact no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in bottleneck_layers(model):
            if name in layer.bottleneck:
                for p in layer.bottleneck[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def with_adapter(builder=tiny_llama, name: str = "default", seed: int = 0, **kw):
    model = builder()
    inject_bottleneck(model, BottleneckConfig(**kw), name)
    randomize(model, name, seed)
    return model


# --- identity at init, placement, non-zero weights -----------------------------------------------------
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fresh_adapter_is_exact_identity_and_nonzero_changes_output(family, variant):
    model, ids = BUILDERS[family](), inputs(family)
    base = run(model, ids)
    inject_bottleneck(model, BottleneckConfig(variant=variant, reduction_factor=8))
    paths = [p for p, _ in bottleneck_layers(model)]
    assert paths == [t.format(i=i) for i in range(2) for t in PLACES[family, variant]]
    assert all(layer.bottleneck["default"].down.out_features == 32 // 8 for _, layer in bottleneck_layers(model))
    assert torch.equal(run(model, ids), base)
    randomize(model)
    assert not torch.allclose(run(model, ids), base, atol=1e-3)


def test_adapter_after_o_proj_equals_adapter_after_attention_block():
    """Llama's o_proj is the attention block's last op, so both placements compute the same; the block
    returns a tuple, so this also checks that only element 0 is adapted."""
    ids = inputs("llama")
    on_proj = with_adapter(target_modules=["o_proj"])
    on_block = tiny_llama()
    inject_bottleneck(on_block, BottleneckConfig(target_modules=["self_attn"]))
    assert [p for p, _ in bottleneck_layers(on_block)] == [f"model.layers.{i}.self_attn" for i in range(2)]
    with torch.no_grad():
        for (_, a), (_, b) in zip(bottleneck_layers(on_proj), bottleneck_layers(on_block), strict=True):
            b.bottleneck.load_state_dict(a.bottleneck.state_dict())
    assert torch.equal(run(on_block, ids), run(on_proj, ids))


# --- training -------------------------------------------------------------------------------------------
def test_training_changes_output_and_only_adapter_params_train():
    model, ids = tiny_llama(), inputs("llama")
    inject_bottleneck(model, BottleneckConfig(non_linearity="gelu"))
    before = run(model, ids)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".bottleneck.default." in n for n in trainable)
    assert len(trainable) == 4 * 4  # 4 wrapped modules x {down, up} x {weight, bias}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.allclose(run(model, ids), before, atol=1e-4)


# --- save / load ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_round_trip_is_identical(family, tmp_path):
    model, ids = with_adapter(BUILDERS[family], variant="pfeiffer", reduction_factor=4), inputs(family)
    expected = run(model, ids)
    save_bottleneck(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["variant"] == "pfeiffer"
    assert config["task_type"] == "CAUSAL_LM" and config["reduction_factor"] == 4
    assert config["target_modules"] == (["down_proj"] if family == "llama" else ["mlp.c_proj"])  # resolved
    mlp_out = "model.layers.{i}.mlp.down_proj" if family == "llama" else "transformer.h.{i}.mlp.c_proj"
    keys = {f"base_model.model.{mlp_out.format(i=i)}.bottleneck.{p}.{t}"
            for i in range(2) for p in ("down", "up") for t in ("weight", "bias")}
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == keys

    fresh = BUILDERS[family]()
    load_bottleneck(fresh, tmp_path)
    assert torch.equal(run(fresh, ids), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.equal(run(copy.deepcopy(fresh), ids), expected)
    again = BUILDERS[family]()
    load_bottleneck(again, tmp_path, name="task", trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n in dict(again.named_parameters()) if ".bottleneck.task." in n}


def test_wrong_base_names_every_key_and_changes_nothing(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    save_bottleneck(with_adapter(variant="pfeiffer"), tmp_path)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = inputs("llama")
    before = run(wide, ids)
    with pytest.raises(ValueError) as err:
        load_bottleneck(wide, tmp_path)
    msg = str(err.value)
    assert "nothing was changed" in msg and "8 key(s) with wrong shapes" in msg
    for i in range(2):
        for key in ("down.weight", "down.bias", "up.weight", "up.bias"):
            assert f"model.layers.{i}.mlp.down_proj.bottleneck.{key}" in msg
    assert "file (2, 32), model expects (3, 48)" in msg
    assert not list(bottleneck_layers(wide)) and not getattr(wide, "peftkit_configs", {})
    assert torch.equal(run(wide, ids), before)

    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match=r"(?s)\('down_proj',\) matched no module.*8 unexpected key\(s\).*layers\.1\.mlp"):
        load_bottleneck(gpt2, tmp_path)
    assert not list(bottleneck_layers(gpt2))


# --- several adapters: switching, disabling, per-row, deleting ------------------------------------------
def two_adapters():
    model = with_adapter(name="a", seed=1)
    inject_bottleneck(model, BottleneckConfig(variant="pfeiffer", non_linearity="silu", reduction_factor=8), "b")
    randomize(model, "b", seed=2)
    return model


def test_set_active_and_disable_adapters():
    model, ids = two_adapters(), inputs("llama")
    base = run(tiny_llama(), ids)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, ids), base)
    assert peftkit.active_adapters(model) == ["b"]
    b = run(model, ids)
    assert not torch.allclose(b, base, atol=1e-3)
    peftkit.set_active(model, "a")
    a = run(model, ids)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, ids), base)
    assert torch.equal(run(model, ids), a)  # enabled again
    peftkit.set_active(model, ["a", "b"])  # stacked: b runs on a's output
    both = run(model, ids)
    assert not torch.allclose(both, a, atol=1e-3) and not torch.allclose(both, b, atol=1e-3)
    peftkit.set_active(model, [])
    assert torch.equal(run(model, ids), base)
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        peftkit.set_active(model, ["c"])


def test_per_row_mixed_batch_equals_each_row_alone():
    model, ids = two_adapters(), inputs("llama", batch=4)
    rows = ["a", None, "b", "a"]
    with peftkit.per_row(model, rows):
        mixed = run(model, ids)
    for i, adapter in enumerate(rows):
        peftkit.set_active(model, [] if adapter is None else [adapter])
        torch.testing.assert_close(mixed[i:i + 1], run(model, ids[i:i + 1]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)
    with pytest.raises(ValueError, match="per_row got 2 adapter names for a batch of 4 rows"), \
            peftkit.per_row(model, ["a", "b"]):
        run(model, ids)


def test_delete_adapter_and_the_last_one_restores_plain_modules():
    model, ids = two_adapters(), inputs("llama")
    peftkit.set_active(model, "b")
    b = run(model, ids)
    peftkit.delete_adapter(model, "a")
    assert list(model.peftkit_configs) == ["b"]
    assert all(layer.adapter_names() in ([], ["b"]) for _, layer in bottleneck_layers(model))  # o_proj: a only
    assert torch.equal(run(model, ids), b)
    peftkit.delete_adapter(model, "b")
    assert not any(isinstance(m, BottleneckLayer) for m in model.modules())
    assert torch.equal(run(model, ids), run(tiny_llama(), ids))


# --- merging is refused; unloading ----------------------------------------------------------------------
def test_merge_refuses_and_unload_removes_only_bottleneck_wrappers():
    model, ids = tiny_llama(), inputs("llama")
    nonzero_adapter(model, ["q_proj", "v_proj"], "lora")
    lora_only = run(model, ids)
    inject_bottleneck(model, BottleneckConfig(), "bn")
    randomize(model, "bn")
    _, layer = next(bottleneck_layers(model))
    with pytest.raises(ValueError, match=r"\['bn'\] cannot be merged"):
        layer.merge("bn")
    with pytest.raises(ValueError, match="non-linearity"):
        merge_check(model)
    merge_check(model, ["lora"])  # LoRA adapters pass
    unload_bottleneck(model)
    assert not list(bottleneck_layers(model)) and list(model.peftkit_configs) == ["lora"]
    peftkit.set_active(model, "lora")
    assert torch.equal(run(model, ids), lora_only)
    unload_bottleneck(tiny_mlp())  # nothing to do is fine


def test_lora_and_bottleneck_share_a_model():
    model, ids = tiny_llama(), inputs("llama")
    nonzero_adapter(model, ["q_proj", "v_proj"], "lora")
    lora_keys = set(peftkit.adapter_state_dict(model, "lora"))
    inject_bottleneck(model, BottleneckConfig(), "bn")
    randomize(model, "bn")
    assert set(peftkit.adapter_state_dict(model, "lora")) == lora_keys  # LoRA's paths did not move
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".bottleneck.bn." in n}
    peftkit.set_trainable(model, "lora")
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    rows = ["lora", "bn", None]
    with peftkit.per_row(model, rows):
        mixed = run(model, ids)
    for i, adapter in enumerate(rows):
        peftkit.set_active(model, [] if adapter is None else [adapter])
        torch.testing.assert_close(mixed[i:i + 1], run(model, ids[i:i + 1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj \(LoraLayer\) is already wrapped"):
        inject_bottleneck(model, BottleneckConfig(target_modules=["q_proj"]), "bn2")


# --- errors ---------------------------------------------------------------------------------------------
def test_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match=r"variant must be one of \('houlsby', 'pfeiffer'\), got 'parallel'"):
        BottleneckConfig(variant="parallel")
    with pytest.raises(ValueError, match=r"non_linearity must be one of \('relu', 'gelu', 'silu'\), got 'tanh'"):
        BottleneckConfig(non_linearity="tanh")
    for bad in (0, -2, True, "16"):
        with pytest.raises(ValueError, match="reduction_factor must be a positive number"):
            BottleneckConfig(reduction_factor=bad)
    with pytest.raises(ValueError, match="all-linear"):
        BottleneckConfig(target_modules="all-linear")
    config = BottleneckConfig(variant="pfeiffer", reduction_factor=4, non_linearity="gelu", target_modules=["mlp"])
    d = config.to_peft_dict()
    assert d["peft_type"] == "BOTTLENECK" and d["target_modules"] == ["mlp"]
    assert BottleneckConfig.from_peft_dict(json.loads(json.dumps({**d, "some_future_key": 1}))) == config
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        BottleneckConfig.from_peft_dict({**d, "peft_type": "LORA"})
    with pytest.raises(TypeError, match="expects a BottleneckConfig"):
        inject_bottleneck(tiny_mlp(), peftkit.LoraConfig(target_modules=["fc1"]))


def test_bad_targets_name_the_module_and_the_problem():
    model, ids = tiny_llama(), inputs("llama")
    with pytest.raises(ValueError, match=r"self_attn\.k_proj \(Linear\) outputs 16 features, not the model's "
                                         r"hidden size 32"):
        inject_bottleneck(model, BottleneckConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"matched no module\. Module names in this model include: model, "):
        inject_bottleneck(model, BottleneckConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"mlp\.down_proj \(Linear\) is inside model\.layers\.0\.mlp"):
        inject_bottleneck(model, BottleneckConfig(target_modules=r".*\.(mlp|down_proj)"))
    with pytest.raises(ValueError, match=r"hidden size 32 // reduction_factor 64 is 0"):
        inject_bottleneck(model, BottleneckConfig(reduction_factor=64))
    assert not list(bottleneck_layers(model)) and not model.peftkit_configs  # nothing changed

    # a module whose output is not the hidden states is caught when it runs, naming it
    inject_bottleneck(model, BottleneckConfig(target_modules=["rotary_emb"]))
    with pytest.raises(ValueError, match=r"'model\.rotary_emb': the module's output has shape \(1, 7, 8\)"):
        run(model, ids)

    mlp = tiny_mlp()
    with pytest.raises(ValueError, match="no houlsby default for model type None"):
        inject_bottleneck(mlp, BottleneckConfig())
    with pytest.raises(ValueError, match=r"act \(GELU\): its output size is unknown"):
        inject_bottleneck(mlp, BottleneckConfig(target_modules=["act"]))
    inject_bottleneck(mlp, BottleneckConfig(target_modules=["fc1"], reduction_factor=4))  # no config: out_features
    assert next(bottleneck_layers(mlp))[1].bottleneck["default"].down.weight.shape == (8, 32)


def test_adapter_names_and_duplicates():
    model = tiny_llama()
    inject_bottleneck(model, BottleneckConfig(), "x")
    with pytest.raises(ValueError, match="adapter 'x' already exists"):
        inject_bottleneck(model, BottleneckConfig(), "x")
    with pytest.raises(ValueError, match="not a plain name"):
        inject_bottleneck(model, BottleneckConfig(), "a.b")
    assert bottleneck_state_dict(model, "x").keys()


# --- the generic API (inject, set_trainable, merge, summary, save/load) on bottleneck adapters ---
def test_set_trainable_picks_bottleneck_parameters():
    model = two_adapters()
    peftkit.set_trainable(model, "a")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".bottleneck.a." in n}


def test_peftkit_merge_refuses_bottleneck():
    with pytest.raises(ValueError, match="cannot be merged"):
        peftkit.merge(with_adapter())


def test_summary_describes_bottleneck():
    assert "bottleneck" in peftkit.summary(with_adapter())


def test_generic_api_dispatches_to_bottleneck(tmp_path):
    model, ids = tiny_llama(), inputs("llama")
    peftkit.inject(model, BottleneckConfig(variant="pfeiffer"))
    randomize(model)
    expected = run(model, ids)
    assert set(peftkit.adapter_state_dict(model)) == set(bottleneck_state_dict(model))
    peftkit.save_adapter(model, tmp_path)
    fresh = tiny_llama()
    peftkit.load_adapter(fresh, tmp_path)
    assert isinstance(fresh.peftkit_configs["default"], BottleneckConfig)
    assert torch.equal(run(fresh, ids), expected)
