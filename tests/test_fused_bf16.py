"""The fused LoRA training nodes over a 16-bit base with fp32 adapters (PEFT's autocast_adapter_dtype): the fused
linear node, the fused SwiGLU MLP, padding-free rows and the head loss run (counted), and compute what the
module path computes within the base dtype's rounding: values and gradients, each checked against the unfused
path and against a float64 copy of the same weights (the fused error is at most about the module path's)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import peftkit
from peftkit.methods.lora import fused as lora_fused
from peftkit.methods.lora import layer as lora_layer
from peftkit.methods.lora import mlp as lora_mlp
from peftkit.train import loss as loss_mod

HALVES = [torch.bfloat16, torch.float16]
# relative error (norm of the difference / norm of the reference) of one 16-bit computation through the tiny
# model: a few ulps of the dtype (bf16 has 8 mantissa bits, fp16 11)
REL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _model(dtype: torch.dtype, **config) -> torch.nn.Module:
    model = tiny_llama().to(dtype).train()
    torch.manual_seed(3)
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **config}
    peftkit.inject(model, peftkit.LoraConfig(**config))
    return model


def _as_double(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights (16-bit values are exact in float64) and adapters, in float64."""
    ref = _model(torch.float32).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return ref


def _batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return ids, mask, labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _counted(monkeypatch) -> dict[str, list]:
    calls: dict[str, list] = {"linear": [], "mlp": [], "head": []}
    for key, cls in (("linear", lora_fused.LoraLinearFunction), ("mlp", lora_mlp.LoraSwiGLUFunction),
                     ("head", loss_mod._FusedHeadLoss)):
        real = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, _real=real, _key=key: calls[_key].append(1) or _real(*a))
    return calls


def _unfused(monkeypatch) -> None:
    """The module path: no fused linear node (the layer's own check says no) and no SwiGLU node."""
    monkeypatch.setattr(lora_layer, "fusable", lambda *a: False)
    monkeypatch.setattr(lora_mlp.fused, "fusable", lambda *a: False)


