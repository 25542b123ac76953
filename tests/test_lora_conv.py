"""LoRA and DoRA on torch's convolutions (nn.Conv1d, nn.Conv2d with and without groups, nn.Conv3d) and on
nn.MultiheadAttention: files are HF PEFT's in both directions (same keys, same outputs, fp32 atol 1e-5), and the
method checklist holds (no-op at init, only adapters train, merge round trip, disable, several adapters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LazyImport
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.methods.lora import LoraLayer, LoraMhaLayer, parameter_count
from peftkit.targeting import adaptable_kind

peft = LazyImport("peft", optional=True)
ATOL = 1e-5
# HF PEFT warns that a LoRA on a grouped convolution cannot merge; peftkit refuses that merge by name (tested here)
pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")


class ConvNet(nn.Module):
    """Every convolution LoRA takes: 2-d (3x3, grouped with stride, 1x1), 1-d and 3-d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_g = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.seq = nn.Conv1d(8, 6, 3, padding=1)
        self.vol = nn.Conv3d(3, 4, (2, 3, 3), padding=(0, 1, 1), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv_g(F.relu(self.conv_a(x))))  # (N, 8, 4, 4)
        s = self.seq(self.pointwise(h).flatten(2))  # (N, 6, 16)
        v = self.vol(torch.stack([x, x.flip(-1)], dim=2))  # (N, 4, 1, 8, 8)
        return torch.cat([s.flatten(1), v.flatten(1)], dim=1)


class AttnNet(nn.Module):
    """A projection, nn.MultiheadAttention and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.mha(h, h, h)
        return self.head(a + h)


def conv_net() -> nn.Module:
    torch.manual_seed(11)
    return ConvNet().eval()


def attn_net() -> nn.Module:
    torch.manual_seed(12)
    return AttnNet().eval()


def x_for(builder, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    shape = (batch, 3, 8, 8) if builder is conv_net else (batch, 7, 6)
    return torch.randn(shape, generator=g)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


ALL_CONVS = ["conv_a", "conv_g", "pointwise", "seq", "vol"]
UNGROUPED = ["conv_a", "pointwise", "seq", "vol"]
CASES = {
    "conv-lora": (conv_net, dict(target_modules=ALL_CONVS)),
    "conv-lora-regex-rslora-patterns": (conv_net, dict(target_modules=r"(conv_.|seq|vol)", use_rslora=True,
                                                       rank_pattern={"seq": 2}, alpha_pattern={"vol": 3})),
    "conv-dora": (conv_net, dict(target_modules=UNGROUPED, use_dora=True)),
    "mha-lora": (attn_net, dict(target_modules=["mha", "proj"])),
}


def ours(builder, name: str = "default", seed: int = 0, **kw) -> nn.Module:
    """A model with a random (non-zero) adapter; DoRA magnitudes moved off their initial norms."""
    model = builder()
    torch.manual_seed(seed)
    kw = {"r": 4, "lora_alpha": 8, "task_type": None, **kw}
    peftkit.inject(model, peftkit.LoraConfig(init_lora_weights=False, **kw), name)
    _perturb(model, "lora_magnitude_vector", seed)
    return model


def _perturb(model: nn.Module, word: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if word in n:
                p.add_(torch.rand(p.shape, generator=g) * 0.3)


def _zero_out_proj_update(model: nn.Module) -> None:
    """HF PEFT 0.21.2 adds an nn.MultiheadAttention's out_proj update twice (huggingface/peft PR #3774, see
    test_attention_out_proj_update_is_added_once_where_hf_peft_0_21_adds_it_twice): output parity is compared with
    that update at zero (the in_proj one, and every key and tensor, are compared as they are)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "out_proj.lora_B" in n:
                p.zero_()


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


