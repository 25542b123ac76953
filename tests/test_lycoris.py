"""LoHa and LoKr (peft_type LOHA / LOKR): the method checklist on a tiny Llama and a tiny conv net (nn.Conv2d with
and without CP cores, grouped, 1x1, and an nn.Conv1d), HF PEFT in both directions (Llama, GPT-2's linear head, the
conv net), hostile files, NF4 bases, the CLI (train, plan) and the planner."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from conftest import LazyImport, inputs, nonzero_adapter, run, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.methods.lycoris import LoHaConfig, LoKrConfig, LycorisLayer, lycoris_layers
from peftkit.methods.lycoris.shapes import factorization
from peftkit.plan import memory, presets

peft = LazyImport("peft", optional=True)
CONFIGS = {"loha": LoHaConfig, "lokr": LoKrConfig}
PEFT_NAMES = {"loha": "LoHaConfig", "lokr": "LoKrConfig"}
METHODS = list(CONFIGS)


class TinyConvNet(nn.Module):
    """3x3 convolutions (one strided and grouped), a 1x1 convolution, an nn.Conv1d and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2)
        self.pointwise = nn.Conv2d(12, 12, 1)
        self.temporal = nn.Conv1d(12, 6, 3, padding=1)
        self.head = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))  # (B, 8, 8, 8)
        h = self.pointwise(torch.relu(self.conv2(h)))  # (B, 12, 4, 4)
        h = self.temporal(h.flatten(2))  # (B, 6, 16)
        return self.head(h.flatten(1))  # (B, 10)


def tiny_conv():
    torch.manual_seed(0)
    return TinyConvNet().eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "conv": tiny_conv}
CONV_TARGETS = ["conv1", "conv2", "pointwise", "temporal", "head"]


def ids_for(family: str, batch: int = 3) -> torch.Tensor:
    if family == "conv":
        return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return inputs(family, batch=batch)


def conf(method: str, family: str = "llama", **kw):
    """A config of `method` with random factors (init_weights=False), so the adapter changes the output."""
    if method == "loha":
        kw.pop("decompose_both", None)
    kw.setdefault("target_modules", CONV_TARGETS if family == "conv" else "all-linear")
    kw.setdefault("init_weights", False)
    if family == "conv":
        kw.setdefault("task_type", None)
    return CONFIGS[method](**kw)


def with_adapter(method: str, family: str = "llama", name: str = "default", seed: int = 0, **kw):
    model = BUILDERS[family]()
    torch.manual_seed(seed)
    return peftkit.inject(model, conf(method, family, **kw), name)


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".hada_" not in k and ".lokr_" not in k}


def file_keys(folder) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


# --- identity at init, the update itself ------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "conv"])
def test_fresh_adapter_is_exact_identity_and_random_factors_change_output(method, family):
    model, x = BUILDERS[family](), ids_for(family)
    base = run(model, x)
    peftkit.inject(model, conf(method, family, init_weights=True))
    assert len(list(lycoris_layers(model))) == (14 if family == "llama" else 5)
    assert torch.equal(run(model, x), base)
    changed = with_adapter(method, family)
    assert not torch.allclose(run(changed, x), base, atol=1e-3)


def test_lokr_lycoris_init_is_identity_too():
    model, x = tiny_llama(), ids_for("llama")
    base = run(model, x)
    peftkit.inject(model, LoKrConfig(target_modules="all-linear", init_weights="lycoris", r=2))
    assert torch.equal(run(model, x), base)
    q = model.model.layers[0].self_attn.q_proj
    assert not torch.all(q.lokr_w1["default"] == 0) and torch.all(q.lokr_w2_b["default"] == 0)


