"""Every training and serving fast path on a CUDA device in bf16, against the module (unfused) path there and an
fp32 twin: the fused LoRA linear, the fused SwiGLU MLP, padding-free rows, the chunked head loss, the NF4 (QLoRA)
nodes and codec, and the serving slot layers. Marked `cuda` and skipped without CUDA; bench/gpu_check.sh runs them.
PEFTKIT_TEST_DEVICE=cpu runs the same checks on the CPU (gpu_check.sh --device cpu), so they are not dead code."""

from __future__ import annotations

import os

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
from peftkit.quant import nf4
from peftkit.train.loss import sum_token_loss

DEVICE = torch.device(os.environ.get("PEFTKIT_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA device (bench/gpu_check.sh runs these)")]
BF16 = torch.bfloat16


def _model(quantized: bool = False) -> nn.Module:
    """tiny_llama in bf16 on DEVICE (its linears in NF4 with bf16 compute when `quantized`), LoRA on all linears
    (adapters in fp32, as peftkit makes them over a 16-bit or NF4 base)."""
    model = tiny_llama().to(DEVICE, BF16)
    if quantized:
        peftkit.quantize(model, compute_dtype=BF16)
    torch.manual_seed(3)
    peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model.train()


def _batch(padding: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3], mask[2, :5] = 0, 0
    elif padding == "right":
        mask[1, 6:], mask[2, 4:] = 0, 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _counting(monkeypatch, cls) -> list[int]:
    calls: list[int] = []
    real = cls.apply
    monkeypatch.setattr(cls, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _fast_paths(monkeypatch, on: bool) -> None:
    """Switch every fused node on (their own eligibility checks) or off (the module path)."""
    off = lambda *a: False  # noqa: E731
    monkeypatch.setattr(lora_layer, "fusable", lora_fused.fusable if on else off)
    monkeypatch.setattr(lora_layer, "nf4_fusable", fused_nf4.nf4_fusable if on else off)
    monkeypatch.setattr(mlp_nf4, "nf4_fusable", fused_nf4.nf4_fusable if on else off)


def _step(model, ids, mask, keep=None, mlp=False):
    """(logits at the real positions, fp32 grads of the trainable parameters) for a fixed weighted sum of logits."""
    model.zero_grad()
    with lora_fused.real_rows(keep):
        if mlp:
            with lora_mlp.fused_mlps(model):
                logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
    weights = torch.linspace(-1, 1, logits.numel(), device=logits.device).view_as(logits)
    (logits.float() * weights * mask[..., None]).sum().backward()
    real = mask.bool()
    return logits.detach()[real].float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                           if p.grad is not None}


def _compare(model, monkeypatch, padding: str, mlp: bool, counts: dict) -> None:
    """Fast path vs module path vs fp32 twin on one batch; `counts`: node class -> calls expected."""
    ids, mask = _batch(padding)
    keep = mask.bool() if padding != "none" else None
    calls = {cls: _counting(monkeypatch, cls) for cls in counts}
    _fast_paths(monkeypatch, True)
    out_f, grads_f = _step(model, ids, mask, keep, mlp)
    assert {cls: len(c) for cls, c in calls.items()} == counts
    _fast_paths(monkeypatch, False)
    out_p, grads_p = _step(model, ids, mask)
    out_32, grads_32 = _step(fp32_twin(model), ids, mask)
    assert len(grads_32) == 28
    within_rounding({"logits": out_f, **grads_f}, {"logits": out_p, **grads_p}, {"logits": out_32, **grads_32})


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_fused_linear_bf16(padding, monkeypatch):
    _compare(_model(), monkeypatch, padding, False, {lora_fused.LoraLinearFunction: 14})


