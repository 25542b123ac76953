"""IA3 ((IA)^3): the method checklist on tiny Llama and GPT-2 models, HF PEFT in both directions, NF4 bases,
the CLI (train, plan) and the registry."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import LazyImport, inputs, nonzero_adapter, run, tiny_gpt2, tiny_llama, tiny_mlp
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.hf.arch import IA3_DEFAULT_TARGETS
from peftkit.methods.ia3 import IA3Config, IA3Layer, ia3_layers
from peftkit.plan import memory, presets

peft = LazyImport("peft", optional=True)
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# default placements: (path, ia3_l shape) per layer i; feedforward targets hold (1, in)
PLACES = {
    "llama": [("model.layers.{i}.self_attn.k_proj", (16, 1)), ("model.layers.{i}.self_attn.v_proj", (16, 1)),
              ("model.layers.{i}.mlp.down_proj", (1, 64))],
    "gpt2": [("transformer.h.{i}.attn.c_attn", (96, 1)), ("transformer.h.{i}.mlp.c_proj", (1, 128))],
}


def randomize(model, name: str = "default", seed: int = 0, zero: bool = False) -> None:
    """Vectors around one, so each adapter changes the output; `zero` puts a 0 in every vector."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in ia3_layers(model):
            if name in layer.ia3_l:
                l = layer.ia3_l[name]
                l.copy_(1 + 0.5 * torch.randn(l.shape, generator=gen))
                if zero:
                    l.view(-1)[1] = 0.0


def with_adapter(family: str = "llama", name: str = "default", seed: int = 0, **kw):
    model = BUILDERS[family]()
    peftkit.inject(model, IA3Config(**kw), name)
    randomize(model, name, seed)
    return model


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "ia3_l" not in k}


# --- identity at init, placement, non-zero vectors ------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fresh_adapter_is_exact_identity_and_nonzero_changes_output(family):
    model, ids = BUILDERS[family](), inputs(family)
    base = run(model, ids)
    peftkit.inject(model, IA3Config())
    placed = {p: tuple(layer.ia3_l["default"].shape) for p, layer in ia3_layers(model)}
    assert placed == {p.format(i=i): shape for i in range(2) for p, shape in PLACES[family]}
    assert torch.equal(run(model, ids), base)
    randomize(model)
    assert not torch.allclose(run(model, ids), base, atol=1e-3)