def test_the_update_is_the_hadamard_or_kronecker_product_of_the_factors():
    x = torch.randn(2, 5, 64)
    model = with_adapter("loha", target_modules=["down_proj"], r=3, alpha=6)
    down = model.model.layers[0].mlp.down_proj
    f = {k: v.detach() for k, v in down.factors("default").items()}
    delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 2.0  # (32, 64)
    torch.testing.assert_close(down(x), down.base(x) + x @ delta.T, atol=1e-5, rtol=1e-5)

    model = with_adapter("lokr", target_modules=["down_proj"], r=2, alpha=3)
    down = model.model.layers[0].mlp.down_proj
    f = {k: v.detach() for k, v in down.factors("default").items()}
    assert set(f) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}  # 32 = 4 * 8 and 64 = 8 * 8: w2 (8, 8) is rank 2
    delta = torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"]) * 1.5
    torch.testing.assert_close(down(x), down.base(x) + x @ delta.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_the_one_matmul_path_equals_base_plus_update_with_its_gradients(method):
    """A plain nn.Linear runs linear(x, W + delta, b); a hook on the base forces base(x) + linear(x, delta)."""
    fused, x = with_adapter(method, target_modules=["q_proj", "down_proj"], r=2), ids_for("llama")
    split = copy.deepcopy(fused)
    for _, layer in lycoris_layers(split):
        layer.base.register_forward_hook(lambda module, args, out: None)
    results = []
    for model in (fused, split):
        loss = model(x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_factorization_is_hf_peft_s():
    from peft.tuners.lokr.layer import factorization as theirs

    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dim, factor) == theirs(dim, factor), (dim, factor)


# --- HF PEFT, both directions -------------------------------------------------------------------------------
PEFT_CASES = {
    "llama-all-linear": ("llama", {}),
    "llama-patterns": ("llama", dict(target_modules=r".*\.(q_proj|v_proj|up_proj|down_proj)", r=3, alpha=5,
                                     exclude_modules=["up_proj"], rank_pattern={"v_proj": 2},
                                     alpha_pattern={r"layers\.1\.mlp\.down_proj": 9})),
    "llama-layers": ("llama", dict(target_modules=["k_proj", "gate_proj", "model.layers.0.self_attn.o_proj"],
                                   layers_to_transform=[1], layers_pattern="layers")),
    "llama-regex-ignores-layers": ("llama", dict(target_modules=r".*\.v_proj", layers_to_transform=[1])),  # as PEFT
    "gpt2-head": ("gpt2", dict(target_modules=["lm_head"], r=2)),
    "conv": ("conv", dict(r=2)),
    "conv-effective": ("conv", dict(r=2, use_effective_conv2d=True, rank_dropout=0.1, module_dropout=0.2)),
}
LOKR_CASES = {
    "lokr-decompose-both": ("llama", dict(decompose_both=True, r=1)),
    "lokr-factor": ("llama", dict(decompose_factor=4, r=8)),
    # not the nn.Conv1d: HF PEFT 0.21 fails on its CP w2 (torch.kron on an einsum stride), which we compute
    "lokr-conv-decompose-both": ("conv", dict(decompose_both=True, r=1, use_effective_conv2d=True,
                                              target_modules=["conv1", "conv2", "pointwise", "head"])),
}
BOTH_WAYS = [(m, c) for m in METHODS for c in PEFT_CASES] + [("lokr", c) for c in LOKR_CASES]


@pytest.mark.parametrize("method, case", BOTH_WAYS)
@pytest.mark.filterwarnings("ignore:.*layers_to_transform.*has no effect")
def test_hf_peft_reads_our_files_and_we_read_theirs(method, case, tmp_path):
    family, kw = {**PEFT_CASES, **LOKR_CASES}[case]
    x = ids_for(family)
    ours = with_adapter(method, family, **kw)
    expected = run(ours, x)
    peftkit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(BUILDERS[family](), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs, x), expected, atol=1e-5, rtol=0)
    # PEFT's key set; it also writes a targeted lm_head's own weight (save_embedding_layers="auto"), we do not
    assert {k for k in peft.get_peft_model_state_dict(theirs) if ".base_layer." not in k} == set(
        file_keys(tmp_path / "ours"))

    torch.manual_seed(7)
    peft_config = getattr(peft, PEFT_NAMES[method])(**conf(method, family, **kw).to_peft_dict() | {
        "peft_type": None, "inference_mode": False})
    made = peft.get_peft_model(BUILDERS[family](), peft_config).eval()
    expected = run(made, x)
    made.save_pretrained(tmp_path / "theirs")
    loaded = peftkit.load_adapter(BUILDERS[family](), tmp_path / "theirs")
    torch.testing.assert_close(run(loaded, x), expected, atol=1e-5, rtol=0)
    theirs_keys = {k for k in file_keys(tmp_path / "theirs") if ".base_layer." not in k}
    assert {f"base_model.model.{k}" for k in peftkit.adapter_state_dict(loaded)} == theirs_keys
    assert theirs_keys == set(file_keys(tmp_path / "ours"))


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_conv1d_is_refused_by_name_as_hf_peft_refuses_it(method):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\): it is transformers' Conv1D"):
        peftkit.inject(model, CONFIGS[method](target_modules=["c_attn", "lm_head"]))
    assert not list(lycoris_layers(model))
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(tiny_gpt2(), getattr(peft, PEFT_NAMES[method])(target_modules=["c_attn"]))


