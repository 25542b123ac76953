"""VeRA: the method checklist on tiny Llama and GPT-2 models, HF PEFT in both directions (with and without the
projections in the file), several adapters, hostile files, the CLI (train, plan, sweep) and the registry."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import LazyImport, inputs, nonzero_adapter, run, tiny_gpt2, tiny_llama, tiny_mlp
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.methods.vera import VeraConfig, VeraLayer, VeraProjections, vera_layers
from peftkit.methods.vera.projection import draw
from peftkit.methods.vera.targets import default_targets
from peftkit.plan import memory, presets

peft = LazyImport("peft", optional=True)
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
# (max in, max out) over TARGETS: llama q (32->32), v (32->16), down (64->32); gpt2 c_attn (32->96), c_proj (32->32,
# 128->32)
LARGEST = {"llama": (64, 32), "gpt2": (128, 96)}


def randomize(model, name: str = "default", seed: int = 0) -> None:
    """Non-zero vectors, so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in vera_layers(model):
            if name in layer.vera_lambda_b:
                for p in layer.adapter_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=gen))


def with_adapter(family: str = "llama", name: str = "default", seed: int = 0, **kw):
    model = BUILDERS[family]()
    kw = {"r": 8, "target_modules": TARGETS[family]} | kw
    peftkit.inject(model, VeraConfig(**kw), name)
    randomize(model, name, seed)
    return model


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "vera_lambda" not in k}


def file_keys(folder) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


# --- identity at init, the projections, the forward ---------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fresh_adapter_is_exact_identity_and_nonzero_changes_output(family):
    model, ids = BUILDERS[family](), inputs(family)
    base = run(model, ids)
    peftkit.inject(model, VeraConfig(r=8, target_modules=TARGETS[family]))
    assert torch.equal(run(model, ids), base)
    layers = dict(vera_layers(model))
    assert len(layers) == 6 and len({id(layer.projections) for layer in layers.values()}) == 1
    layer = next(iter(layers.values()))
    assert torch.equal(layer.vera_lambda_b["default"], torch.zeros(layer.out_features))
    assert torch.equal(layer.vera_lambda_d["default"], torch.full((8,), 0.1))
    vera_a, vera_b = layer.projections.pair("default")
    assert (tuple(vera_a.shape), tuple(vera_b.shape)) == ((8, LARGEST[family][0]), (LARGEST[family][1], 8))
    randomize(model)
    assert not torch.allclose(run(model, ids), base, atol=1e-3)


def test_projections_are_hf_peft_s_bit_for_bit():
    for key, r, targets in ((0, 8, TARGETS["llama"]), (1234, 16, "all-linear")):
        theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=r, target_modules=targets,
                                                                    projection_prng_key=key))
        ours = peftkit.inject(tiny_llama(), VeraConfig(r=r, target_modules=targets, projection_prng_key=key))
        projections = next(vera_layers(ours))[1].projections
        assert torch.equal(projections.pair("default")[0], theirs.base_model.vera_A["default"])
        assert torch.equal(projections.pair("default")[1], theirs.base_model.vera_B["default"])
    a, b = draw(7, 4, 10, 12)
    assert torch.equal(a, draw(7, 4, 10, 12)[0]) and not torch.equal(a, draw(8, 4, 10, 12)[0])
    assert a.abs().max() <= (6 / 10) ** 0.5 and b.abs().max() <= (6 / 4) ** 0.5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_layer_computes_lambda_b_times_sliced_b_of_lambda_d_times_sliced_a(family):
    model = with_adapter(family)
    path, layer = next(vera_layers(model))
    x = torch.randn(2, 3, layer.in_features)
    vera_a, vera_b = layer.projections.pair("default")
    lb, ld = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    want = layer.base(x) + lb * ((ld * (x @ vera_a[:, :layer.in_features].T)) @ vera_b[:layer.out_features].T)
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)