# --- HF PEFT, both directions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_file_loads_in_hf_peft_with_its_keys_and_outputs(case, tmp_path):
    builder, kw = CASES[case]
    model, x = ours(builder, **kw), x_for(builder)
    if builder is attn_net:
        _zero_out_proj_update(model)
    expected = run(model, x)
    assert not torch.allclose(expected, run(builder(), x), atol=1e-3)  # the adapter does something
    peftkit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(builder(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs, x), expected, atol=ATOL, rtol=0)
    theirs.save_pretrained(tmp_path / "resaved")
    mine, back = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "resaved"))
    assert mine.keys() == back.keys()
    assert all(mine[k].shape == back[k].shape for k in mine)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_peft_file_loads_in_peftkit(case, tmp_path):
    builder, kw = CASES[case]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(builder(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    _perturb(theirs, "lora_magnitude_vector", 0)
    if builder is attn_net:
        _zero_out_proj_update(theirs)
    theirs.eval()
    x = x_for(builder)
    expected = run(theirs, x)
    theirs.save_pretrained(tmp_path / "theirs")
    model = peftkit.load_adapter(builder(), tmp_path / "theirs")
    torch.testing.assert_close(run(model, x), expected, atol=ATOL, rtol=0)
    peftkit.save_adapter(model, tmp_path / "ours")
    mine, theirs_t = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert mine.keys() == theirs_t.keys()
    assert all(torch.equal(mine[k], theirs_t[k]) for k in mine)


def test_attention_out_proj_update_is_added_once_where_hf_peft_0_21_adds_it_twice(tmp_path):
    model, x = ours(attn_net, target_modules=["mha"]), x_for(attn_net)
    peftkit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(attn_net(), tmp_path / "ours").eval()
    peft_mha = theirs.base_model.model.mha
    d_in, d_out = peft_mha.get_delta_weight("default"), peft_mha.base_layer.out_proj.get_delta_weight("default")
    torch.testing.assert_close(d_in, model.mha.delta_weight("default"), atol=1e-7, rtol=0)  # same update formulas
    torch.testing.assert_close(d_out, model.mha.out_lora.delta_weight("default"), atol=1e-7, rtol=0)
    once, twice = attn_net(), attn_net()
    with torch.no_grad():
        for reference, k in ((once, 1), (twice, 2)):
            reference.mha.in_proj_weight += d_in
            reference.mha.out_proj.weight += k * d_out
    assert not torch.allclose(run(once, x), run(twice, x), atol=1e-3)
    torch.testing.assert_close(run(model, x), run(once, x), atol=ATOL, rtol=0)
    theirs_out = run(theirs, x)  # PEFT merges W + dW, then out_proj.merge adds dW again (its PR #3774 fixes that)
    assert torch.allclose(theirs_out, run(twice, x), atol=ATOL) or torch.allclose(theirs_out, run(once, x), atol=ATOL)


def test_training_forward_with_dropout_matches_hf_peft_on_convolutions(tmp_path):
    kw = dict(target_modules=UNGROUPED, use_dora=True, lora_dropout=0.3)
    model = ours(conv_net, **kw)
    peftkit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "ours", is_trainable=True)
    model.train()
    theirs.train()
    x = x_for(conv_net)
    torch.manual_seed(3)
    mine = model(x)
    torch.manual_seed(3)
    torch.testing.assert_close(theirs(x), mine, atol=ATOL, rtol=0)


# --- the checklist ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder,kw", [(conv_net, dict(target_modules=ALL_CONVS)),
                                        (conv_net, dict(target_modules=UNGROUPED, use_dora=True)),
                                        (attn_net, dict(target_modules=["mha"]))])