def test_unsupported_layers_are_named_before_anything_changes():
    model = tiny_conv()
    model.conv1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"conv1 \(Conv2d\): padding_mode='reflect': only zero padding"):
        peftkit.inject(model, LoHaConfig(target_modules=["conv1", "conv2"], task_type=None))
    with pytest.raises(ValueError, match=r"emb.*LOKR adapts nn.Linear, nn.Conv2d and nn.Conv1d layers only"):
        peftkit.inject(tiny_llama(), LoKrConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="matched no module"):
        peftkit.inject(tiny_llama(), LoHaConfig(target_modules=["nope"]))
    assert not list(lycoris_layers(model))


# --- merging ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family, kw", [("llama", {}), ("conv", dict(use_effective_conv2d=True)),
                                        ("conv", dict(use_effective_conv2d=True, r=1, decompose_both=True))])
def test_merged_equals_unmerged_unmerge_restores_and_merging_twice_changes_nothing(method, family, kw):
    model, x = with_adapter(method, family, **kw), ids_for(family)
    before = base_state(model)
    adapted = run(model, x)
    peftkit.merge(model)
    assert peftkit.merged_adapters(model) == ["default"]
    torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=0)
    once = base_state(model)
    assert any(not torch.equal(once[k], before[k]) for k in before)
    peftkit.merge(model)
    assert all(torch.equal(v, once[k]) for k, v in base_state(model).items())
    peftkit.unmerge(model)
    for k, v in base_state(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(run(model, x), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_safe_merge_refuses_nan_and_changes_nothing(method):
    model = with_adapter(method, target_modules=["v_proj"])
    layer = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        next(iter(layer.factors("default").values())).view(-1)[0] = float("nan")
    before = base_state(model)
    with pytest.raises(ValueError, match=r"safe merge refused.*model\.layers\.1\.self_attn\.v_proj \(adapter 'default'\)"):
        peftkit.merge(model, safe=True)
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
    assert not peftkit.merged_adapters(model)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_leaves_plain_modules_with_the_adapted_outputs(method):
    model, x = with_adapter(method, "conv", use_effective_conv2d=True), ids_for("conv")
    adapted = run(model, x)
    merged = peftkit.merge_and_unload(model)
    assert not any(isinstance(m, LycorisLayer) for m in merged.modules())
    assert isinstance(merged.conv2, nn.Conv2d) and not getattr(merged, "peftkit_configs", {})
    torch.testing.assert_close(run(merged, x), adapted, atol=1e-5, rtol=0)


def test_nf4_base_takes_loha_and_merges_dense():
    model, x = peftkit.quantize(tiny_llama()), ids_for("llama")
    base = run(model, x)
    peftkit.inject(model, LoHaConfig(target_modules="all-linear"))
    assert torch.equal(run(model, x), base)
    torch.manual_seed(0)
    model = peftkit.quantize(tiny_llama())
    peftkit.inject(model, LoHaConfig(target_modules="all-linear", init_weights=False, alpha=1))
    adapted = run(model, x)
    assert not torch.allclose(adapted, base, atol=1e-3)
    merged = peftkit.merge_and_unload(model, dtype=torch.float32)  # dequantized first: exact
    assert isinstance(merged.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(run(merged, x), adapted, atol=1e-4, rtol=0)


# --- training -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_training_changes_output_and_only_the_factors_train(method):
    model, x = tiny_llama(), ids_for("llama")
    peftkit.inject(model, CONFIGS[method](target_modules="all-linear", rank_dropout=0.1, module_dropout=0.1))
    before = run(model, x)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    prefix = "hada_" if method == "loha" else "lokr_"
    assert trainable and all(n.split(".")[-2].startswith(prefix) and n.endswith(".default") for n in trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(3):
        optimizer.zero_grad()
        model(x, labels=x).loss.backward()
        optimizer.step()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert not torch.allclose(run(model, x), before, atol=1e-4)
    assert torch.equal(run(model, x), run(model, x))  # no dropout in eval


@pytest.mark.parametrize("method", METHODS)
def test_inference_cache_follows_training_with_a_fused_optimizer_and_in_place_edits(method):
    model, x = tiny_llama(), ids_for("llama")
    peftkit.inject(model, CONFIGS[method](target_modules=["q_proj", "down_proj"], r=2))
    before = run(model, x)  # no autograd: the (zero) updates are cached
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    model(x, labels=x).loss.backward()
    optimizer.step()  # fused: no version counter moves
    after = run(model, x)
    assert not torch.allclose(after, before, atol=1e-5)
    fresh = copy.deepcopy(model)
    for _, layer in lycoris_layers(fresh):
        layer.delta_cache.clear()
    assert torch.equal(run(fresh, x), after)
    with torch.no_grad():
        for _, layer in lycoris_layers(model):
            for p in layer.factors("default").values():
                p.zero_()
    assert torch.equal(run(model, x), run(tiny_llama(), x))


def test_the_hadamard_gradient_is_autograd_s():
    from peftkit.methods.lycoris.family import HadamardProduct

    torch.manual_seed(0)
    factors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((5, 3), (3, 4), (5, 3), (3, 4))]
    assert torch.autograd.gradcheck(lambda *f: HadamardProduct.apply(*f, 0.7), factors)


# --- save / load ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_identical(method, tmp_path):
    model, x = with_adapter(method, target_modules=["q_proj", "down_proj"], r=4, alpha=16), ids_for("llama")
    expected = run(model, x)
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["r"] == 4 and config["alpha"] == 16
    assert config["target_modules"] == ["q_proj", "down_proj"] and config["task_type"] == "CAUSAL_LM"
    keys = file_keys(tmp_path)
    if method == "loha":
        assert keys["base_model.model.model.layers.0.mlp.down_proj.hada_w1_a"] == (32, 4)
        assert keys["base_model.model.model.layers.0.mlp.down_proj.hada_w2_b"] == (4, 64)
    else:
        assert keys["base_model.model.model.layers.0.mlp.down_proj.lokr_w1"] == (4, 8)
        assert keys["base_model.model.model.layers.0.mlp.down_proj.lokr_w2"] == (8, 8)
    assert len(keys) == 2 * 2 * (4 if method == "loha" else 2)
    fresh = peftkit.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(run(fresh, x), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.equal(run(copy.deepcopy(fresh), x), expected)
    assert torch.equal(run(pickle.loads(pickle.dumps(fresh)), x), expected)
    again = peftkit.load_adapter(tiny_llama(), tmp_path, name="task", trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n in dict(again.named_parameters()) if n.endswith(".task")}


@pytest.mark.parametrize("method", METHODS)
def test_wrong_base_names_every_key_and_changes_nothing(method, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    peftkit.save_adapter(with_adapter(method, target_modules=["v_proj"], r=4), tmp_path)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    x = ids_for("llama")
    before = run(wide, x)
    with pytest.raises(ValueError) as err:
        peftkit.load_adapter(wide, tmp_path)
    msg = str(err.value)
    assert "nothing was changed" in msg and "wrong shapes" in msg
    key = "model.layers.1.self_attn.v_proj." + ("hada_w1_b: file (4, 32), model expects (4, 48)" if method == "loha"
                                                 else "lokr_w1: file (4, 4), model expects (4, 6)")
    assert key in msg
    assert not list(lycoris_layers(wide)) and not getattr(wide, "peftkit_configs", {})
    assert torch.equal(run(wide, x), before)


# --- hostile files ------------------------------------------------------------------------------------------
def test_a_tampered_tensor_shape_is_named_and_nothing_changes(tmp_path):
    peftkit.save_adapter(with_adapter("loha", target_modules=["q_proj"], r=4), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.0.self_attn.q_proj.hada_w2_a"
    tensors[key] = torch.zeros(32, 5)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.hada_t1"] = torch.zeros(4, 4, 3, 3)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        peftkit.load_adapter(model, tmp_path)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj.hada_w2_a: file (32, 5), model expects (32, 4)" in msg
    assert "unexpected key(s) in the file:\n  model.layers.0.self_attn.q_proj.hada_t1" in msg
    assert not list(lycoris_layers(model))


@pytest.mark.parametrize("change, message", [
    ({"layer_replication": [[0, 1]]}, r"LOKR options peftkit does not support yet: layer_replication=\[\[0, 1\]\]"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported for LOKR"),
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"decompose_factor": 0}, "decompose_factor must be -1"),
    ({"init_weights": "pissa"}, "init_weights must be one of"),
    ({"rank_pattern": {"(unclosed": 2}}, r"rank_pattern key '\(unclosed' is not a valid regex"),
    ({"target_modules": "x" * 2000}, "target_modules 'xxx.* is longer than 1000 characters"),
    ({"alpha": float("inf")}, r"NaN or infinite values in 1 place\(s\): alpha=inf"),
])
def test_hostile_configs_are_refused_by_name(tmp_path, change, message):
    peftkit.save_adapter(with_adapter("lokr", target_modules=["q_proj"], r=2), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        peftkit.load_adapter(model, tmp_path)
    assert not list(lycoris_layers(model))


def test_unknown_keys_are_named_in_a_warning_and_config_round_trips():
    data = LoHaConfig(target_modules=["q_proj"], layers_to_transform=1, rank_pattern={"q": 2}).to_peft_dict()
    assert data["peft_type"] == "LOHA" and data["layers_to_transform"] == [1] and data["rank_pattern"] == {"q": 2}
    with pytest.warns(UserWarning, match="does not know: future_option"):
        config = peftkit.registry.config_from_peft_dict(data | {"future_option": 3, "peft_version": "9.9"})
    assert config == LoHaConfig(target_modules=["q_proj"], layers_to_transform=[1], rank_pattern={"q": 2})
    with pytest.raises(ValueError, match="this reads 'LOHA'"):
        LoHaConfig.from_peft_dict({"peft_type": "LOKR"})
    with pytest.raises(ValueError, match="layers_pattern is set but layers_to_transform is not"):
        LoKrConfig(layers_pattern="layers")
    with pytest.warns(UserWarning, match=r"layers_to_transform=\[1\] has no effect with a regex target_modules"):
        model = peftkit.inject(tiny_llama(), LoHaConfig(target_modules=r".*\.v_proj", layers_to_transform=[1]))
    assert len(list(lycoris_layers(model))) == 2  # both layers, as HF PEFT adapts them


# --- several adapters -----------------------------------------------------------------------------------------
def two_adapters(method: str):
    model = with_adapter(method, name="a", seed=1, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(2)
    peftkit.inject(model, conf(method, target_modules="all-linear", r=2), "b")
    return model


@pytest.mark.parametrize("method", METHODS)
def test_several_adapters_switch_disable_add_merge_and_delete(method):
    model, x = two_adapters(method), ids_for("llama")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LycorisLayer) and not isinstance(q.base, LycorisLayer) and q.adapter_names() == ["a", "b"]
    base = run(tiny_llama(), x)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, x), base)
    b = run(model, x)
    peftkit.set_active(model, "a")
    a = run(model, x)
    assert not torch.allclose(a, b, atol=1e-3)
    peftkit.set_active(model, ["a", "b"])
    both = run(model, x)
    peftkit.merge(model)
    torch.testing.assert_close(run(model, x), both, atol=1e-5, rtol=0)
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=0)
    peftkit.unmerge(model)
    rows = ["a", None, "b", "a"]
    x4 = ids_for("llama", batch=4)
    with peftkit.per_row(model, rows):
        mixed = run(model, x4)
    for i, adapter in enumerate(rows):
        peftkit.set_active(model, [] if adapter is None else [adapter])
        torch.testing.assert_close(mixed[i:i + 1], run(model, x4[i:i + 1]), atol=1e-5, rtol=1e-5)
    peftkit.delete_adapter(model, "a")
    peftkit.set_active(model, "b")
    torch.testing.assert_close(run(model, x), b, atol=1e-5, rtol=0)  # the unmerge above rounds once
    peftkit.delete_adapter(model, "b")
    assert not any(isinstance(m, LycorisLayer) for m in model.modules())
    torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=0)


def test_loha_lokr_and_lora_share_a_model_but_not_a_module():
    model, x = tiny_llama(), ids_for("llama")
    nonzero_adapter(model, ["q_proj"], "lora")
    torch.manual_seed(0)
    peftkit.inject(model, conf("loha", target_modules=["v_proj"]), "loha")
    peftkit.inject(model, conf("lokr", target_modules=["down_proj"]), "lokr")
    rows = ["lora", "loha", "lokr"]
    with peftkit.per_row(model, rows):
        mixed = run(model, x)
    for i, adapter in enumerate(rows):
        peftkit.set_active(model, adapter)
        torch.testing.assert_close(mixed[i:i + 1], run(model, x[i:i + 1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"v_proj \(LycorisLayer\): it is already wrapped by another peftkit"):
        peftkit.inject(model, LoKrConfig(target_modules=["v_proj"]), "lokr2")
    with pytest.raises(ValueError, match=r"q_proj \(LoraLayer\): it is already wrapped"):
        peftkit.inject(model, LoHaConfig(target_modules=["q_proj"]), "loha2")
    with pytest.raises(ValueError, match=r"cannot wrap: .*v_proj \(LycorisLayer\)"):
        nonzero_adapter(model, ["v_proj"], "lora2")
    assert set(model.peftkit_configs) == {"lora", "loha", "lokr"}


def test_half_precision_base_keeps_its_dtype_with_fp32_factors():
    model, x = tiny_llama().to(torch.bfloat16), ids_for("llama")
    peftkit.inject(model, LoHaConfig(target_modules=["q_proj"], init_weights=False))
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight is q.base.weight and q.bias is None  # passed through, as PEFT's wrappers do
    assert q.hada_w1_a["default"].dtype == torch.float32
    assert q(torch.randn(2, 3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert run(model, x).dtype == torch.bfloat16


# --- the CLI and the planner --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_train_method_saves_an_adapter_hf_peft_loads(method, tiny_model_dir, qa_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--method", method, "--model", tiny_model_dir, "--data", qa_jsonl, "--output-dir",
                 str(out), "--max-steps", "2", "--batch-size", "4", "--lr", "0.01", "--r", "4", "--lora-alpha", "8",
                 "--target-modules", "q_proj,v_proj", "--no-progress", "--threads", "1", "--save-every", "0"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["alpha"]) == (method.upper(), 4, 8)
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), out / "adapter")
    base = run(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), x)
    assert not torch.allclose(run(ours, x), base, atol=1e-6)  # it trained
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    torch.testing.assert_close(run(theirs.eval(), x), run(ours, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("targets, r", [("all-linear", 4), ("q_proj,down_proj", 1), ("attention", 16)])
def test_planned_trainable_parameters_equal_what_inject_adds(method, targets, r):
    model = tiny_llama()
    shape = presets.from_config(model.config.to_dict())
    spec = targets if targets in ("all-linear", "attention") else tuple(targets.split(","))
    settings = memory.Settings(method=method, r=r, targets=spec)
    names = settings.target_names(shape)
    options = type("Options", (), {"r": r, "lora_alpha": 8.0, "target_modules": ",".join(names), "method": method})()
    peftkit.inject(model, peftkit.registry.by_train_name(method).config_from_options(options))
    assert memory.adapter_params(shape, settings) == peftkit.trainable_parameters(model)[0]


def test_plan_cli_takes_loha_and_lokr(capsys):
    assert main(["plan", "llama-2-7b", "--method", "loha", "--r", "8", "--json"]) == 0
    loha = json.loads(capsys.readouterr().out)
    assert loha["trainable_params"] == 32 * 2 * 8 * sum(i + o for i, o in presets.resolve("llama-2-7b").linears().values())
    assert main(["plan", "llama-2-7b", "--method", "lokr", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] < loha["trainable_params"]
    assert main(["plan", "llama-2-7b", "--method", "lokr", "--target-modules", "wq"]) == 2
    assert "LoKr targets ['wq'] are not linear layers" in capsys.readouterr().err