def test_output_and_input_scaling_are_what_the_layer_computes():
    model = tiny_llama()
    peftkit.inject(model, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    randomize(model)
    x = torch.randn(2, 3, 32)
    k = model.model.layers[0].self_attn.k_proj
    torch.testing.assert_close(k(x), k.base(x) * k.ia3_l["default"].flatten(), rtol=0, atol=0)
    down = model.model.layers[0].mlp.down_proj
    h = torch.randn(2, 3, 64)
    torch.testing.assert_close(down(h), down.base(h * down.ia3_l["default"].flatten()), rtol=0, atol=0)


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
    assert any(not torch.equal(once[k], before[k]) for k in before)  # weights (and GPT-2's biases) scaled
    peftkit.merge(model)
    assert all(torch.equal(v, once[k]) for k, v in base_state(model).items())
    peftkit.unmerge(model)
    for k, v in base_state(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(run(model, ids), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_zero_in_a_vector_merges_and_unmerges_without_dividing_by_it(family):
    model, ids = BUILDERS[family](), inputs(family)
    peftkit.inject(model, IA3Config())
    randomize(model, zero=True)
    before = base_state(model)
    adapted = run(model, ids)
    peftkit.merge(model)
    torch.testing.assert_close(run(model, ids), adapted, atol=1e-5, rtol=0)
    peftkit.unmerge(model)
    after = base_state(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    for k, v in after.items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)
    # the wiped-out row (output vector) / column (input vector) came back bit for bit from its copy
    k_proj = model.model.layers[0].self_attn.k_proj if family == "llama" else model.transformer.h[0].attn.c_attn
    row = k_proj.base.weight[1] if family == "llama" else k_proj.base.weight[:, 1]
    key = "model.layers.0.self_attn.k_proj.base.weight" if family == "llama" else "transformer.h.0.attn.c_attn.base.weight"
    assert torch.equal(row, before[key][1] if family == "llama" else before[key][:, 1])


def test_safe_merge_refuses_nan_and_changes_nothing():
    model, ids = with_adapter(), inputs("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.ia3_l["default"][3, 0] = float("nan")
    before = base_state(model)
    with pytest.raises(ValueError, match=r"safe merge refused.*model\.layers\.1\.self_attn\.v_proj \(adapter 'default'\)"):
        peftkit.merge(model, safe=True)
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
    assert not peftkit.merged_adapters(model)


def test_merge_and_unload_leaves_plain_modules_with_the_adapted_outputs():
    model, ids = with_adapter("gpt2"), inputs("gpt2")
    adapted = run(model, ids)
    merged = peftkit.merge_and_unload(model)
    assert not any(isinstance(m, IA3Layer) for m in merged.modules()) and not getattr(merged, "peftkit_configs", {})
    torch.testing.assert_close(run(merged, ids), adapted, atol=1e-5, rtol=0)


def test_nf4_base_trains_merges_and_unloads():
    model, ids = peftkit.quantize(tiny_llama()), inputs("llama")
    base = run(model, ids)
    peftkit.inject(model, IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"]))
    assert torch.equal(run(model, ids), base)
    randomize(model)
    adapted = run(model, ids)
    reference = copy.deepcopy(model)
    merged = peftkit.merge_and_unload(model, dtype=torch.float32)  # dequantized first: exact
    assert isinstance(merged.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(run(merged, ids), adapted, atol=1e-4, rtol=0)
    with pytest.warns(UserWarning, match="requantizes"):
        peftkit.merge(reference)  # in place: the 4-bit weights are rounded again
    assert (run(reference, ids) - adapted).abs().mean() < 0.15 * adapted.abs().mean()


# --- training -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_changes_output_and_only_ia3_vectors_train(family):
    model, ids = BUILDERS[family](), inputs(family)
    peftkit.inject(model, IA3Config())
    before = run(model, ids)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".ia3_l.default") for n in trainable)
    assert len(trainable) == len(PLACES[family]) * 2
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


# --- save / load ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_round_trip_is_identical(family, tmp_path):
    model, ids = with_adapter(family), inputs(family)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    targets, feedforward = IA3_DEFAULT_TARGETS[family]
    assert config["peft_type"] == "IA3" and config["task_type"] == "CAUSAL_LM"
    assert (config["target_modules"], config["feedforward_modules"]) == (list(targets), list(feedforward))
    assert config["fan_in_fan_out"] == (family == "gpt2") and "layers_to_transform" not in config
    keys = {f"base_model.model.{p.format(i=i)}.ia3_l": shape for i in range(2) for p, shape in PLACES[family]}
    assert {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()} == keys
    fresh = peftkit.load_adapter(BUILDERS[family](), tmp_path)
    assert torch.equal(run(fresh, ids), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.equal(run(copy.deepcopy(fresh), ids), expected)
    again = peftkit.load_adapter(BUILDERS[family](), tmp_path, name="task", trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n in dict(again.named_parameters()) if n.endswith(".ia3_l.task")}


def test_wrong_base_names_every_key_and_changes_nothing(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    peftkit.save_adapter(with_adapter(), tmp_path)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = inputs("llama")
    before = run(wide, ids)
    with pytest.raises(ValueError) as err:
        peftkit.load_adapter(wide, tmp_path)
    msg = str(err.value)
    assert "nothing was changed" in msg and "4 key(s) with wrong shapes" in msg
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            assert f"model.layers.{i}.self_attn.{proj}.ia3_l: file (16, 1), model expects (24, 1)" in msg
    assert "its output is scaled" in msg
    assert not list(ia3_layers(wide)) and not getattr(wide, "peftkit_configs", {})
    assert torch.equal(run(wide, ids), before)

    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match=r"(?s)matched no module.*6 unexpected key\(s\).*layers\.1\.mlp\.down_proj"):
        peftkit.load_adapter(gpt2, tmp_path)
    assert not list(ia3_layers(gpt2))


# --- several adapters: switching, disabling, per-row, deleting ---------------------------------------------
def two_adapters():
    """'a' on the defaults; 'b' on every linear, down_proj scaled on its output this time (not feedforward)."""
    model = with_adapter(name="a", seed=1)
    peftkit.inject(model, IA3Config(target_modules="all-linear", feedforward_modules=["up_proj"]), "b")
    randomize(model, "b", seed=2)
    return model


def test_a_second_adapter_shares_the_layers_with_its_own_feedforward_choice():
    model = two_adapters()
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, IA3Layer) and not isinstance(down.base, IA3Layer)
    assert down.feedforward == {"a": True, "b": False}
    assert (tuple(down.ia3_l["a"].shape), tuple(down.ia3_l["b"].shape)) == ((1, 64), (32, 1))
    assert len(list(ia3_layers(model))) == 14  # all-linear: every linear but the head, each wrapped once


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
    assert torch.equal(run(model, ids), a)  # enabled again
    peftkit.set_active(model, ["a", "b"])  # both: the vectors multiply
    both = run(model, ids)
    peftkit.merge(model)
    torch.testing.assert_close(run(model, ids), both, atol=1e-5, rtol=0)
    with peftkit.disable_adapters(model):  # merged adapters come out for the block
        torch.testing.assert_close(run(model, ids), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(model, ids), both, atol=1e-5, rtol=0)
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
    assert torch.equal(run(model, ids), b)
    peftkit.delete_adapter(model, "b")
    assert not any(isinstance(m, IA3Layer) for m in model.modules())
    assert torch.equal(run(model, ids), run(tiny_llama(), ids))


def test_ia3_and_lora_share_a_model_but_not_a_module():
    model, ids = tiny_llama(), inputs("llama")
    nonzero_adapter(model, ["q_proj"], "lora")
    peftkit.inject(model, IA3Config(), "ia3")  # k_proj, v_proj, down_proj
    randomize(model, "ia3")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if n.endswith(".ia3_l.ia3")}
    rows = ["lora", "ia3", None]
    with peftkit.per_row(model, rows):
        mixed = run(model, ids)
    for i, adapter in enumerate(rows):
        peftkit.set_active(model, [] if adapter is None else [adapter])
        torch.testing.assert_close(mixed[i:i + 1], run(model, ids[i:i + 1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"q_proj \(LoraLayer\) is already wrapped by another peftkit adapter"):
        peftkit.inject(model, IA3Config(target_modules=["q_proj"], feedforward_modules=[]), "ia3b")
    with pytest.raises(ValueError, match=r"cannot wrap: .*k_proj \(IA3Layer\)"):
        nonzero_adapter(model, ["k_proj"], "lora2")
    assert set(model.peftkit_configs) == {"lora", "ia3"}


# --- HF PEFT, both directions ------------------------------------------------------------------------------
PEFT_CASES = {
    "llama-defaults": ("llama", {}),
    "llama-regex-and-exclude": ("llama", dict(target_modules=r".*\.(q_proj|up_proj|down_proj)",
                                              feedforward_modules=r".*\.down_proj", exclude_modules=["up_proj"])),
    "gpt2-defaults": ("gpt2", {}),
    "gpt2-all-linear": ("gpt2", dict(target_modules="all-linear", feedforward_modules=["c_proj"])),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peftkit_adapter_loads_in_hf_peft_with_the_same_keys_and_logits(case, tmp_path):
    family, kw = PEFT_CASES[case]
    model, ids = with_adapter(family, **kw), inputs(family)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(BUILDERS[family](), tmp_path).eval()
    torch.testing.assert_close(run(theirs, ids), expected, atol=1e-5, rtol=0)
    assert set(peft.get_peft_model_state_dict(theirs)) == set(load_file(str(tmp_path / "adapter_model.safetensors")))


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_hf_peft_adapter_loads_in_peftkit(case, tmp_path):
    family, kw = PEFT_CASES[case]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(BUILDERS[family](), peft.IA3Config(init_ia3_weights=False, **kw)).eval()
    ids = inputs(family)
    expected = run(theirs, ids)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.load_adapter(BUILDERS[family](), tmp_path)
    torch.testing.assert_close(run(ours, ids), expected, atol=1e-5, rtol=0)
    assert set(peftkit.adapter_state_dict(ours)) == {
        k.removeprefix("base_model.model.") for k in load_file(str(tmp_path / "adapter_model.safetensors"))}


def test_targets_without_the_default_feedforward_module_still_load_in_hf_peft(tmp_path):
    """PEFT wants feedforward_modules (a list) to be a subset of target_modules (a list): the default down_proj
    with targets q_proj, v_proj is written as [], and with mlp.down_proj as a regex."""
    for targets, written in ((["q_proj", "v_proj"], []), (["q_proj", "mlp.down_proj"], ".*(?:down_proj)")):
        model, ids = with_adapter(target_modules=targets), inputs("llama")
        out = tmp_path / targets[-1]
        peftkit.save_adapter(model, out)
        assert json.loads((out / "adapter_config.json").read_text())["feedforward_modules"] == written
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
        torch.testing.assert_close(run(theirs, ids), run(model, ids), atol=1e-5, rtol=0)


def test_layers_to_transform_loads_in_hf_peft_which_ignores_it(tmp_path):
    """PEFT's IA3Config has no layers_to_transform: it warns, adapts every layer and leaves the ones the file
    does not fill at ones (the file says init_ia3_weights=true), so its logits are ours."""
    model, ids = with_adapter(layers_to_transform=[1], init_ia3_weights=False), inputs("llama")
    peftkit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_ia3_weights"] is True
    with pytest.warns(UserWarning, match="layers_to_transform"):
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(run(theirs, ids), run(model, ids), atol=1e-5, rtol=0)


def test_default_tables_are_hf_peft_s():
    from peft.utils import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    assert set(IA3_DEFAULT_TARGETS) == set(TARGETS) == set(FF)
    for model_type, (targets, feedforward) in IA3_DEFAULT_TARGETS.items():
        assert (list(targets), list(feedforward)) == (TARGETS[model_type], FF[model_type]), model_type


# --- config and errors -------------------------------------------------------------------------------------
def test_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match=r"feedforward_modules must be a subset of target_modules.*\['fc2'\]"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["fc2"])
    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\] is not supported for IA3"):
        IA3Config(modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="init_ia3_weights must be true or false"):
        IA3Config(init_ia3_weights="ones")
    with pytest.raises(ValueError, match="target_modules.*not a valid regex"):
        IA3Config(target_modules="(unclosed")
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules={"down_proj"},
                       layers_to_transform=1)
    assert config.feedforward_modules == ("down_proj",) and config.layers_to_transform == (1,)
    data = config.to_peft_dict()
    assert data["peft_type"] == "IA3" and data["layers_to_transform"] == [1] and "layers_pattern" not in data
    assert peftkit.registry.config_from_peft_dict(data | {"future_field": 1}) == config
    with pytest.raises(ValueError, match="this reads 'IA3'"):
        IA3Config.from_peft_dict({"peft_type": "LORA"})


def test_models_without_defaults_and_bad_targets_are_named():
    with pytest.raises(ValueError, match=r"target_modules and feedforward_modules is None .*model type None"):
        peftkit.inject(tiny_mlp(), IA3Config())
    model = tiny_mlp()
    peftkit.inject(model, IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    assert [(p, l.feedforward["default"]) for p, l in ia3_layers(model)] == [("fc1", False), ("fc2", True)]
    with pytest.raises(ValueError, match=r"emb \(Embedding\): IA3 scales linear layers"):
        peftkit.inject(tiny_mlp(), IA3Config(target_modules=["emb", "fc1"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="matched no module"):
        peftkit.inject(tiny_llama(), IA3Config(target_modules=["nope"]))


def test_layers_to_transform_and_summary():
    model = tiny_llama()
    peftkit.inject(model, IA3Config(layers_to_transform=[1]))
    assert [p for p, _ in ia3_layers(model)] == [f"model.layers.1.{p}" for p in
                                                 ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert "IA3 on the architecture's default" in peftkit.summary(model) and "on 3 modules" in peftkit.summary(model)


# --- the CLI: train and plan --------------------------------------------------------------------------------
def test_train_method_ia3_saves_an_adapter_hf_peft_loads(tiny_model_dir, qa_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--method", "ia3", "--model", tiny_model_dir, "--data", qa_jsonl, "--output-dir", str(out),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "0.05", "--no-progress", "--threads", "1",
                 "--save-every", "0"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["target_modules"] == ["k_proj", "v_proj", "down_proj"]
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), out / "adapter")
    assert any(not torch.all(l.ia3_l["default"] == 1) for _, l in ia3_layers(ours))  # it trained
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    torch.testing.assert_close(run(theirs.eval(), ids), run(ours, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,down_proj,up_proj"])
def test_planned_trainable_parameters_equal_what_inject_adds(targets):
    model = tiny_llama()
    shape = presets.from_config(model.config.to_dict())
    settings = memory.Settings(method="ia3", targets=targets if targets == "all-linear" else tuple(targets.split(",")))
    method = peftkit.registry.by_train_name("ia3")
    options = type("Options", (), {"target_modules": targets})()
    peftkit.inject(model, method.config_from_options(options))
    assert memory.adapter_params(shape, settings) == peftkit.trainable_parameters(model)[0]


def test_plan_cli_takes_method_ia3(capsys):
    assert main(["plan", "llama-2-7b", "--method", "ia3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["trainable_params"] == 32 * (4096 + 4096 + 11008)  # k_proj, v_proj out; down_proj in
    assert main(["plan", "llama-2-7b", "--method", "ia3", "--target-modules", "wq"]) == 2
    assert "IA3 targets ['wq'] are not linear layers" in capsys.readouterr().err