def test_fresh_adapter_is_a_no_op_and_only_adapters_train(builder, kw):
    model, x = builder(), x_for(builder)
    base = run(model, x)
    peftkit.inject(model, peftkit.LoraConfig(r=4, **kw))
    assert torch.equal(run(model, x), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    counted = sum(parameter_count(adaptable_kind(m), m.base, 4) for m in model.modules()
                  if isinstance(m, (LoraLayer, LoraMhaLayer)) and getattr(m, "peftkit_holder"))
    dora = sum(m.lora_magnitude_vector["default"].numel() for m in model.modules()
               if isinstance(m, LoraLayer) and "default" in m.lora_magnitude_vector)
    assert peftkit.trainable_parameters(model)[0] == counted + dora
    frozen = base_weights(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    model.eval()
    assert not torch.allclose(run(model, x), base, atol=1e-4)
    assert all(torch.equal(v, frozen[k]) for k, v in base_weights(model).items())


@pytest.mark.parametrize("builder,kw", [(conv_net, dict(target_modules=UNGROUPED)),
                                        (conv_net, dict(target_modules=UNGROUPED, use_dora=True)),
                                        (attn_net, dict(target_modules=["mha", "proj"]))])
def test_merge_round_trip_disable_and_unload(builder, kw):
    model, x = ours(builder, **kw), x_for(builder)
    base = run(builder(), x)
    adapted = run(model, x)
    before = base_weights(model)
    with peftkit.disable_adapters(model):
        assert torch.equal(run(model, x), base)
    assert torch.equal(run(model, x), adapted)
    peftkit.merge(model)
    merged_weights = base_weights(model)
    torch.testing.assert_close(run(model, x), adapted, atol=ATOL, rtol=0)
    peftkit.merge(model)  # twice: nothing changes
    assert all(torch.equal(v, merged_weights[k]) for k, v in base_weights(model).items())
    with peftkit.disable_adapters(model):
        torch.testing.assert_close(run(model, x), base, atol=ATOL, rtol=0)
    peftkit.unmerge(model)
    for k, v in base_weights(model).items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    unloaded = peftkit.merge_and_unload(model)
    assert not any(isinstance(m, (LoraLayer, LoraMhaLayer)) for m in unloaded.modules())
    if builder is attn_net:
        assert type(unloaded.mha) is nn.MultiheadAttention and type(unloaded.mha.out_proj) is not LoraLayer
        assert set(unloaded.state_dict()) == set(builder().state_dict())
    torch.testing.assert_close(run(unloaded, x), adapted, atol=ATOL, rtol=0)


def test_grouped_convolution_runs_but_refuses_to_merge_naming_it_and_changes_nothing():
    model, x = ours(conv_net, target_modules=["conv_g", "pointwise"]), x_for(conv_net)
    adapted = run(model, x)
    before = base_weights(model)
    with pytest.raises(ValueError, match=r"merge refused, no weight was changed: conv_g .*groups=2"):
        peftkit.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in base_weights(model).items())
    assert not peftkit.merged_adapters(model) and torch.equal(run(model, x), adapted)


@pytest.mark.parametrize("builder,target", [(conv_net, "seq"), (attn_net, "mha")])
def test_safe_merge_refuses_nan_and_changes_nothing(builder, target):
    model = ours(builder, target_modules=[target])
    with torch.no_grad():
        getattr(model, target).lora_A["default"].view(-1)[0] = float("nan")
    before = base_weights(model)
    with pytest.raises(ValueError, match=rf"safe merge refused.*{target} \(adapter 'default'\)"):
        peftkit.merge(model, safe=True)
    assert all(torch.equal(v, before[k]) for k, v in base_weights(model).items())


def test_save_load_round_trip_and_wrong_base_names_every_key(tmp_path):
    for builder, kw in CASES.values():
        model, x = ours(builder, **kw), x_for(builder)
        peftkit.save_adapter(model, tmp_path / "a")
        torch.testing.assert_close(run(peftkit.load_adapter(builder(), tmp_path / "a"), x), run(model, x),
                                   atol=0, rtol=0)
    peftkit.save_adapter(ours(conv_net, target_modules=UNGROUPED, use_dora=True), tmp_path / "c")
    other = conv_net()
    other.seq = nn.Conv1d(8, 7, 3, padding=1)
    before = base_weights(other)
    with pytest.raises(ValueError, match=r"(?s)seq\.lora_B\.weight: file \(6, 4, 1\).*seq\.lora_magnitude_vector: file \(1, 6, 1\)"):
        peftkit.load_adapter(other, tmp_path / "c")
    assert not getattr(other, "peftkit_configs", {}) and all(torch.equal(v, before[k])
                                                             for k, v in base_weights(other).items())


def test_several_adapters_switch_merge_and_mixed_rows_on_convolutions():
    model, x = ours(conv_net, "a", target_modules=ALL_CONVS), x_for(conv_net, batch=4)
    torch.manual_seed(1)
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=UNGROUPED, use_dora=True, init_lora_weights=False),
                   "b")
    base = run(conv_net(), x)
    peftkit.set_active(model, "a")
    a = run(model, x)
    peftkit.set_active(model, "b")
    b = run(model, x)
    assert not torch.allclose(a, b, atol=1e-3) and not torch.allclose(b, base, atol=1e-3)
    rows = ["a", None, "b", "a"]
    with peftkit.per_row(model, rows):
        mixed = run(model, x)
    for i, expected in enumerate([a, base, b, a]):
        torch.testing.assert_close(mixed[i], expected[i], atol=ATOL, rtol=0)
    peftkit.delete_adapter(model, "a")
    peftkit.set_active(model, ["b"])
    peftkit.merge(model)
    torch.testing.assert_close(run(model, x), b, atol=ATOL, rtol=0)


def test_several_adapters_on_attention_and_mixed_rows_refused_by_name():
    model, x = ours(attn_net, "a", target_modules=["mha"]), x_for(attn_net)
    torch.manual_seed(1)
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["mha"], init_lora_weights=False), "b")
    peftkit.set_active(model, ["a", "b"])
    both = run(model, x)
    peftkit.set_active(model, "a")
    assert not torch.allclose(run(model, x), both, atol=1e-3)
    peftkit.set_active(model, ["a", "b"])
    peftkit.merge(model)
    torch.testing.assert_close(run(model, x), both, atol=ATOL, rtol=0)
    peftkit.unmerge(model)
    with pytest.raises(ValueError, match=r"per_row: adapters \['a'\] adapt an nn.MultiheadAttention"):
        with peftkit.per_row(model, ["a", None, None]):
            run(model, x)
    assert model.mha.row_adapters is None
    peftkit.delete_adapter(model, "a")
    peftkit.delete_adapter(model, "b")
    assert type(model.mha) is nn.MultiheadAttention and type(model.mha.out_proj) is not LoraLayer


