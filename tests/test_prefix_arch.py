"""Prefix tuning over the architecture matrix (issue 15): the prefix hooks run only where this file verifies
them (hf.arch.VERIFIED "prefix"). For each such type of hf.arch.PARITY_TYPES: forward equals HF PEFT's exactly
(with left padding and without a mask), generate() of a left-padded batch equals each row generated alone,
which equals greedy decoding by full forwards. Gemma 2 and 3 also with a sliding window shorter than the
sequence, and files both ways. The others are refused, naming why."""

from __future__ import annotations

import pytest
import torch
from test_arch_parity import tiny_base

import peftkit
from peftkit import hf
from peftkit.methods.prefix import PrefixConfig, inject_prefix

VERIFIED = [t for t in hf.arch.PARITY_TYPES if "prefix" in hf.VERIFIED[t]]
REFUSED = [t for t in hf.arch.PARITY_TYPES if t not in VERIFIED]
P = 3


def _pair(model_type: str, **config):
    torch.manual_seed(5)
    ours = inject_prefix(tiny_base(model_type, **config), PrefixConfig(num_virtual_tokens=P)).eval()
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)  # the same creation order: PEFT's prefix starts equal to ours
    theirs = peft.get_peft_model(tiny_base(model_type, **config),
                                 peft.PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM")).eval()
    return ours, theirs


def _rows():
    a = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    b = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1), a])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # b, left-padded
    return a, b, ids, mask


@torch.no_grad()
def _greedy(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def _check(model_type: str, **config):
    ours, theirs = _pair(model_type, **config)
    a, b, ids, mask = _rows()
    with torch.no_grad():
        for m in (mask, None):
            torch.testing.assert_close(ours(input_ids=ids, attention_mask=m).logits,
                                       theirs(input_ids=ids, attention_mask=m).logits, atol=0, rtol=0)
    batch = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)[:, -4:]
    alone = [ours.generate(input_ids=x, max_new_tokens=4, do_sample=False)[0, -4:] for x in (b, a)]
    assert torch.equal(batch[0], alone[0]) and torch.equal(batch[1], alone[1])
    assert torch.equal(alone[1], _greedy(ours, a, 4)[0, -4:])


@pytest.mark.parametrize("model_type", VERIFIED)
def test_forward_equals_hf_peft_and_generate_equals_rows_alone_and_full_forwards(model_type):
    _check(model_type)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sliding_window_shorter_than_the_sequence(model_type):
    _check(model_type, sliding_window=4)


@pytest.mark.parametrize("model_type", REFUSED)
def test_unverified_types_are_refused_naming_why(model_type):
    with pytest.raises(ValueError, match=rf"{model_type}"):
        inject_prefix(tiny_base(model_type), PrefixConfig(num_virtual_tokens=P))


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_files_move_both_ways(model_type, tmp_path):
    ours, theirs = _pair(model_type, sliding_window=4)
    with torch.no_grad():
        for p in ours.peftkit_prefix.parameters():
            p.add_(0.3)
    _, _, ids, mask = _rows()
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
