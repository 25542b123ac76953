"""DoRA (LoraConfig(use_dora=True)): the math on one layer, the DESIGN.md property checklist on the tiny MLP,
Llama and GPT-2 (linear, Conv1D and embedding layers), and HF PEFT's files and numerics in both directions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LazyImport, inputs, nonzero_adapter, run, tiny_gpt2, tiny_llama
from torch import nn

import peftkit
from peftkit.methods.lora import lora_layers

ATOL = 1e-5


def dora_adapter(model, targets, name="default", seed=0, **kw):
    """A DoRA adapter with random A, B (so f != 1 would not suffice) and a magnitude moved off its initial
    ||W + sBA||, so that the magnitude really takes part in every check."""
    nonzero_adapter(model, targets, name, seed=seed, use_dora=True, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_magnitude_vector:
                m = layer.lora_magnitude_vector[name]
                m.mul_(1 + 0.3 * torch.randn(m.shape, generator=g))
    return model


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the math --------------------------------------------------------------------------------------------
def test_linear_layer_matches_the_dora_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    dora_adapter(model, ["0"], r=4, lora_alpha=8)
    layer = model[0]
    A, B, m = (t.detach() for t in (layer.lora_A["default"], layer.lora_B["default"],
                                     layer.lora_magnitude_vector["default"]))
    V = W + 2.0 * B @ A  # (out, in); scaling = 8 / 4
    x = torch.randn(3, 5, 16)
    expected = x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + b
    torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)


def test_default_init_is_a_noop_and_magnitude_is_the_weight_norm(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    base = run(model, ids)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=targets, use_dora=True))
    assert torch.equal(run(model, ids), base)
    for _, layer in lora_layers(model):
        W = layer.base.weight
        per_out = W.norm(dim=1) if layer.peftkit_kind == "linear" else W.norm(dim=0)  # Conv1D, embedding: (in, out)
        torch.testing.assert_close(layer.lora_magnitude_vector["default"], per_out)


def test_magnitude_changes_the_output_beyond_plain_lora():
    ids = inputs("llama")
    lora = nonzero_adapter(tiny_llama(), ["q_proj", "v_proj"])
    fresh_dora = nonzero_adapter(tiny_llama(), ["q_proj", "v_proj"], use_dora=True)  # same A, B; f = 1
    torch.testing.assert_close(run(fresh_dora, ids), run(lora, ids), atol=ATOL, rtol=0)
    assert not torch.allclose(run(dora_adapter(tiny_llama(), ["q_proj", "v_proj"]), ids), run(lora, ids), atol=1e-3)


# --- the property checklist --------------------------------------------------------------------------------
def test_adapter_changes_output(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    base = run(model, ids)
    dora_adapter(model, targets)
    assert not torch.allclose(run(model, ids), base, atol=1e-3)


def test_merged_equals_unmerged_and_unmerge_restores(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    plain = base_state(model)
    dora_adapter(model, targets)
    unmerged = run(model, ids)
    peftkit.merge(model)
    assert peftkit.merged_adapters(model) == ["default"]
    torch.testing.assert_close(run(model, ids), unmerged, atol=ATOL, rtol=ATOL)
    before_second = base_state(model)
    peftkit.merge(model)  # merging twice changes nothing
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_second[k]), k
    peftkit.unmerge(model)
    for path, layer in lora_layers(model):
        assert not layer.dora_merge_state
        for pname, p in layer.base.named_parameters():
            torch.testing.assert_close(p, plain[f"{path}.{pname}"], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model, ids), unmerged, atol=ATOL, rtol=ATOL)


def test_zero_magnitude_rows_unmerge_exactly():
    model, ids = tiny_llama(), inputs("llama")
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    dora_adapter(model, ["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][:3] = 0.0
    unmerged = run(model, ids)
    peftkit.merge(model)
    torch.testing.assert_close(run(model, ids), unmerged, atol=ATOL, rtol=0)
    peftkit.unmerge(model)
    assert torch.isfinite(layer.base.weight).all()
    torch.testing.assert_close(layer.base.weight, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("poison", ["magnitude", "lora_B"])
def test_safe_merge_refuses_nan_and_leaves_weights_bit_identical(model_case, poison):
    _, builder, targets = model_case
    model = builder()
    dora_adapter(model, targets)
    layer = [l for _, l in lora_layers(model)][-1]
    with torch.no_grad():
        if poison == "magnitude":
            layer.lora_magnitude_vector["default"][0] = float("nan")
        else:
            layer.lora_B["default"][0, 0] = float("inf")
    before = base_state(model)
    with pytest.raises(ValueError, match="safe merge refused") as err:
        peftkit.merge(model, safe=True)
    assert "adapter 'default'" in str(err.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or not torch.isfinite(v).all(), k
    assert peftkit.merged_adapters(model) == []


def test_save_load_roundtrip_identical(model_case, tmp_path):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    dora_adapter(model, targets)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    tensors = peftkit.read_adapter(tmp_path / "a")[1]
    paths = [p for p, _ in lora_layers(model)]
    assert {k for k in tensors if k.endswith(".lora_magnitude_vector")} == {f"{p}.lora_magnitude_vector" for p in paths}
    fresh = builder()
    peftkit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(run(fresh, ids), expected)
    assert peftkit.trainable_parameters(fresh)[0] == 0


def test_file_without_magnitudes_is_refused_with_every_key_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = dora_adapter(tiny_llama(), ["q_proj"])
    peftkit.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "magnitude" not in k}, path, metadata={"format": "pt"})
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="nothing was changed") as err:
        peftkit.load_adapter(fresh, tmp_path / "a")
    for layer in range(2):
        assert f"model.layers.{layer}.self_attn.q_proj.lora_magnitude_vector" in str(err.value)
    assert not hasattr(fresh, "peftkit_configs") or not fresh.peftkit_configs


def test_only_adapter_parameters_train_magnitude_included(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    dora_adapter(model, targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    magnitudes = {n for n, _ in model.named_parameters() if ".lora_magnitude_vector." in n}
    assert magnitudes and magnitudes <= trainable, "DoRA magnitudes must train (inject.mark_trainable)"
    assert all(any(k in n for k in (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")) for n in trainable)
    model.train()
    out = model(ids)
    (out if isinstance(out, torch.Tensor) else out.logits).pow(2).mean().backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_disable_gives_base_exactly_and_enable_restores(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    base = run(model, ids)
    dora_adapter(model, targets)
    adapted = run(model, ids)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, ids), base)
    assert torch.equal(run(model, ids), adapted)
    peftkit.merge(model)
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(run(model, ids), base, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(run(model, ids), adapted, atol=ATOL, rtol=ATOL)


def test_mixed_batch_of_dora_and_lora_equals_each_row_alone(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name, batch=5)
    dora_adapter(model, targets, "a", seed=1)
    nonzero_adapter(model, targets[:2], "b", seed=2, r=2)  # plain LoRA
    dora_adapter(model, targets[1:], "c", seed=3, r=2)
    rows = ["a", None, "b", "c", "a"]
    with peftkit.per_row(model, rows):
        mixed = run(model, ids)
    for i, adapter in enumerate(rows):
        if adapter is None:
            with peftkit.disable_adapters(model):
                alone = run(model, ids[i:i + 1])
        else:
            peftkit.set_active(model, [adapter])
            alone = run(model, ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(mixed[0], mixed[3], atol=1e-3)


def test_several_active_adapters_compose_in_order_and_merge_to_the_same():
    """Active [a, c, b]: each DoRA adapter scales what the adapters before it produced (as HF PEFT does), and
    merging in any call order, all at once or one at a time, gives that same output."""
    ids = inputs("llama")

    def model_with_three():
        model = tiny_llama()
        dora_adapter(model, ["q_proj", "v_proj"], "a", seed=1)
        dora_adapter(model, ["v_proj", "up_proj"], "b", seed=2, r=2)
        nonzero_adapter(model, ["v_proj"], "c", seed=3, r=2)
        peftkit.set_active(model, ["a", "c", "b"])
        return model

    model = model_with_three()
    base = base_state(model)
    composed = run(model, ids)
    peftkit.set_active(model, ["b", "c", "a"])
    assert not torch.allclose(run(model, ids), composed, atol=1e-4)  # the order matters for DoRA
    peftkit.set_active(model, ["a", "c", "b"])
    peftkit.merge(model, ["b", "a", "c"])  # merged in active order whatever the call's order
    torch.testing.assert_close(run(model, ids), composed, atol=ATOL, rtol=0)
    peftkit.unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base[k], atol=1e-6, rtol=0)

    partial = model_with_three()
    peftkit.merge(partial, "a")  # b's norm stays the one on the unmerged base weight
    torch.testing.assert_close(run(partial, ids), composed, atol=ATOL, rtol=0)
    peftkit.merge(partial, "c")
    torch.testing.assert_close(run(partial, ids), composed, atol=ATOL, rtol=0)
    peftkit.merge(partial, "b")
    torch.testing.assert_close(run(partial, ids), composed, atol=ATOL, rtol=0)


def test_merge_and_unload_leaves_no_trace(model_case):
    name, builder, targets = model_case
    model, ids = builder(), inputs(name)
    plain_types = {n: type(m) for n, m in model.named_modules()}
    dora_adapter(model, targets)
    adapted = run(model, ids)
    peftkit.merge_and_unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == plain_types
    assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(run(model, ids), adapted, atol=ATOL, rtol=ATOL)


def test_combine_refuses_dora_sources():
    model = dora_adapter(tiny_llama(), ["q_proj"], "a")
    nonzero_adapter(model, ["q_proj"], "b")
    with pytest.raises(ValueError, match="'a' is a DoRA adapter"):
        peftkit.combine(model, {"a": 0.5, "b": 0.5}, name="ab")


def test_nf4_base_equals_its_dense_dequantized_twin():
    import copy

    model, ids = tiny_llama(), inputs("llama")
    peftkit.quantize(model)
    dora_adapter(model, ["q_proj", "v_proj"])
    adapted = run(model, ids)
    dense = peftkit.dequantize_model(copy.deepcopy(model), torch.float32)
    torch.testing.assert_close(run(dense, ids), adapted, atol=ATOL, rtol=0)
    model.train()
    model(ids).logits.pow(2).mean().backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_magnitude_vector["default"].grad.abs().sum() > 0
    merged = peftkit.merge_and_unload(model, dtype=torch.float32)  # dequantized first: exact
    torch.testing.assert_close(run(merged, ids), adapted, atol=1e-4, rtol=0)


# --- HF PEFT's files and numerics ------------------------------------------------------------------------
peft = LazyImport("peft", optional=True)  # imported by the first test that uses it

CASES = {
    "llama-linear-and-embedding": (tiny_llama, {"target_modules": ["q_proj", "v_proj", "down_proj",
                                                                   "embed_tokens"]}),
    "llama-rslora-patterns": (tiny_llama, {"target_modules": "all-linear", "use_rslora": True,
                                           "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}}),
    "gpt2-conv1d-and-embedding": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc", "wte"]}),
    "gpt2-bias-all": (tiny_gpt2, {"target_modules": ["c_attn"], "bias": "all"}),
}


def _perturb(model, seed=3):
    """Move magnitudes (and trainable biases) off their initial values so that loading them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "magnitude" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.requires_grad and "bias" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_dora_loads_in_hf_peft(case, tmp_path):
    builder, kw = CASES[case]
    kw = dict(kw)
    model, ids = builder(), inputs("llama")
    nonzero_adapter(model, kw.pop("target_modules"), use_dora=True, **kw)
    _perturb(model)
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(builder(), tmp_path / "ours").eval()
    assert theirs.peft_config["default"].use_dora
    torch.testing.assert_close(run(theirs, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_peft_dora_loads_in_peftkit(case, tmp_path):
    builder, kw = CASES[case]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(builder(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                           use_dora=True, **kw))
    _perturb(theirs)
    theirs.eval()
    ids = inputs("llama")
    expected = run(theirs, ids)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftkit.load_adapter(builder(), tmp_path / "theirs")
    torch.testing.assert_close(run(ours, ids), expected, atol=ATOL, rtol=0)


def test_same_keys_as_hf_peft(tmp_path):
    from safetensors.torch import load_file

    targets = ["q_proj", "embed_tokens"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                init_lora_weights=False, use_dora=True))
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)
    ours = nonzero_adapter(tiny_llama(), targets, use_dora=True)
    peftkit.save_adapter(ours, tmp_path / "ours")
    their_keys = set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == their_keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in their_keys


