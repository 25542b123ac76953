"""The fused LoRA training node computes what the plain per-operation path computes."""

from __future__ import annotations

import torch
from conftest import tiny_llama
from torch import nn

import peftkit
from peftkit.methods.lora import fused as lora_fused
from peftkit.methods.lora import layer as lora_layer

FUSABLE = lora_fused.fusable


def _grads(model, x, fused: bool, monkeypatch):
    # the layer calls the name it imported: patch it there (patching lora_fused alone left the node on)
    monkeypatch.setattr(lora_layer, "fusable", FUSABLE if fused else (lambda *a: False))
    model.zero_grad()
    x = x.clone().requires_grad_(x.is_floating_point())
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    (out.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, (x.grad.clone() if x.grad is not None else None)


def test_fused_llama_training_equals_the_plain_path(monkeypatch):
    model = tiny_llama().train()
    torch.manual_seed(3)
    peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    calls = []
    real = lora_fused.LoraLinearFunction.apply
    monkeypatch.setattr(lora_fused.LoraLinearFunction, "apply", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    out_f, grads_f, _ = _grads(model, ids, True, monkeypatch)
    assert len(calls) == 14  # every adapted linear of the two blocks took the fused node
    out_p, grads_p, _ = _grads(model, ids, False, monkeypatch)
    assert len(calls) == 14  # and the plain path did not
    torch.testing.assert_close(out_f, out_p, atol=1e-6, rtol=1e-5)
    assert set(grads_f) == set(grads_p) and len(grads_f) == 28
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)


def test_fused_node_handles_bias_and_a_trainable_base(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=True))
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model[0].base.weight.requires_grad_(True)
    model[0].base.bias.requires_grad_(True)
    x = torch.randn(3, 4, 6)
    out_f, grads_f, gx_f = _grads(model, x, True, monkeypatch)
    out_p, grads_p, gx_p = _grads(model, x, False, monkeypatch)
    torch.testing.assert_close(out_f, out_p)
    torch.testing.assert_close(gx_f, gx_p)
    assert len(grads_f) == 4
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], msg=name)


def test_dropout_hooks_and_inference_keep_the_plain_path():
    base = nn.Linear(4, 4)
    A = nn.Parameter(torch.zeros(2, 4))
    x = torch.zeros(1, 4)
    assert lora_fused.fusable(base, x, A, 0.0, True)
    assert not lora_fused.fusable(base, x, A, 0.1, True)  # dropout active
    assert lora_fused.fusable(base, x, A, 0.1, False)  # eval mode: dropout is off
    with torch.no_grad():
        assert not lora_fused.fusable(base, x, A, 0.0, True)
    base.register_forward_hook(lambda *a: None)
    assert not lora_fused.fusable(base, x, A, 0.0, True)  # a hook (FSDP's, a user's) must still run
    assert not lora_fused.fusable(nn.Linear(4, 4).double(), x.double(), A, 0.0, True)  # mixed dtypes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lora_fused.fusable(nn.Linear(4, 4), x, A, 0.0, True)  # autocast changes dtypes inside


def test_training_under_autocast_takes_the_module_path():
    """A user's autocast region: the fused nodes step aside and the loss still trains."""
    from peftkit.train.loss import sum_token_loss

    model = tiny_llama().train()
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids, mask, labels = _padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, n = sum_token_loss(model, ids, mask, labels)
    (total / n).backward()
    assert all(p.grad is not None for n_, p in model.named_parameters() if p.requires_grad)


def _padded_batch(vocab: int = 128):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, vocab, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # row 2's last padding position predicts its first real token, which has a label
    return ids, mask, labels


def test_padding_free_rows_give_the_same_loss_and_gradients():
    """Inside real_rows the fused nodes skip padding positions: same loss, same gradients, fewer rows."""
    from peftkit.train.loss import sum_token_loss

    model = tiny_llama().train()
    torch.manual_seed(3)
    peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    ids, mask, labels = _padded_batch()
    results = []
    for padding_free in (False, True):
        model.zero_grad()
        keep = mask.bool()
        keep[:, :-1] |= labels[:, 1:] != -100  # what sum_token_loss keeps: the real positions and the predictors
        ctx = lora_fused.real_rows(keep if padding_free else None)
        with ctx:
            rows = lora_fused.rows_for(torch.zeros(3, 12, 1))
            logits = model(input_ids=ids, attention_mask=mask).logits
        assert (rows is not None) == padding_free and (rows is None or len(rows.idx) == int(mask.sum()) + 1)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][labels[:, 1:] != -100], labels[:, 1:][labels[:, 1:] != -100])
        loss.backward()
        real = logits[mask.bool()].detach()  # the padding positions' outputs differ (zeros), and reach no loss
        results.append((loss.detach(), real, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_p, real_p, grads_p), (loss_f, real_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss_p, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(real_f, real_p, atol=1e-5, rtol=1e-5)
    assert set(grads_f) == set(grads_p) and len(grads_p) == 28
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)
    # sum_token_loss applies it by itself
    model.zero_grad()
    total, n = sum_token_loss(model, ids, mask, labels)
    (total / n).backward()
    for name in grads_p:
        torch.testing.assert_close(model.get_parameter(name).grad, grads_p[name], atol=1e-6, rtol=1e-5, msg=name)


def test_real_rows_ignores_unpadded_batches_and_other_shapes():
    with lora_fused.real_rows(torch.ones(2, 50, dtype=torch.long)):
        assert lora_fused.rows_for(torch.zeros(2, 50, 4)) is None  # nothing to skip
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    with lora_fused.real_rows(mask):
        assert lora_fused.rows_for(torch.zeros(2, 10, 4)).idx.tolist() == [*range(6), *range(10, 20)]
        assert lora_fused.rows_for(torch.zeros(3, 10, 4)) is None  # an input of another shape
    assert lora_fused.rows_for(torch.zeros(2, 10, 4)) is None  # only inside the block
