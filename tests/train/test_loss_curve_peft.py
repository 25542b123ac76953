"""peftkit's training path (answer-only fused head loss, fused LoRA nodes, padding-free rows, fused AdamW)
follows HF PEFT's plain loop (model(labels=...).loss, torch's AdamW) step for step from the same seed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LazyImport, tiny_llama

import peftkit
from peftkit.train.loop import make_optimizer
from peftkit.train.loss import sum_token_loss

peft = LazyImport("peft", optional=True)  # imported by the first test that uses it


def _instruction_batch():
    """Right- and left-padded rows, labels only on each row's last real tokens (the answer)."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 128, (4, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[3, :6] = 0
    labels = torch.full_like(ids, -100)
    for row, (start, end) in enumerate([(10, 16), (7, 11), (12, 16), (11, 16)]):
        labels[row, start:end] = ids[row, start:end]
    return ids, mask, labels


def test_loss_curve_matches_hf_peft():
    base = tiny_llama().train()
    config = dict(r=8, lora_alpha=16, target_modules="all-linear")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **config)).train()
    torch.manual_seed(4)
    ours = peftkit.inject(base, peftkit.LoraConfig(init_lora_weights=False, **config)).train()  # B != 0 too
    state = {f"base_model.model.{k}": v for k, v in peftkit.adapter_state_dict(ours).items()}  # the file's keys
    assert not peft.set_peft_model_state_dict(theirs, state).unexpected_keys
    opt_ours = make_optimizer([p for p in ours.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.01)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.01)
    ids, mask, labels = _instruction_batch()
    curve_ours, curve_theirs = [], []
    for _ in range(10):
        total, n = sum_token_loss(ours, ids, mask, labels)
        loss = total / n
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad()
        curve_ours.append(loss.item())
        ref = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
        ref.backward()
        opt_theirs.step()
        opt_theirs.zero_grad()
        curve_theirs.append(ref.item())
    assert curve_ours[-1] < 0.95 * curve_ours[0]  # it trains
    torch.testing.assert_close(torch.tensor(curve_ours), torch.tensor(curve_theirs), rtol=1e-4, atol=1e-5)
