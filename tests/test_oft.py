"""OFT (peft_type OFT): the rotation's maths against HF PEFT's, the method checklist on a tiny Llama, GPT-2's
embeddings and head and a tiny conv net (1x1 nn.Conv2d), HF PEFT in both directions (Cayley and Cayley-Neumann,
COFT, shared blocks, r or block size, moved block sizes), hostile files, the CLI (train, plan, sweep) and the
planner."""

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
from peftkit.methods.oft import OFTConfig, OFTLayer, oft_layers
from peftkit.methods.oft import rotation as rot
from peftkit.plan import memory, presets

peft = LazyImport("peft", optional=True)
pytestmark = pytest.mark.filterwarnings("ignore:OFT .* does not divide the width")


class TinyConvNet(nn.Module):
    """A 3x3 convolution (OFT cannot take it), two 1x1 convolutions (one strided) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.strided = nn.Conv2d(8, 12, 1, stride=2)
        self.head = nn.Linear(192, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pointwise(torch.relu(self.conv1(x)))  # (B, 8, 8, 8)
        h = self.strided(torch.relu(h))  # (B, 12, 4, 4)
        return self.head(h.flatten(1))  # (B, 10)


def tiny_conv():
    torch.manual_seed(0)
    return TinyConvNet().eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "conv": tiny_conv}
CONV_TARGETS = ["pointwise", "strided", "head"]


def ids_for(family: str, batch: int = 3) -> torch.Tensor:
    if family == "conv":
        return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return inputs(family, batch=batch)


def conf(family: str = "llama", **kw) -> OFTConfig:
    """An OFT config with a random rotation (init_weights=False), so the adapter changes the output."""
    kw.setdefault("target_modules", CONV_TARGETS if family == "conv" else "all-linear")
    kw.setdefault("init_weights", False)
    kw.setdefault("oft_block_size", 0 if kw.get("r") else (4 if family == "conv" else 8))
    if family == "conv":
        kw.setdefault("task_type", None)
    return OFTConfig(**kw)


def with_adapter(family: str = "llama", name: str = "default", seed: int = 0, **kw):
    model = BUILDERS[family]()
    torch.manual_seed(seed)
    return peftkit.inject(model, conf(family, **kw), name)


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".oft_R." not in k}


def file_keys(folder) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


# --- the rotation itself --------------------------------------------------------------------------------------
def test_block_layout_and_cayley_forms_are_hf_peft_s():
    from peft.tuners.oft.layer import OFTLayer as Theirs
    from peft.tuners.oft.layer import OFTRotationModule

    adjust = Theirs.adjust_oft_parameters
    for width in range(1, 130):
        for wanted in (1, 2, 3, 5, 8, 12, 16, 32, 200):
            assert rot.nearest_divisor(width, wanted) == adjust(None, width, wanted), (width, wanted)
    torch.manual_seed(0)
    vec = torch.randn(3, 6 * 5 // 2) * 0.2
    for neumann in (False, True):
        for terms in range(1, 8):
            theirs = OFTRotationModule(3, 15, 6, 18, use_cayley_neumann=neumann, num_cayley_neumann_terms=terms)
            want = theirs._cayley_batch(vec, 6, neumann, terms)
            torch.testing.assert_close(rot.cayley(rot.skew(vec, 6), neumann, terms), want, atol=1e-6, rtol=1e-6)
    theirs = OFTRotationModule(3, 15, 6, 18, coft=True, eps=1e-2)
    torch.testing.assert_close(rot.coft_projection(vec, 6, 1e-2), theirs._project_batch(vec, eps=1e-2),
                               atol=1e-7, rtol=1e-5)
    assert rot.coft_projection(vec * 1e-6, 6, 1e-2) is None  # inside the radius: nothing to write


def test_exact_cayley_is_orthogonal_and_the_layer_rotates_the_input_blockwise():
    model = with_adapter(target_modules=["down_proj"], use_cayley_neumann=False, oft_block_size=16)
    down = model.model.layers[0].mlp.down_proj
    blocks = down.rotation("default").detach()  # (4, 16, 16): 64 inputs in blocks of 16
    assert blocks.shape == (4, 16, 16)
    torch.testing.assert_close(blocks @ blocks.transpose(-2, -1), torch.eye(16).expand(4, 16, 16), atol=1e-5,
                               rtol=0)
    x = torch.randn(2, 5, 64)
    dense = torch.block_diag(*blocks)  # (64, 64)
    torch.testing.assert_close(down(x), down.base(x @ dense), atol=1e-5, rtol=1e-5)
    norms = torch.linalg.vector_norm(down.base.weight, dim=1)  # a rotation keeps each neuron's norm
    torch.testing.assert_close(torch.linalg.vector_norm(down.merged_weight("default"), dim=1), norms)


@pytest.mark.parametrize("family", ["llama", "conv", "gpt2"])
def test_fresh_adapter_is_exact_identity_and_a_random_one_changes_output(family):
    targets = ["wte", "lm_head"] if family == "gpt2" else None
    model, x = BUILDERS[family](), ids_for(family)
    base = run(model, x)
    peftkit.inject(model, conf(family, init_weights=True, **({"target_modules": targets} if targets else {})))
    assert len(list(oft_layers(model))) == {"llama": 14, "conv": 3, "gpt2": 2}[family]
    assert torch.equal(run(model, x), base)
    changed = with_adapter(family, **({"target_modules": targets} if targets else {}))
    assert not torch.allclose(run(changed, x), base, atol=1e-3)


# --- HF PEFT, both directions -------------------------------------------------------------------------------
PEFT_CASES = {
    "llama-neumann": ("llama", {}),
    "llama-cayley": ("llama", dict(use_cayley_neumann=False)),
    "llama-neumann-3-terms": ("llama", dict(num_cayley_neumann_terms=3)),
    "llama-coft": ("llama", dict(coft=True, eps=1e-2)),
    "llama-coft-cayley-shared": ("llama", dict(coft=True, eps=3e-2, block_share=True, use_cayley_neumann=False)),
    "llama-block-share": ("llama", dict(block_share=True)),
    "llama-r": ("llama", dict(r=4)),
    "llama-moved-block-size": ("llama", dict(oft_block_size=12)),  # 32 -> 8 and 64 -> 16 blocks, as PEFT moves it
    "llama-default-targets": ("llama", dict(target_modules=None)),
    "llama-layers": ("llama", dict(target_modules=["k_proj", "gate_proj", "model.layers.0.self_attn.o_proj"],
                                   layers_to_transform=[1], layers_pattern="layers", exclude_modules=["q_proj"])),
    "llama-embedding": ("llama", dict(target_modules=["embed_tokens", "v_proj"], module_dropout=0.5)),
    "gpt2-embeddings-and-head": ("gpt2", dict(target_modules=["wte", "wpe", "lm_head"])),
    "conv": ("conv", {}),
    "conv-shared-cayley": ("conv", dict(block_share=True, use_cayley_neumann=False)),
}


@pytest.mark.parametrize("case", PEFT_CASES)
@pytest.mark.filterwarnings("error:The cayley-neumann parameterization")  # our files name the series they hold
def test_hf_peft_reads_our_files_and_we_read_theirs(case, tmp_path):
    family, kw = PEFT_CASES[case]
    x = ids_for(family)
    ours = with_adapter(family, **kw)
    expected = run(ours, x)
    assert not torch.allclose(expected, run(BUILDERS[family](), x), atol=1e-4)
    peftkit.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "OFT"
    theirs = peft.PeftModel.from_pretrained(BUILDERS[family](), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs, x), expected, atol=1e-5, rtol=0)
    # PEFT's key set; it also writes a targeted embedding's own weight (save_embedding_layers="auto"), we do not
    assert {k for k in peft.get_peft_model_state_dict(theirs) if ".base_layer." not in k} == set(
        file_keys(tmp_path / "ours"))

    torch.manual_seed(7)
    peft_config = peft.OFTConfig(**conf(family, **kw).to_peft_dict() | {"peft_type": None, "inference_mode": False})
    made = peft.get_peft_model(BUILDERS[family](), peft_config).eval()
    expected = run(made, x)
    made.save_pretrained(tmp_path / "theirs")
    loaded = peftkit.load_adapter(BUILDERS[family](), tmp_path / "theirs")
    torch.testing.assert_close(run(loaded, x), expected, atol=1e-5, rtol=0)
    theirs_keys = {k for k in file_keys(tmp_path / "theirs") if ".base_layer." not in k}
    assert {f"base_model.model.{k}" for k in peftkit.adapter_state_dict(loaded)} == theirs_keys
    assert theirs_keys == set(file_keys(tmp_path / "ours"))


def test_default_targets_are_hf_peft_s_oft_table():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING as theirs

    from peftkit.hf.arch import LORA_DEFAULT_TARGETS

    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in LORA_DEFAULT_TARGETS.items()}
    assert {k: ours.get(k) for k in theirs} == theirs  # peftkit's table may add architectures PEFT lacks
    model = peftkit.inject(tiny_llama(), OFTConfig())
    assert [p.split(".")[-1] for p, _ in oft_layers(model)] == ["q_proj", "v_proj"] * 2


def test_unsupported_layers_are_named_before_anything_changes():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\): it is transformers' Conv1D"):
        peftkit.inject(model, OFTConfig(target_modules=["c_attn", "lm_head"]))
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(tiny_gpt2(), peft.OFTConfig(target_modules=["c_attn"]))
    assert not list(oft_layers(model))
    model = tiny_conv()
    with pytest.raises(ValueError, match=r"conv1 \(Conv2d\): kernel_size=\(3, 3\): only 1x1 convolutions"):
        peftkit.inject(model, OFTConfig(target_modules=["conv1", "pointwise"], task_type=None))
    model.pointwise = nn.Conv2d(8, 8, 1, groups=2)
    with pytest.raises(ValueError, match=r"pointwise \(Conv2d\): groups=2"):
        peftkit.inject(model, OFTConfig(target_modules=["pointwise"], task_type=None))
    with pytest.raises(ValueError, match="matched no module"):
        peftkit.inject(tiny_llama(), OFTConfig(target_modules=["nope"]))
    assert not list(oft_layers(model))


def test_a_block_size_that_does_not_divide_is_moved_with_a_warning_naming_the_layers():
    with pytest.warns(UserWarning, match=r"oft_block_size=12 does not divide the width of 4 layer\(s\).*"
                                         r"model\.layers\.0\.self_attn\.q_proj: 4 x 8 over 32"):
        model = peftkit.inject(tiny_llama(), OFTConfig(oft_block_size=12, target_modules=["q_proj", "down_proj"]))
    shapes = {p: tuple(layer.oft_R["default"].shape) for p, layer in oft_layers(model)}
    assert shapes["model.layers.0.self_attn.q_proj"] == (4, 28) and shapes["model.layers.0.mlp.down_proj"] == (8, 28)  # 12 -> 8 (a tie with 16: the lower, as PEFT)


# --- merging ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, kw", [("llama", {}), ("llama", dict(use_cayley_neumann=False, coft=True)),
                                        ("conv", dict(block_share=True)),
                                        ("gpt2", dict(target_modules=["wte", "wpe"]))])
def test_merged_equals_unmerged_unmerge_restores_and_merging_twice_changes_nothing(family, kw):
    model, x = with_adapter(family, **kw), ids_for(family)
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


def test_safe_merge_refuses_nan_and_changes_nothing():
    model = with_adapter(target_modules=["v_proj"])
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.oft_R["default"][0, 0] = float("nan")
    before = base_state(model)
    with pytest.raises(ValueError, match=r"safe merge refused.*model\.layers\.1\.self_attn\.v_proj \(adapter 'default'\)"):
        peftkit.merge(model, safe=True)
    assert all(torch.equal(v, before[k]) for k, v in base_state(model).items())
    assert not peftkit.merged_adapters(model)


def test_merge_and_unload_leaves_plain_modules_with_the_adapted_outputs():
    model, x = with_adapter("conv"), ids_for("conv")
    adapted = run(model, x)
    merged = peftkit.merge_and_unload(model)
    assert not any(isinstance(m, OFTLayer) for m in merged.modules())
    assert isinstance(merged.pointwise, nn.Conv2d) and not getattr(merged, "peftkit_configs", {})
    torch.testing.assert_close(run(merged, x), adapted, atol=1e-5, rtol=0)


def test_nf4_base_takes_oft_and_merges_dense():
    model, x = peftkit.quantize(tiny_llama()), ids_for("llama")
    base = run(model, x)
    peftkit.inject(model, OFTConfig(target_modules="all-linear", oft_block_size=8))
    assert torch.equal(run(model, x), base)
    torch.manual_seed(0)
    model = peftkit.quantize(tiny_llama())
    peftkit.inject(model, conf())
    adapted = run(model, x)
    assert not torch.allclose(adapted, base, atol=1e-3)
    merged = peftkit.merge_and_unload(model, dtype=torch.float32)  # dequantized first: exact
    assert isinstance(merged.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(run(merged, x), adapted, atol=1e-4, rtol=0)


# --- training -----------------------------------------------------------------------------------------------
def test_training_changes_output_and_only_the_rotation_parameters_train():
    model, x = tiny_llama(), ids_for("llama")
    peftkit.inject(model, OFTConfig(target_modules="all-linear", oft_block_size=8, module_dropout=0.5))
    before = run(model, x)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(n.endswith(".oft_R.default") for n in trainable)
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


def test_module_dropout_sets_that_share_of_blocks_to_the_identity_in_training_only():
    import itertools

    model = with_adapter(target_modules=["down_proj"], oft_block_size=16, module_dropout=0.5)
    down = model.model.layers[0].mlp.down_proj  # 4 blocks of 16: 2 of them dropped per training forward
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        kept = list(down.rotation("default"))
        down.train()
        outputs = [down(x) for _ in range(6)]
        down.eval()
        torch.testing.assert_close(down(x), down.base(x @ torch.block_diag(*kept)), atol=1e-6, rtol=1e-6)
        for out in outputs:
            matching = [dropped for dropped in itertools.combinations(range(4), 2) if torch.allclose(
                out, down.base(x @ torch.block_diag(*[torch.eye(16) if i in dropped else b for i, b in enumerate(kept)])),
                atol=1e-6, rtol=1e-6)]
            assert len(matching) == 1
        assert not all(torch.equal(out, outputs[0]) for out in outputs)  # drawn afresh each time


def test_coft_keeps_every_block_within_its_radius_while_training():
    model, x = tiny_llama(), ids_for("llama")
    peftkit.inject(model, OFTConfig(target_modules=["q_proj", "v_proj"], oft_block_size=8, coft=True, eps=1e-3))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    for _ in range(3):
        optimizer.zero_grad()
        model(x, labels=x).loss.backward()
        optimizer.step()
        run(model, x)  # the forward projects the stored parameters, as PEFT's does
        for _, layer in oft_layers(model):
            p = layer.oft_R["default"]
            radius = 1e-3 / p.shape[0] ** 0.5
            assert float((2 ** 0.5 * p.detach().norm(dim=1)).max()) <= radius * (1 + 1e-5)
    assert any(float(layer.oft_R["default"].detach().abs().max()) > 0 for _, layer in oft_layers(model))


# --- save / load ----------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_identical(tmp_path):
    model, x = with_adapter(target_modules=["q_proj", "down_proj", "embed_tokens"], oft_block_size=16), ids_for("llama")
    expected = run(model, x)
    peftkit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["oft_block_size"]) == ("OFT", 0, 16)
    assert config["target_modules"] == ["q_proj", "down_proj", "embed_tokens"] and config["task_type"] == "CAUSAL_LM"
    keys = file_keys(tmp_path)
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"] == (2, 120)
    assert keys["base_model.model.model.layers.0.mlp.down_proj.oft_R.weight"] == (4, 120)
    assert keys["base_model.model.model.embed_tokens.oft_embedding_R.weight"] == (2, 120)
    assert len(keys) == 5
    fresh = peftkit.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(run(fresh, x), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.equal(run(copy.deepcopy(fresh), x), expected)
    assert torch.equal(run(pickle.loads(pickle.dumps(fresh)), x), expected)
    again = peftkit.load_adapter(tiny_llama(), tmp_path, name="task", trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n in dict(again.named_parameters()) if n.endswith(".task")}


def test_wrong_base_names_every_key_and_changes_nothing(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    peftkit.save_adapter(with_adapter(target_modules=["v_proj"]), tmp_path)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    x = ids_for("llama")
    before = run(wide, x)
    with pytest.raises(ValueError) as err:
        peftkit.load_adapter(wide, tmp_path)
    msg = str(err.value)
    assert "nothing was changed" in msg and "wrong shapes" in msg
    assert "model.layers.0.self_attn.v_proj.oft_R.weight: file (4, 28), model expects (6, 28)" in msg
    assert "model.layers.1.self_attn.v_proj.oft_R.weight" in msg
    assert not list(oft_layers(wide)) and not getattr(wide, "peftkit_configs", {})
    assert torch.equal(run(wide, x), before)


# --- hostile files ------------------------------------------------------------------------------------------
def test_a_tampered_tensor_shape_is_named_and_nothing_changes(tmp_path):
    peftkit.save_adapter(with_adapter(target_modules=["q_proj"]), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"] = torch.zeros(4, 27)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.oft_r"] = torch.zeros(4, 8, 8)  # PEFT < 0.14's key
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        peftkit.load_adapter(model, tmp_path)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj.oft_R.weight: file (4, 27), model expects (4, 28)" in msg
    assert "unexpected key(s) in the file:\n  model.layers.0.self_attn.q_proj.oft_r" in msg
    assert not list(oft_layers(model))


@pytest.mark.parametrize("change, message", [
    ({"layer_replication": [[0, 1]]}, r"OFT options peftkit does not support yet: layer_replication=\[\[0, 1\]\]"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] is not supported for OFT"),
    ({"bias": "oft_only"}, "bias='oft_only' is not supported for OFT"),
    ({"r": 4}, "give exactly one of r .* and oft_block_size"),
    ({"oft_block_size": -8}, "oft_block_size must be a whole number >= 0, got -8"),
    ({"num_cayley_neumann_terms": 10**9}, r"num_cayley_neumann_terms must be a whole number in \[1, 64\]"),
    ({"eps": float("nan")}, r"eps must be a finite number >= 0 \(COFT's radius\), got nan"),
    ({"coft": "yes"}, "coft must be true or false"),
    ({"module_dropout": 1.0}, r"module_dropout must be in \[0, 1\)"),
    ({"target_modules": "x" * 2000}, "target_modules 'xxx.* is longer than 1000 characters"),
    ({"target_modules": r".*\.q_proj", "layers_to_transform": [1]}, "HF PEFT then ignores layers_to_transform"),
])
def test_hostile_configs_are_refused_by_name(tmp_path, change, message):
    peftkit.save_adapter(with_adapter(target_modules=["q_proj"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        peftkit.load_adapter(model, tmp_path)
    assert not list(oft_layers(model))


def test_old_files_and_unknown_keys_are_named_and_the_config_round_trips():
    data = OFTConfig(target_modules=["q_proj"], layers_to_transform=1, coft=True).to_peft_dict()
    assert data["peft_type"] == "OFT" and data["layers_to_transform"] == [1] and data["oft_block_size"] == 32
    assert set(data) - {"inference_mode"} <= set(peft.OFTConfig.__dataclass_fields__)
    with pytest.warns(UserWarning, match="does not know: future_option"):
        config = peftkit.registry.config_from_peft_dict(data | {"future_option": 3, "peft_version": "9.9"})
    assert config == OFTConfig(target_modules=["q_proj"], layers_to_transform=[1], coft=True)
    with pytest.raises(ValueError, match="no oft_block_size: it was written by HF PEFT older than 0.14"):
        OFTConfig.from_peft_dict({k: v for k, v in data.items() if k != "oft_block_size"})
    with pytest.warns(UserWarning, match="written by HF PEFT 0.17.1, whose Cayley-Neumann series PEFT 0.18 changed"):
        OFTConfig.from_peft_dict(data | {"peft_version": "0.17.1", "use_cayley_neumann": True})
    with pytest.raises(ValueError, match="this reads 'OFT'"):
        OFTConfig.from_peft_dict({"peft_type": "LORA"})
    with pytest.raises(ValueError, match="layers_pattern is set but layers_to_transform is not"):
        OFTConfig(layers_pattern="layers")
    assert "OFT block size 32, Cayley-Neumann (5 terms), COFT eps=6e-05 on ['q_proj']" in config.describe()


# --- several adapters -----------------------------------------------------------------------------------------
def two_adapters():
    model = with_adapter(name="a", seed=1, target_modules=["q_proj", "v_proj", "embed_tokens"])
    torch.manual_seed(2)
    peftkit.inject(model, conf(target_modules=["q_proj", "embed_tokens", "down_proj"], oft_block_size=4), "b")
    return model


def test_several_adapters_switch_disable_add_merge_and_delete():
    model, x = two_adapters(), ids_for("llama")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, OFTLayer) and not isinstance(q.base, OFTLayer) and q.adapter_names() == ["a", "b"]
    base = run(tiny_llama(), x)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, x), base)
    b = run(model, x)
    peftkit.set_active(model, "a")
    a = run(model, x)
    assert not torch.allclose(a, b, atol=1e-3)
    peftkit.set_active(model, ["a", "b"])
    both = run(model, x)
    peftkit.merge(model)  # rotations do not commute: merged == forward needs the order the forward uses
    torch.testing.assert_close(run(model, x), both, atol=1e-5, rtol=0)
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=0)
    peftkit.unmerge(model)
    torch.testing.assert_close(run(model, x), both, atol=1e-5, rtol=0)
    rows = ["a", None, "b", "a"]
    x4 = ids_for("llama", batch=4)
    with peftkit.per_row(model, rows):
        mixed = run(model, x4)
    for i, adapter in enumerate(rows):
        peftkit.set_active(model, [] if adapter is None else [adapter])
        torch.testing.assert_close(mixed[i:i + 1], run(model, x4[i:i + 1]), atol=1e-5, rtol=1e-5)
    peftkit.delete_adapter(model, "a")
    peftkit.set_active(model, "b")
    torch.testing.assert_close(run(model, x), b, atol=1e-5, rtol=0)
    peftkit.delete_adapter(model, "b")
    assert not any(isinstance(m, OFTLayer) for m in model.modules())
    torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=0)


def test_oft_and_lora_share_a_model_but_not_a_module():
    model, x = tiny_llama(), ids_for("llama")
    nonzero_adapter(model, ["q_proj"], "lora")
    torch.manual_seed(0)
    peftkit.inject(model, conf(target_modules=["v_proj"]), "oft")
    with peftkit.per_row(model, ["lora", "oft", None]):
        mixed = run(model, x)
    for i, adapter in enumerate(["lora", "oft"]):
        peftkit.set_active(model, adapter)
        torch.testing.assert_close(mixed[i:i + 1], run(model, x[i:i + 1]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"q_proj \(LoraLayer\): it is already wrapped by another peftkit"):
        peftkit.inject(model, OFTConfig(target_modules=["q_proj"]), "oft2")
    with pytest.raises(ValueError, match=r"cannot wrap: .*v_proj \(OFTLayer\)"):
        nonzero_adapter(model, ["v_proj"], "lora2")
    assert set(model.peftkit_configs) == {"lora", "oft"}


def test_half_precision_base_keeps_its_dtype_with_an_fp32_rotation():
    model, x = tiny_llama().to(torch.bfloat16), ids_for("llama")
    peftkit.inject(model, conf(target_modules=["q_proj", "embed_tokens"]))
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight is q.base.weight and q.oft_R["default"].dtype == torch.float32
    assert q(torch.randn(2, 3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert run(model, x).dtype == torch.bfloat16


# --- the CLI, the planner and the sweep ---------------------------------------------------------------------------
def test_train_method_oft_saves_an_adapter_hf_peft_loads(tiny_model_dir, qa_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(["train", "--method", "oft", "--model", tiny_model_dir, "--data", qa_jsonl, "--output-dir",
                 str(out), "--max-steps", "2", "--batch-size", "4", "--lr", "0.01", "--r", "8",
                 "--target-modules", "q_proj,v_proj,down_proj", "--no-progress", "--threads", "1",
                 "--save-every", "0"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["oft_block_size"]) == ("OFT", 0, 8)
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = peftkit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), out / "adapter")
    base = run(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), x)
    assert not torch.allclose(run(ours, x), base, atol=1e-6)  # it trained
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    torch.testing.assert_close(run(theirs.eval(), x), run(ours, x), atol=1e-5, rtol=0)
    assert main(["train", "--method", "oft", "--model", tiny_model_dir, "--data", qa_jsonl, "--r", "1",
                 "--output-dir", str(tmp_path / "r1"), "--max-steps", "1", "--no-progress"]) == 2


@pytest.mark.parametrize("targets, block", [("all-linear", 16), ("q_proj,down_proj", 8), ("attention", 12),
                                            ("all-linear", 48)])
def test_planned_trainable_parameters_equal_what_inject_adds(targets, block):
    model = tiny_llama()
    shape = presets.from_config(model.config.to_dict())
    spec = targets if targets in ("all-linear", "attention") else tuple(targets.split(","))
    settings = memory.Settings(method="oft", r=block, targets=spec)
    names = settings.target_names(shape)
    options = type("Options", (), {"r": block, "target_modules": ",".join(names), "method": "oft"})()
    peftkit.inject(model, peftkit.registry.by_train_name("oft").config_from_options(options))
    assert memory.adapter_params(shape, settings) == peftkit.trainable_parameters(model)[0]


def test_plan_cli_and_sweep_take_method_oft(capsys, tmp_path):
    from peftkit.plan import sweep
    from peftkit.plan.sweep_cli import settings_from_args

    assert main(["plan", "llama-2-7b", "--method", "oft", "--r", "32", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    per_block = sum(i // 32 * 32 * 31 // 2 for i, _ in presets.resolve("llama-2-7b").linears().values())
    assert record["trainable_params"] == 32 * per_block
    assert main(["plan", "llama-2-7b", "--method", "oft", "--target-modules", "wq"]) == 2
    assert "OFT targets ['wq'] are not linear layers" in capsys.readouterr().err
    assert main(["plan", "llama-2-7b", "--method", "oft", "--r", "1"]) == 2
    assert "OFT block size (--r) 1 has no trainable parameter" in capsys.readouterr().err
    assert sweep.parse_methods("oft,lora") == ("oft", "lora")
    assert [c.name for c in sweep.candidates(("oft",), (4, 16))] == ["oft-r4", "oft-r16"]
    import argparse

    from peftkit.plan.sweep_cli import add_sweep_command

    parser = argparse.ArgumentParser(prog="peftkit")
    add_sweep_command(parser.add_subparsers(dest="command"))
    settings, base = settings_from_args(parser.parse_args(["sweep", "--methods", "oft,lora", "--ranks", "8,32",
                                                           "--output-dir", str(tmp_path)]))
    assert settings.methods == ("oft", "lora")
    trial = sweep.trial_options(base, sweep.Candidate("oft", 8), 3, tmp_path / "t")
    made = peftkit.registry.by_train_name(trial.method).config_from_options(trial)
    assert (made.r, made.oft_block_size, made.target_modules) == (0, 8, "all-linear")


def _saved_bytes_per_token(model, batch: int = 3, seq: int = 16) -> float:
    """Bytes of the distinct tensors autograd saves inside decoder block 1 (parameters and the attention inputs
    shared by every block excluded), per token."""
    layer = model.model.layers[1]
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, recording = {}, [False]

    def pre(module, args, kwargs):
        recording[0] = True
        for value in list(kwargs.values()) + list(kwargs.get("position_embeddings") or ()):
            if isinstance(value, torch.Tensor):
                excluded.add(value.untyped_storage().data_ptr())

    def pack(t):
        if recording[0]:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True),
             layer.register_forward_hook(lambda *a: recording.__setitem__(0, False))]
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids)
    for h in hooks:
        h.remove()
    return sum(n for ptr, n in saved.items() if ptr not in excluded) / (batch * seq)


@pytest.mark.parametrize("block", [4, 16])
def test_planned_activation_bytes_match_what_autograd_saves_beyond_lora(block):
    """The OFT term, measured as the difference to LoRA's (whose own term test_plan measures): same block."""
    shape = presets.from_config(tiny_llama().config.to_dict())
    width = {"ln1": shape.hidden_size, "attn": 0, "ln2": shape.hidden_size, "mid": shape.intermediate_size}
    oft, lora = tiny_llama(), tiny_llama()
    peftkit.inject(oft, OFTConfig(oft_block_size=block, target_modules="all-linear"))
    peftkit.inject(lora, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    measured = _saved_bytes_per_token(oft) - _saved_bytes_per_token(lora)
    terms = {m: peftkit.registry.by_train_name(m).plan.activations(
        shape, memory.Settings(method=m, r=r, dtype="float32", batch_size=3, seq_len=16), width, 4, 4)
        for m, r in (("oft", block), ("lora", 4))}
    assert measured == pytest.approx(terms["oft"] - terms["lora"], rel=0.1, abs=16)