@pytest.mark.parametrize("padding", ["none", "left"])
def test_fused_mlp_bf16(padding, monkeypatch):
    _compare(_model(), monkeypatch, padding, True,
             {lora_fused.LoraLinearFunction: 8, lora_mlp.LoraSwiGLUFunction: 2})


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_nf4_nodes_bf16(padding, mlp, monkeypatch):
    counts = {fused_nf4.LoraNF4Function: 8, mlp_nf4.LoraNF4SwiGLUFunction: 2} if mlp else {
        fused_nf4.LoraNF4Function: 14}
    _compare(_model(quantized=True), monkeypatch, padding, mlp, counts)


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "qlora"])
def test_head_loss_bf16(quantized, monkeypatch):
    """peftkit's training loss (chunked head on labelled positions + every fused node) vs transformers' loss
    through the module path, both in bf16, against the fp32 twin's."""
    model = _model(quantized)
    ids, mask = _batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt

    def grads(m, fast: bool):
        _fast_paths(monkeypatch, fast)
        m.zero_grad()
        if fast:
            total, n = sum_token_loss(m, ids, mask, labels, chunk=5)
            loss = total / n
        else:
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return {"loss": loss.detach().float().view(1),
                **{k: p.grad.float().clone() for k, p in m.named_parameters() if p.grad is not None}}

    calls = _counting(monkeypatch, fused_nf4.LoraNF4Function if quantized else lora_fused.LoraLinearFunction)
    fast = grads(model, True)
    assert len(calls) == 8  # q, k, v, o of both blocks (the MLPs took the fused SwiGLU node)
    within_rounding(fast, grads(model, False), grads(fp32_twin(model), False))


def test_nf4_codec_on_the_device_equals_the_cpu():
    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(0))
    for double_quant in (False, True):
        on_cpu = nf4.quantize(w, blocksize=64, double_quant=double_quant)
        on_dev = nf4.quantize(w.to(DEVICE), blocksize=64, double_quant=double_quant)
        assert torch.equal(on_dev.packed.cpu(), on_cpu.packed)
        for dtype in (torch.float32, BF16):
            torch.testing.assert_close(nf4.dequantize(on_dev, dtype).cpu(), nf4.dequantize(on_cpu, dtype),
                                       atol=0, rtol=1e-6 if dtype == torch.float32 else 8e-3)


ADAPTERS = {"alpha": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "beta": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj"]},
            "gamma": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["up_proj", "down_proj"]}}


def _saved_adapters(root) -> dict[str, str]:
    """PEFT-format adapters for tiny_llama with random A and B, one directory each."""
    paths = {}
    for seed, (name, options) in enumerate(ADAPTERS.items(), start=1):
        model = tiny_llama()
        torch.manual_seed(seed)
        peftkit.inject(model, peftkit.LoraConfig(init_lora_weights=False, **options))
        paths[name] = str(peftkit.save_adapter(model, root / name))
    return paths


@torch.no_grad()
def test_serving_slot_layers_bf16(tmp_path):
    """One batch of rows of different adapters through the slot layers equals each row alone with peftkit's
    LoRA, within bf16 rounding (measured against the same rows in fp32)."""
    from peftkit.serve import AdapterRegistry

    adapters = _saved_adapters(tmp_path)
    served = tiny_llama().to(DEVICE, BF16)
    registry = AdapterRegistry(served, adapters=adapters, max_loaded=4)
    leases = {name: registry.acquire(name) for name in ADAPTERS}
    plan = ["alpha", None, "beta", "gamma", "alpha"]
    x = torch.randint(0, 128, (len(plan), 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with registry.bank.rows([leases[n].slot if n else -1 for n in plan]):
        got = served(x).logits.float()
    refs = {}
    for dtype in (BF16, torch.float32):
        refs[dtype] = tiny_llama().to(DEVICE, dtype)
        for name, path in adapters.items():
            peftkit.load_adapter(refs[dtype], path, name)
    base = tiny_llama().to(DEVICE)(x).logits.float()
    for i, name in enumerate(plan):
        alone = {}
        for dtype, ref in refs.items():
            peftkit.set_active(ref, [name] if name else [])
            alone[dtype] = ref(x[i:i + 1]).logits[0].float()
        err, own = (got[i] - alone[torch.float32]).abs().max(), (alone[BF16] - alone[torch.float32]).abs().max()
        assert err <= 2 * own + 1e-3, (name, err.item(), own.item())
        if name is not None:  # the adapter changes the output far beyond the rounding (else this proves nothing)
            assert (alone[torch.float32] - base[i]).abs().max() > 10 * own, name
