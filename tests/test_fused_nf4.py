"""The fused QLoRA nodes (an NF4 base under LoRA: linear and SwiGLU MLP) compute what the module path computes,
in fp32 and bf16 compute, with and without padding-free rows, and keep no dense weight between forward and backward."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from fast_path_helpers import close, fp32_twin, within_rounding
from torch import nn

import peftkit
from peftkit.methods.lora import fused as lora_fused
from peftkit.methods.lora import fused_nf4
from peftkit.methods.lora import layer as lora_layer
from peftkit.methods.lora import mlp as lora_mlp
from peftkit.methods.lora import mlp_nf4
from peftkit.quant.linear import NF4Linear

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # of the reference's largest magnitude


def _qlora(dtype: torch.dtype = torch.float32, compute: torch.dtype | None = None, **config) -> nn.Module:
    """A tiny Llama in `dtype`, its linears in NF4 (compute dtype `compute`, default `dtype`), LoRA on all of them."""
    model = peftkit.quantize(tiny_llama().to(dtype), compute_dtype=compute or dtype)
    torch.manual_seed(3)
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **config}
    return peftkit.inject(model, peftkit.LoraConfig(**config)).train()


def _batch(padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 6:] = 0
        mask[2, 4:] = 0
    elif padding == "left":
        mask[1, :3] = 0
        mask[2, :5] = 0
    return ids, mask


def _counting(monkeypatch, cls) -> list[int]:
    calls: list[int] = []
    real = cls.apply
    monkeypatch.setattr(cls, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _run(model, ids, mask, fused: bool, monkeypatch, keep=None, mlp=False):
    """(logits, grads of every trainable parameter) with the NF4 nodes on or off."""
    monkeypatch.setattr(lora_layer, "nf4_fusable", fused_nf4.nf4_fusable if fused else (lambda *a: False))
    model.zero_grad()
    with lora_fused.real_rows(keep if fused else None):
        if mlp and fused:
            with lora_mlp.fused_mlps(model):
                logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
    (logits.float() * weights * mask[..., None]).sum().backward()
    return logits.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_nf4_nodes_equal_the_module_path(dtype, padding, mlp, monkeypatch):
    model = _qlora(dtype)
    ids, mask = _batch(padding)
    keep = mask.bool() if padding != "none" else None
    linear_calls = _counting(monkeypatch, fused_nf4.LoraNF4Function)
    mlp_calls = _counting(monkeypatch, mlp_nf4.LoraNF4SwiGLUFunction)
    out_f, grads_f = _run(model, ids, mask, True, monkeypatch, keep, mlp)
    assert (len(linear_calls), len(mlp_calls)) == ((8, 2) if mlp else (14, 0))  # every adapted layer fused
    out_p, grads_p = _run(model, ids, mask, False, monkeypatch)
    assert len(linear_calls) == (8 if mlp else 14)  # the reference took the module path
    real = mask.bool()
    close(out_f[real], out_p[real], TOL[dtype], "logits")
    assert set(grads_f) == set(grads_p) and len(grads_p) == 28
    if dtype == torch.float32:
        for name in grads_p:
            close(grads_f[name], grads_p[name], TOL[dtype], name)
    else:
        _, grads_32 = _run(fp32_twin(model), ids, mask, False, monkeypatch)
        within_rounding(grads_f, grads_p, grads_32)


def test_fp32_input_with_bf16_compute_and_a_trainable_bias(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(64, 48), compute_dtype=torch.bfloat16))
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    model[0].base.bias.requires_grad_(True)
    x = torch.randn(2, 5, 64)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(lora_layer, "nf4_fusable", fused_nf4.nf4_fusable if fused else (lambda *a: False))
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        assert out.dtype == torch.float32
        out.square().sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    assert len(results[0]) == 5  # output, x, bias, A, B
    for got, want in zip(*results):
        close(got, want, TOL[torch.bfloat16], "fp32 in, bf16 compute")


def _saved(model, ids, mask, keep=None) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward during one forward (the pack hook sees each)."""
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with lora_fused.real_rows(keep), lora_mlp.fused_mlps(model):
            loss = model(input_ids=ids, attention_mask=mask).logits.float().square().mean()
    loss.backward()
    return saved


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    sizes: dict[int, int] = {}
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        sizes[ptr] = max(sizes.get(ptr, 0), t.untyped_storage().nbytes())
    return sum(sizes.values())