@pytest.mark.parametrize("builder, targets", [(tiny_llama, ["q_proj", "v_proj", "embed_tokens"]),
                                              (tiny_gpt2, ["c_attn", "c_fc", "wte"])])
def test_training_step_matches_hf_peft_with_dropout(builder, targets, tmp_path):
    """Same seed, same dropout masks: the training forward and every gradient (A, B, magnitude) agree."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(builder(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True,
                                                           target_modules=targets, init_lora_weights=False))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftkit.load_adapter(builder(), tmp_path / "theirs", trainable=True)
    ids = inputs("llama")
    theirs.eval()
    torch.testing.assert_close(run(ours, ids), run(theirs, ids), atol=ATOL, rtol=0)  # eval: no dropout
    theirs.train()
    ours.train()

    def key(name):  # theirs: base_model.model.<path>.lora_A.default.weight; ours: <path>.lora_A.default
        name = name.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
        return name.replace("lora_embedding_", "lora_")

    def train_step(model):
        torch.manual_seed(5)
        logits = model(ids).logits
        logits.pow(2).mean().backward()
        return logits.detach(), {key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}

    (theirs_logits, theirs_g), (ours_logits, ours_g) = train_step(theirs), train_step(ours)
    torch.testing.assert_close(ours_logits, theirs_logits, atol=ATOL, rtol=0)
    assert set(ours_g) == set(theirs_g) and any("magnitude" in k for k in ours_g)
    for k, g in theirs_g.items():
        torch.testing.assert_close(ours_g[k], g, atol=1e-7, rtol=1e-4, msg=k)


def test_delete_a_dora_adapter_drops_its_magnitude():
    model, ids = tiny_llama(), inputs("llama")
    dora_adapter(model, ["q_proj"], "a")
    nonzero_adapter(model, ["q_proj"], "b")
    b = run(model, ids)
    peftkit.delete_adapter(model, "a")
    assert not any(len(layer.lora_magnitude_vector) for _, layer in lora_layers(model))
    assert torch.equal(run(model, ids), b)


def test_pissa_init_with_dora_keeps_the_output():
    model, ids = tiny_llama(), inputs("llama")
    base = run(model, ids)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                             init_lora_weights="pissa"))
    torch.testing.assert_close(run(model, ids), base, atol=ATOL, rtol=0)
