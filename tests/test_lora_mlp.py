"""The fused LoRA SwiGLU node computes what the module's own per-operation path computes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import peftkit
from peftkit.methods.lora import fused as lora_fused
from peftkit.methods.lora import mlp as lora_mlp


def _model(**config):
    model = tiny_llama().train()
    torch.manual_seed(3)
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **config}
    peftkit.inject(model, peftkit.LoraConfig(**config))
    return model


def _run(model, ids, mask, fused: bool, keep=None):
    model.zero_grad()
    with lora_fused.real_rows(keep):
        if fused:
            with lora_mlp.fused_mlps(model) as switched:
                logits = model(input_ids=ids, attention_mask=mask).logits
            assert switched == 2
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
    (logits * weights * mask[..., None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("padding_free", [False, True])
def test_fused_mlp_equals_the_module(padding_free, monkeypatch):
    model = _model()
    ids = torch.randint(1, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    calls = []
    real = lora_mlp.LoraSwiGLUFunction.apply
    monkeypatch.setattr(lora_mlp.LoraSwiGLUFunction, "apply", lambda *a: calls.append(1) or real(*a))
    keep = mask.bool() if padding_free else None
    out_f, grads_f = _run(model, ids, mask, True, keep)
    assert len(calls) == 2  # both blocks' MLPs took the fused node
    out_p, grads_p = _run(model, ids, mask, False, keep)
    real_rows = mask.bool()
    torch.testing.assert_close(out_f[real_rows], out_p[real_rows], atol=1e-5, rtol=1e-5)
    assert set(grads_f) == set(grads_p) and len(grads_p) == 28
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all("forward" not in m.__dict__ for m in model.modules() if type(m).__name__ == "LlamaMLP")


def test_layers_it_cannot_run_exactly_keep_the_module_path(monkeypatch):
    calls = []
    real = lora_mlp.LoraSwiGLUFunction.apply
    monkeypatch.setattr(lora_mlp.LoraSwiGLUFunction, "apply", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for model in (_model(lora_dropout=0.1), _model(use_dora=True), _model(target_modules=["gate_proj", "up_proj"])):
        _run(model, ids, mask, False)
        with lora_mlp.fused_mlps(model):
            model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    with torch.no_grad(), lora_mlp.fused_mlps(_model()):  # inference: nothing to fuse
        pass
    assert calls == []