def _logits_and_grads(model, ids, mask, mlp: bool, keep=None):
    model.zero_grad()
    with lora_fused.real_rows(keep):
        if mlp:
            with lora_mlp.fused_mlps(model):
                logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
    weights = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).view_as(logits)
    (logits.double() * weights * mask[..., None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[mask.bool()], grads


def _compare(fused, plain, exact, dtype):
    """fused and plain (values, grads) close to each other and fused no further from float64 than plain."""
    (out_f, grads_f), (out_p, grads_p), (out_x, grads_x) = fused, plain, exact
    assert set(grads_f) == set(grads_p) == set(grads_x) and len(grads_f) == 28
    assert all(g.dtype == torch.float32 for g in grads_f.values())  # fp32 gradients for the fp32 master weights
    pairs = [("logits", out_f, out_p, out_x)] + [(n, grads_f[n], grads_p[n], grads_x[n]) for n in grads_p]
    for name, f, p, x in pairs:
        assert _rel(f, p) < REL[dtype], (name, _rel(f, p))
        assert _rel(f, x) <= 2 * _rel(p, x) + REL[dtype] / 10, (name, _rel(f, x), _rel(p, x))


@pytest.mark.parametrize("dtype", HALVES)
def test_fused_linear_node_runs_and_equals_the_module_path(dtype, monkeypatch):
    model = _model(dtype)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    ids, mask, _ = _batch()
    calls = _counted(monkeypatch)
    fused = _logits_and_grads(model, ids, mask, mlp=False)
    assert len(calls["linear"]) == 14  # every adapted linear of the two blocks (none ran before 16-bit support)
    exact = _logits_and_grads(_as_double(model), ids, mask, mlp=False)
    _unfused(monkeypatch)
    calls["linear"].clear()
    plain = _logits_and_grads(model, ids, mask, mlp=False)
    assert calls["linear"] == []
    _compare(fused, plain, exact, dtype)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("padding_free", [False, True])
def test_fused_swiglu_node_runs_and_equals_the_module_path(dtype, padding_free, monkeypatch):
    model = _model(dtype)
    ids, mask, _ = _batch()
    keep = mask.bool() if padding_free else None
    calls = _counted(monkeypatch)
    fused = _logits_and_grads(model, ids, mask, mlp=True, keep=keep)
    assert (len(calls["mlp"]), len(calls["linear"])) == (2, 8)  # 2 MLPs, 4 attention linears in each block
    exact = _logits_and_grads(_as_double(model), ids, mask, mlp=False)
    _unfused(monkeypatch)
    calls["mlp"].clear(), calls["linear"].clear()
    plain = _logits_and_grads(model, ids, mask, mlp=True, keep=keep)
    assert calls["mlp"] == calls["linear"] == []  # the module path
    _compare(fused, plain, exact, dtype)


@pytest.mark.parametrize("dtype", HALVES)
def test_training_loss_with_every_fused_node_equals_transformers_loss(dtype, monkeypatch):
    """sum_token_loss on a padded batch: padding-free fused linears and MLPs and the chunked head loss, against
    the model's own loss (labels=...) through the module path, and both against float64."""
    model = _model(dtype)
    ids, mask, labels = _batch()
    calls = _counted(monkeypatch)

    def run(m, fused: bool):
        m.zero_grad()
        if fused:
            total, n = loss_mod.sum_token_loss(m, ids, mask, labels, chunk=7)  # several chunks of the head loss
            loss = total / n
        else:
            loss = loss_mod.reference_loss(m, ids, mask, labels)
        loss.backward()
        return loss.detach().reshape(1), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    fused = run(model, True)
    assert (len(calls["linear"]), len(calls["mlp"]), len(calls["head"])) == (8, 2, 1)
    with lora_fused.real_rows(None):
        assert lora_fused.rows_for(torch.zeros(3, 12, 1)) is None
    exact = run(_as_double(model), False)
    _unfused(monkeypatch)
    plain = run(model, False)
    assert fused[0].dtype == torch.float32
    _compare(fused, plain, exact, dtype)


@pytest.mark.parametrize("dtype", HALVES)
def test_head_loss_in_16_bit_equals_the_chunked_module_path(dtype):
    """_FusedHeadLoss against head + cross-entropy by autograd, on a 16-bit head (values and the hidden states'
    gradient, which flows back into the 16-bit decoder)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 128, bias=False).to(dtype)
    hidden = torch.randn(20, 32).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(1))
    total = loss_mod._FusedHeadLoss.apply(hidden, head.weight, None, targets, head, None, 6)
    total.backward()
    fused = (total.detach().reshape(1), hidden.grad.clone())
    hidden.grad = None
    plain_total = loss_mod._chunk_loss(head, None, hidden, targets)
    plain_total.backward()
    plain = (plain_total.detach().reshape(1), hidden.grad.clone())
    h64 = hidden.detach().double().requires_grad_(True)
    exact_total = loss_mod._chunk_loss(head.double(), None, h64, targets)
    exact_total.backward()
    for f, p, x in zip(fused, plain, (exact_total.detach().reshape(1), h64.grad)):
        assert f.dtype == p.dtype
        assert _rel(f, p) < REL[dtype]
        assert _rel(f, x) <= 2 * _rel(p, x) + REL[dtype] / 10


def test_dtype_mixes_the_nodes_run_and_refuse():
    x16, A32 = torch.zeros(1, 4, dtype=torch.bfloat16), torch.nn.Parameter(torch.zeros(2, 4))
    assert lora_fused.fusable(torch.nn.Linear(4, 4).to(torch.bfloat16), x16, A32, 0.0, True)
    assert lora_fused.fusable(torch.nn.Linear(4, 4).half(), x16.half(), A32, 0.0, True)
    assert lora_fused.fusable(torch.nn.Linear(4, 4).to(torch.bfloat16), x16, A32.to(torch.bfloat16), 0.0, True)
    assert not lora_fused.fusable(torch.nn.Linear(4, 4), x16, A32, 0.0, True)  # input not in the base's dtype
    assert not lora_fused.fusable(torch.nn.Linear(4, 4).double(), x16.double(), A32, 0.0, True)  # fp64 base
    assert not lora_fused.fusable(torch.nn.Linear(4, 4).half(), x16.half(), A32.to(torch.bfloat16), 0.0, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lora_fused.fusable(torch.nn.Linear(4, 4).to(torch.bfloat16), x16, A32, 0.0, True)