def test_no_dense_weight_is_kept_between_forward_and_backward(monkeypatch):
    """The memory point of QLoRA: the nodes save x (at the real rows), A's outputs and the small adapters,
    never a dequantized weight; and with a bf16 model they save no fp32 copy of each layer's input."""
    model = _qlora(torch.bfloat16)
    ids, mask = _batch("left")
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, NF4Linear)}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    calls = _counting(monkeypatch, mlp_nf4.LoraNF4SwiGLUFunction)
    fused_saved = _saved(model, ids, mask, mask.bool())
    assert len(calls) == 2
    shapes = {tuple(t.shape) for t in fused_saved if t.is_floating_point()}
    assert not shapes & weight_shapes, shapes & weight_shapes
    m = int(mask.sum())
    assert (m, 32) in shapes and (3 * 9, 32) not in shapes  # the layers' inputs at the real rows only
    monkeypatch.setattr(lora_layer, "nf4_fusable", lambda *a: False)
    monkeypatch.setattr(mlp_nf4, "nf4_fusable", lambda *a: False)
    plain_saved = _saved(model, ids, mask)
    fp32_inputs = [t for t in plain_saved if t.dtype == torch.float32 and t.shape[-1] in (32, 64) and t.dim() == 3]
    assert fp32_inputs  # the module path keeps x.to(fp32) per adapted layer ...
    assert _unique_bytes(fused_saved) < 0.8 * _unique_bytes(plain_saved)  # ... the nodes do not


def test_qlora_training_loss_takes_the_nodes_and_equals_the_module_path(monkeypatch):
    """Through peftkit's training loss (padding-free rows and fused MLPs come from the LoRA method)."""
    from peftkit.train.loss import sum_token_loss

    model = _qlora(torch.float32)
    ids, mask = _batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    linear_calls = _counting(monkeypatch, fused_nf4.LoraNF4Function)
    mlp_calls = _counting(monkeypatch, mlp_nf4.LoraNF4SwiGLUFunction)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(lora_layer, "nf4_fusable", fused_nf4.nf4_fusable if fused else (lambda *a: False))
        monkeypatch.setattr(mlp_nf4, "nf4_fusable", fused_nf4.nf4_fusable if fused else (lambda *a: False))
        model.zero_grad()
        loss, n = sum_token_loss(model, ids, mask, labels)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    assert (len(linear_calls), len(mlp_calls)) == (8, 2)
    (loss_f, grads_f), (loss_p, grads_p) = results
    close(loss_f, loss_p, 1e-6, "loss")
    assert set(grads_f) == set(grads_p) and len(grads_p) == 28
    for name in grads_p:
        close(grads_f[name], grads_p[name], 1e-5, name)


def test_what_the_nodes_cannot_run_exactly_keeps_the_module_path(monkeypatch):
    base = NF4Linear.from_linear(nn.Linear(64, 64))
    A = nn.Parameter(torch.zeros(2, 64))
    x = torch.zeros(1, 64)
    assert fused_nf4.nf4_fusable(base, x, A, 0.0, True)
    assert not fused_nf4.nf4_fusable(nn.Linear(64, 64), x, A, 0.0, True)  # a dense base: the other node
    assert not fused_nf4.nf4_fusable(base, x, A, 0.1, True)  # dropout active
    assert fused_nf4.nf4_fusable(base, x, A, 0.1, False)
    assert not fused_nf4.nf4_fusable(base, x.long(), A, 0.0, True)
    with torch.no_grad():
        assert not fused_nf4.nf4_fusable(base, x, A, 0.0, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_nf4.nf4_fusable(base, x, A, 0.0, True)
    base.register_forward_hook(lambda *a: None)
    assert not fused_nf4.nf4_fusable(base, x, A, 0.0, True)
    # an fp32 model over bf16-compute bases: the MLP node needs x in the compute dtype, so the module runs
    # (its linears still take the linear node), and the result still equals the module path
    model = _qlora(torch.float32, compute=torch.bfloat16)
    mlp_calls = _counting(monkeypatch, mlp_nf4.LoraNF4SwiGLUFunction)
    ids, mask = _batch("none")
    out_f, grads_f = _run(model, ids, mask, True, monkeypatch, mlp=True)
    out_p, grads_p = _run(model, ids, mask, False, monkeypatch)
    assert mlp_calls == []
    close(out_f, out_p, TOL[torch.bfloat16], "logits")
    for name in grads_p:
        close(grads_f[name], grads_p[name], TOL[torch.bfloat16], name)