# --- merging ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_equals_unmerged_unmerge_restores_and_merging_twice_changes_nothing(family):
    model, ids = with_adapter(family, target_modules="all-linear"), inputs(family)
    before = base_state(model)
    adapted = run(model, ids)
    peftkit.merge(model)
    assert peftkit.merged_adapters(model) == ["default"]
    torch.testing.assert_close(run(model, ids), adapted, atol=1e-5, rtol=0)
    once = base_state(model)
    assert any(not torch.equal(once[k], before[k]) for k in before)
    peftkit.merge(model)
    assert all(torch.equal(v, once[k]) for k, v in base_state(model).items())
    peftkit.unmerge(model)
    for k, v in base_state(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(run(model, ids), adapted, atol=1e-5, rtol=0)


def test_safe_merge_refuses_nan_and_changes_nothing():
    model = with_adapter()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.vera_lambda_b["default"][3] = float("nan")
    before = base_state(model)
    with pytest.raises(ValueError, match=r"safe merge refused.*model\.layers\.1\.self_attn\.v_proj \(adapter 'default'\)"):
        peftkit.merge(model, safe=True)
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
    assert not peftkit.merged_adapters(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_leaves_plain_modules_with_the_adapted_outputs(family):
    model, ids = with_adapter(family), inputs(family)
    adapted = run(model, ids)
    merged = peftkit.merge_and_unload(model)
    assert not any(isinstance(m, (VeraLayer, VeraProjections)) for m in merged.modules())
    assert not getattr(merged, "peftkit_configs", {})
    assert set(merged.state_dict()) == set(BUILDERS[family]().state_dict())
    torch.testing.assert_close(run(merged, ids), adapted, atol=1e-5, rtol=0)


def test_nf4_base_merges_and_unloads():
    model, ids = peftkit.quantize(tiny_llama()), inputs("llama")
    base = run(model, ids)
    peftkit.inject(model, VeraConfig(r=8, target_modules="all-linear"))
    assert torch.equal(run(model, ids), base)
    randomize(model)
    adapted = run(model, ids)
    merged = peftkit.merge_and_unload(model, dtype=torch.float32)  # dequantized first: exact
    assert isinstance(merged.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(run(merged, ids), adapted, atol=1e-4, rtol=0)


# --- training -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_changes_output_and_only_the_vectors_train(family):
    model, ids = BUILDERS[family](), inputs(family)
    peftkit.inject(model, VeraConfig(r=8, target_modules=TARGETS[family]))
    before = run(model, ids)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    projections = [b.clone() for b in next(vera_layers(model))[1].projections.pair("default")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 12 and all(n.endswith((".vera_lambda_b.default", ".vera_lambda_d.default"))
                                        for n in trainable)
    assert peftkit.trainable_parameters(model)[0] == sum(l.out_features + 8 for _, l in vera_layers(model))
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
    after = next(vera_layers(model))[1].projections.pair("default")
    assert all(torch.equal(a, b) for a, b in zip(after, projections))
    assert not torch.allclose(run(model, ids), before, atol=1e-4)


def test_dropout_applies_in_training_only():
    model, ids = with_adapter(vera_dropout=0.5), inputs("llama")
    model.eval()
    assert torch.equal(run(model, ids), run(model, ids))
    model.train()
    assert not torch.equal(run(model, ids), run(model, ids))


# --- save / load ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_round_trip_is_identical(family, save_projection, tmp_path):
    model, ids = with_adapter(family, save_projection=save_projection), inputs(family)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is save_projection
    assert config["fan_in_fan_out"] == (family == "gpt2") and config["r"] == 8
    keys = file_keys(tmp_path)
    lambdas = {k: s for k, s in keys.items() if k.startswith("base_model.model.")}
    assert len(lambdas) == 12 and all(k.endswith((".vera_lambda_b", ".vera_lambda_d")) for k in lambdas)
    projection = {"base_model.vera_A": (8, LARGEST[family][0]), "base_model.vera_B": (LARGEST[family][1], 8)}
    assert {k: s for k, s in keys.items() if k not in lambdas} == (projection if save_projection else {})
    assert set(peftkit.adapter_state_dict(model)) == set(keys)
    fresh = peftkit.load_adapter(BUILDERS[family](), tmp_path)
    assert torch.equal(run(fresh, ids), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.equal(run(copy.deepcopy(fresh), ids), expected)
    again = peftkit.load_adapter(BUILDERS[family](), tmp_path, name="task", trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n in dict(again.named_parameters()) if n.endswith((".vera_lambda_b.task", ".vera_lambda_d.task"))}


def test_saved_projections_are_used_even_when_the_key_would_draw_others(tmp_path):
    """save_projection=True: the file's matrices are the adapter's (e.g. drawn on another platform)."""
    model, ids = with_adapter(), inputs("llama")
    with torch.no_grad():
        next(vera_layers(model))[1].projections.pair("default")[0].mul_(2)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path)
    torch.testing.assert_close(run(peftkit.load_adapter(tiny_llama(), tmp_path), ids), expected, atol=0, rtol=0)


# --- HF PEFT, both directions ------------------------------------------------------------------------------
PEFT_CASES = {
    "llama": ("llama", dict(target_modules=TARGETS["llama"])),
    "llama-all-linear-key-7": ("llama", dict(target_modules="all-linear", projection_prng_key=7)),
    "gpt2": ("gpt2", dict(target_modules=TARGETS["gpt2"])),
}


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peftkit_adapter_loads_in_hf_peft_with_the_same_keys_and_logits(case, save_projection, tmp_path):
    family, kw = PEFT_CASES[case]
    model, ids = with_adapter(family, save_projection=save_projection, **kw), inputs(family)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about save_projection=False
        theirs = peft.PeftModel.from_pretrained(BUILDERS[family](), tmp_path).eval()
    torch.testing.assert_close(run(theirs, ids), expected, atol=1e-5, rtol=0)
    assert set(peft.get_peft_model_state_dict(theirs)) == set(file_keys(tmp_path))


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_hf_peft_adapter_loads_in_peftkit(case, save_projection, tmp_path):
    family, kw = PEFT_CASES[case]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(BUILDERS[family](), peft.VeraConfig(
            r=8, init_weights=False, save_projection=save_projection, **kw)).eval()
    ids = inputs(family)
    expected = run(theirs, ids)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(BUILDERS[family](), tmp_path)
    torch.testing.assert_close(run(ours, ids), expected, atol=1e-5, rtol=0)
    assert set(peftkit.adapter_state_dict(ours)) == set(file_keys(tmp_path))


def test_a_second_hf_peft_adapter_with_the_shared_projection_loads_in_peftkit(tmp_path):
    """PEFT gives a later adapter the first one's projections; its file then carries that pair."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=8, target_modules=TARGETS["llama"],
                                                                init_weights=False))
    theirs.add_adapter("other", peft.VeraConfig(r=8, target_modules=TARGETS["llama"], init_weights=False))
    theirs.eval()
    ids = inputs("llama")
    outputs = {}
    for name in ("default", "other"):
        theirs.set_adapter(name)
        outputs[name] = run(theirs, ids)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(tiny_llama(), tmp_path)
    peftkit.load_adapter(ours, tmp_path, name="other")
    for name in ("default", "other"):
        peftkit.set_active(ours, name)
        torch.testing.assert_close(run(ours, ids), outputs[name], atol=1e-5, rtol=0)


def test_default_targets_are_hf_peft_s():
    from peft.utils import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING as TABLE

    for model_type, targets in TABLE.items():
        found = default_targets(model_type)
        assert (found if isinstance(found, str) else list(found)) == targets, model_type
    model = peftkit.inject(tiny_llama(), VeraConfig(r=4))
    assert [p.rsplit(".", 1)[-1] for p, _ in vera_layers(model)][:2] == ["q_proj", "v_proj"]


# --- several adapters: projections, switching, disabling, per-row, deleting --------------------------------
def two_adapters():
    """'a': r=8 on q, v, down; 'b': r=4, another key, on every linear (so its projections are larger)."""
    model = with_adapter(name="a", seed=1)
    peftkit.inject(model, VeraConfig(r=4, target_modules="all-linear", projection_prng_key=5), "b")
    randomize(model, "b", seed=2)
    return model


def test_each_adapter_has_its_own_projections_in_one_shared_module():
    model = two_adapters()
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, VeraLayer) and not isinstance(q.base, VeraLayer)
    assert {len(layer.adapter_names()) for _, layer in vera_layers(model)} == {1, 2}
    assert len({id(layer.projections) for _, layer in vera_layers(model)}) == 1
    shapes = {n: tuple(tuple(t.shape) for t in q.projections.pair(n)) for n in ("a", "b")}
    assert shapes == {"a": ((8, 64), (32, 8)), "b": ((4, 64), (64, 4))}
    assert [n for n, _ in model.named_buffers() if "vera_" in n] == [
        "model.layers.0.self_attn.q_proj.projections.vera_A_a", "model.layers.0.self_attn.q_proj.projections.vera_B_a",
        "model.layers.0.self_attn.q_proj.projections.vera_A_b", "model.layers.0.self_attn.q_proj.projections.vera_B_b"]
    assert not any("projections" in k for k in model.state_dict())


def test_set_active_and_disable_adapters():
    model, ids = two_adapters(), inputs("llama")
    base = run(tiny_llama(), ids)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, ids), base)
    assert peftkit.active_adapters(model) == ["b"]
    b = run(model, ids)
    peftkit.set_active(model, "a")
    a = run(model, ids)
    assert not torch.allclose(a, b, atol=1e-3)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, ids), base)
    assert torch.equal(run(model, ids), a)
    peftkit.set_active(model, ["a", "b"])  # both: their terms add
    both = run(model, ids)
    assert not torch.allclose(both, a, atol=1e-3)
    peftkit.merge(model)
    torch.testing.assert_close(run(model, ids), both, atol=1e-5, rtol=0)
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(run(model, ids), base, atol=1e-5, rtol=0)
    peftkit.unmerge(model)
    peftkit.set_active(model, [])
    torch.testing.assert_close(run(model, ids), base, atol=1e-5, rtol=0)


def test_per_row_mixed_batch_equals_each_row_alone():
    model, ids = two_adapters(), inputs("llama", batch=4)
    rows = ["a", None, "b", "a"]
    with peftkit.per_row(model, rows):
        mixed = run(model, ids)
    for i, adapter in enumerate(rows):
        peftkit.set_active(model, [] if adapter is None else [adapter])
        torch.testing.assert_close(mixed[i:i + 1], run(model, ids[i:i + 1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="per_row got 2 adapter names for a batch of 4 rows"), \
            peftkit.per_row(model, ["a", "b"]):
        run(model, ids)


def test_delete_adapter_drops_its_projections_and_the_last_one_restores_plain_modules():
    model, ids = two_adapters(), inputs("llama")
    b = run(model, ids)
    peftkit.delete_adapter(model, "a")
    assert list(model.peftkit_configs) == ["b"]
    assert next(vera_layers(model))[1].projections.names == ["b"]
    assert torch.equal(run(model, ids), b)
    peftkit.delete_adapter(model, "b")
    assert not any(isinstance(m, (VeraLayer, VeraProjections)) for m in model.modules())
    assert torch.equal(run(model, ids), run(tiny_llama(), ids))


def test_vera_and_lora_share_a_model_but_not_a_module():
    model, ids = tiny_llama(), inputs("llama")
    nonzero_adapter(model, ["q_proj"], "lora")
    peftkit.inject(model, VeraConfig(r=4, target_modules=["v_proj"]), "vera")
    randomize(model, "vera")
    rows = ["lora", "vera", None]
    with peftkit.per_row(model, rows):
        mixed = run(model, ids)
    for i, adapter in enumerate(rows):
        peftkit.set_active(model, [] if adapter is None else [adapter])
        torch.testing.assert_close(mixed[i:i + 1], run(model, ids[i:i + 1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"q_proj \(LoraLayer\) is already wrapped by another peftkit adapter"):
        peftkit.inject(model, VeraConfig(r=4, target_modules=["q_proj"]), "vera2")
    with pytest.raises(ValueError, match=r"cannot wrap: .*v_proj \(VeraLayer\)"):
        nonzero_adapter(model, ["v_proj"], "lora2")
    assert set(model.peftkit_configs) == {"lora", "vera"}


# --- hostile files and wrong bases -----------------------------------------------------------------------
def test_wrong_shapes_are_named_and_nothing_changes(tmp_path):
    peftkit.save_adapter(with_adapter(), tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_b"] = torch.zeros(17)
    tensors["base_model.model.model.layers.0.mlp.down_proj.vera_lambda_d"] = torch.zeros(9)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model, ids = tiny_llama(), inputs("llama")
    before = run(model, ids)
    with pytest.raises(ValueError) as err:
        peftkit.load_adapter(model, tmp_path)
    msg = str(err.value)
    assert "nothing was changed" in msg and "2 key(s) with wrong shapes" in msg
    assert "model.layers.1.self_attn.v_proj.vera_lambda_b: file (17,), model expects (16,)" in msg
    assert "model.layers.0.mlp.down_proj.vera_lambda_d: file (9,), model expects (8,) (r,) with the config's r=8" in msg
    assert not list(vera_layers(model)) and not getattr(model, "peftkit_configs", {})
    assert torch.equal(run(model, ids), before)


def test_a_projection_too_small_for_the_model_is_named(tmp_path):
    peftkit.save_adapter(with_adapter(), tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :32].contiguous()
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"base_model\.vera_A: file \(8, 32\), model expects \(8, 64\) \(r, largest "
                                         r"in_features among the targets\): the shared projection must cover 64"):
        peftkit.load_adapter(model, tmp_path)
    assert not list(vera_layers(model))
    del tensors["base_model.vera_B"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"(?s)1 key\(s\) the model needs but the file lacks:\n  base_model\.vera_B"):
        peftkit.load_adapter(model, tmp_path)


def test_wrong_base_names_every_key_and_changes_nothing(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    peftkit.save_adapter(with_adapter(), tmp_path)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError) as err:
        peftkit.load_adapter(wide, tmp_path)
    msg = str(err.value)
    assert "base_model.vera_B: file (32, 8), model expects (48, 8)" in msg
    assert "model.layers.0.self_attn.q_proj.vera_lambda_b: file (32,), model expects (48,)" in msg
    assert not list(vera_layers(wide))
    with pytest.raises(ValueError, match=r"(?s)matched no module.*14 unexpected key\(s\)"):
        peftkit.load_adapter(tiny_gpt2(), tmp_path)


def test_a_file_with_projections_but_save_projection_false_warns_and_draws_them(tmp_path):
    model, ids = with_adapter(save_projection=False), inputs("llama")
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    a, b = draw(0, 8, 64, 32)
    save_file(tensors | {"base_model.vera_A": a * 3, "base_model.vera_B": b}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match="save_projection=false: they are ignored"):
        fresh = peftkit.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(run(fresh, ids), expected)


# --- config and errors -------------------------------------------------------------------------------------
def test_config_validation_names_unsupported_options_and_json_round_trips():
    for kw, match in ((dict(bias="vera_only"), "bias='vera_only' is not supported for VeRA"),
                      (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] is not supported for VeRA"),
                      (dict(r=0), "r must be a positive integer"),
                      (dict(projection_prng_key=1.5), "projection_prng_key must be an integer seed"),
                      (dict(vera_dropout=1.0), r"vera_dropout must be in \[0, 1\)"),
                      (dict(d_initial=float("nan")), "d_initial must be a finite number"),
                      (dict(layers_pattern="layers"), "layers_pattern is set but layers_to_transform is not"),
                      (dict(target_modules="(unclosed"), "target_modules.*not a valid regex"),
                      (dict(save_projection="yes"), "save_projection must be true or false")):
        with pytest.raises(ValueError, match=match):
            VeraConfig(**kw)
    config = VeraConfig(r=16, target_modules={"v_proj", "q_proj"}, layers_to_transform=1, save_projection=False)
    assert config.target_modules == ("q_proj", "v_proj") and config.layers_to_transform == (1,)
    data = config.to_peft_dict()
    assert data["peft_type"] == "VERA" and data["layers_to_transform"] == [1] and data["d_initial"] == 0.1
    assert peftkit.registry.config_from_peft_dict(data | {"future_field": 1, "layers_to_transform": 1}) == config
    with pytest.raises(ValueError, match="this reads 'VERA'"):
        VeraConfig.from_peft_dict({"peft_type": "LORA"})
    with pytest.raises(ValueError, match="exclude_modules=.*VeRA configs do not have"):
        VeraConfig.from_peft_dict(data | {"exclude_modules": ["q_proj"]})
    assert set(data) - {"inference_mode"} <= set(peft.VeraConfig.__dataclass_fields__)


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match=r"no VeRA default for model type None"):
        peftkit.inject(tiny_mlp(), VeraConfig())
    with pytest.raises(ValueError, match=r"emb \(Embedding\): VeRA adapts linear layers"):
        peftkit.inject(tiny_mlp(), VeraConfig(target_modules=["emb", "fc1"]))
    with pytest.raises(ValueError, match="matched no module"):
        peftkit.inject(tiny_llama(), VeraConfig(target_modules=["nope"]))
    model = peftkit.inject(tiny_mlp(), VeraConfig(r=4, target_modules=["fc1", "fc2"]))
    assert next(vera_layers(model))[1].projections.pair("default")[1].shape == (32, 4)


def test_layers_to_transform_and_summary():
    model = peftkit.inject(tiny_llama(), VeraConfig(r=4, target_modules=TARGETS["llama"], layers_to_transform=[1]))
    assert [p for p, _ in vera_layers(model)] == [f"model.layers.1.{p}" for p in
                                                  ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert "VeRA r=4 on ['q_proj', 'v_proj', 'down_proj']" in peftkit.summary(model)
    assert "on 3 modules" in peftkit.summary(model)


# --- the CLI and the planner -------------------------------------------------------------------------------
def test_train_method_vera_saves_an_adapter_hf_peft_loads(tiny_model_dir, qa_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--method", "vera", "--model", tiny_model_dir, "--data", qa_jsonl, "--output-dir", str(out),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "0.05", "--r", "32", "--no-progress",
                 "--threads", "1", "--save-every", "0"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["target_modules"] == "all-linear" and config["r"] == 32
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), out / "adapter")
    assert any(l.vera_lambda_b["default"].abs().sum() > 0 for _, l in vera_layers(ours))  # it trained
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    torch.testing.assert_close(run(theirs.eval(), ids), run(ours, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,down_proj,up_proj"])
def test_planned_trainable_parameters_equal_what_inject_adds(targets):
    model = tiny_llama()
    shape = presets.from_config(model.config.to_dict())
    settings = memory.Settings(method="vera", r=32, targets=targets if targets == "all-linear"
                               else tuple(targets.split(",")))
    method = peftkit.registry.by_train_name("vera")
    options = type("Options", (), {"target_modules": targets, "r": 32, "lora_dropout": 0.0})()
    peftkit.inject(model, method.config_from_options(options))
    assert memory.adapter_params(shape, settings) == peftkit.trainable_parameters(model)[0]


def test_plan_and_sweep_take_method_vera(capsys):
    from peftkit.plan import sweep

    assert main(["plan", "llama-2-7b", "--method", "vera", "--r", "256", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    per_block = 4 * 4096 + 2 * 11008 + 4096 + 7 * 256  # q, k, v, o, gate, up out; down out; r each
    assert record["trainable_params"] == 32 * per_block
    assert main(["plan", "llama-2-7b", "--method", "vera", "--target-modules", "wq"]) == 2
    assert "VeRA targets ['wq'] are not linear layers" in capsys.readouterr().err
    assert sweep.parse_methods("vera,lora") == ("vera", "lora")
    assert [c.name for c in sweep.candidates(("vera",), (64, 256))] == ["vera-r64", "vera-r256"]


def test_a_huge_rank_is_refused_before_drawing_projections():
    """A file's r is checked against its tensors first (they would have to be as large); a config built in code
    is bounded here: r x (in + out) values at most."""
    import peftkit
    from conftest import tiny_llama

    with pytest.raises(ValueError, match="r=10000000 would need projections"):
        peftkit.inject(tiny_llama(), peftkit.VeraConfig(r=10**7, target_modules=["q_proj"]))