def test_transformer_encoder_layer_does_not_skip_the_adapter_on_its_fused_path():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    base = run(layer, x)
    torch.manual_seed(0)
    peftkit.inject(layer, peftkit.LoraConfig(r=2, target_modules=["self_attn"], init_lora_weights=False))
    adapted = run(layer, x)
    assert not torch.allclose(adapted, base, atol=1e-3)  # HF PEFT 0.21.2 returns the base output here
    peftkit.merge(layer)
    torch.testing.assert_close(run(layer, x), adapted, atol=ATOL, rtol=0)


@pytest.mark.parametrize("change,kw,message", [
    (lambda m: setattr(m, "seq", nn.Conv1d(8, 6, 3, padding=1, padding_mode="reflect")), {},
     r"seq \(Conv1d\): padding_mode='reflect'"),
    (lambda m: setattr(m, "conv_a", nn.Conv2d(3, 8, 3, padding=2, dilation=2)), {},
     r"conv_a \(Conv2d\): dilation=\(2, 2\)"),
    (None, dict(r=3), r"conv_g \(Conv2d\): Conv2d with groups=2 and rank 3: the rank must be divisible by groups"),
    (None, dict(use_dora=True), r"conv_g \(Conv2d\): DoRA on a Conv2d with groups=2"),
    (None, dict(init_lora_weights="pissa"), r"pointwise \(Conv2d\): init_lora_weights='pissa' applies to linear"),
])
def test_convolutions_lora_cannot_take_are_named_before_anything_changes(change, kw, message):
    model = conv_net()
    if change:
        change(model)
    before = base_weights(model)
    with pytest.raises(ValueError, match=message):
        peftkit.inject(model, peftkit.LoraConfig(**{"r": 4, "target_modules": ALL_CONVS, **kw}))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in base_weights(model).items())


@pytest.mark.parametrize("kw,message", [
    (dict(target_modules=["mha"], use_dora=True), r"mha \(MultiheadAttention\): DoRA on nn.MultiheadAttention"),
    (dict(target_modules=["mha"], bias="lora_only"), r"mha \(MultiheadAttention\): bias='lora_only'"),
    (dict(target_modules="all-linear"), r"mha.out_proj \(NonDynamicallyQuantizableLinear\): it is the out_proj of "
                                        r"nn.MultiheadAttention 'mha'"),
])
def test_attention_settings_lora_cannot_take_are_named(kw, message):
    model = attn_net()
    with pytest.raises(ValueError, match=message):
        peftkit.inject(model, peftkit.LoraConfig(**kw))
    assert not any(isinstance(m, (LoraLayer, LoraMhaLayer)) for m in model.modules())
    model.mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
    with pytest.raises(ValueError, match=r"mha \(MultiheadAttention\): query, key and value have different sizes"):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=["mha"]))


def test_combine_sums_convolution_adapters_exactly_and_refuses_attention():
    model = ours(conv_net, "a", target_modules=UNGROUPED)
    torch.manual_seed(1)
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["seq", "vol"], init_lora_weights=False), "b")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    expected = [0.5 * m.delta_weight("a") - (2.0 * m.delta_weight("b") if "b" in m.lora_A else 0) for m in layers]
    assert layers[-1].delta_weight("a").dim() == 5  # the 3-d convolution's kernel
    peftkit.combine(model, {"a": 0.5, "b": -2.0}, "cat")
    peftkit.combine(model, {"a": 0.5, "b": -2.0}, "svd", how="svd", rank=6)  # rank 6 >= 4 + 2: still exact
    for m, delta in zip(layers, expected):
        torch.testing.assert_close(m.delta_weight("cat"), delta, atol=1e-6, rtol=0)
        torch.testing.assert_close(m.delta_weight("svd"), delta, atol=1e-5, rtol=0)
    x = x_for(conv_net)
    peftkit.set_active(model, "cat")
    cat = run(model, x)
    peftkit.merge(model, "cat")
    torch.testing.assert_close(run(model, x), cat, atol=ATOL, rtol=0)
    attn = ours(attn_net, "a", target_modules=["mha", "proj"])
    with pytest.raises(ValueError, match=r"combine works on .*\['mha.base.out_proj'\]"):
        peftkit.combine(attn, {"a": 1.0}, "c")
