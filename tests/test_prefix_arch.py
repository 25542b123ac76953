"""Prefix tuning on Gemma 2 and Gemma 3 (issue 15: PEFT supports them): their sliding-window layers take the
prefix as PEFT's do. Forward equals HF PEFT's exactly (left padding, no mask, a window shorter than the
sequence), greedy generate() with the KV cache equals greedy decoding by full forwards, files move both ways."""

from __future__ import annotations

import pytest
import torch
from test_arch_parity import tiny_base

import peftkit
from peftkit import hf
from peftkit.methods.prefix import PrefixConfig, inject_prefix

TYPES = ["gemma2", "gemma3_text"]
P = 3


def _pair(model_type: str, window: int):
    torch.manual_seed(5)
    ours = inject_prefix(tiny_base(model_type, sliding_window=window), PrefixConfig(num_virtual_tokens=P)).eval()
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)  # the same creation order: PEFT's prefix starts equal to ours
    theirs = peft.get_peft_model(tiny_base(model_type, sliding_window=window),
                                 peft.PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM")).eval()
    return ours, theirs


def _batch():
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask


@torch.no_grad()
def _greedy(model, ids, mask, steps):
    for _ in range(steps):
        nxt = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("window", [4, 4096])
@pytest.mark.parametrize("model_type", TYPES)
def test_forward_equals_hf_peft_and_generate_equals_full_forwards(model_type, window):
    ours, theirs = _pair(model_type, window)
    assert "prefix" in hf.verified_features(ours)
    ids, mask = _batch()
    with torch.no_grad():
        for m in (mask, None):
            torch.testing.assert_close(ours(input_ids=ids, attention_mask=m).logits,
                                       theirs(input_ids=ids, attention_mask=m).logits, atol=0, rtol=0)
    generated = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, _greedy(ours, ids, mask, 5))


@pytest.mark.parametrize("model_type", TYPES)
def test_files_move_both_ways(model_type, tmp_path):
    ours, theirs = _pair(model_type, 4)
    with torch.no_grad():
        for p in ours.peftkit_prefix.parameters():
            p.add_(0.3)
    ids, mask = _batch()
    peftkit.save_adapter(ours, tmp_path / "ours")
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(tiny_base(model_type, sliding_window=4), tmp_path / "ours").eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = peftkit.load_adapter(tiny_base(model_type, sliding_window=4), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   ours(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
