"""The chunked answer-only loss equals transformers' loss without building the batch's full logits; the
built-in task is deterministic and held out (test_builtin_real.py checks the base model scores <= 10%)."""

from __future__ import annotations

import json
import random

import torch

import peftkit
from peftkit.train import task
from peftkit.train.loss import sum_token_loss


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def test_chunked_loss_and_grads_equal_the_reference_and_logits_stay_small():
    model = _llama()
    torch.manual_seed(1)
    peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False))
    ids = torch.randint(0, 512, (3, 20))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    labels = ids.clone()
    labels[:, :8] = -100  # the prompt
    labels[mask == 0] = -100

    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    total, n = sum_token_loss(model, ids, mask, labels, chunk=7)
    (total / n).backward()
    hook.remove()
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / n, ref, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4)
    assert shapes and all(s[0] <= 7 and len(s) == 2 for s in shapes), shapes  # never (B, T, V)


def test_task_is_deterministic_held_out_and_strict():
    a, b = task.eval_set(), task.eval_set()
    assert [t.text for t in a] == [t.text for t in b] and len(a) == task.EVAL_SIZE
    held = {t.text for t in a}
    train = task.train_set(500, seed=3)
    assert not held & {t.text for t in train}
    assert [t.text for t in train] == [t.text for t in task.train_set(500, seed=3)]
    assert [t.text for t in train] != [t.text for t in task.train_set(500, seed=4)]
    t = a[0]
    record = json.loads(t.answer)
    assert list(record) == ["order_id", "category", "product", "priority"]
    assert record["order_id"].startswith("ORD-") and record["order_id"][4:] in t.text
    assert task.exact_match([t.answer + "\n"], [t]) == 1.0
    assert task.exact_match([t.answer.replace('"', "'")], [t]) == 0.0
    cats = {json.loads(x.answer)["category"] for x in train}
    assert cats == set(task.CATEGORIES)


def test_task_fields_follow_the_text():
    rng = random.Random(7)
    for _ in range(200):
        t = task.make_ticket(rng)
        r = t.record
        text = t.text.lower()
        assert any(s.lower() in text for s in task.PRODUCTS[r["product"]])
        assert (r["priority"] == "high") == any(u.lower() in text for u in task.URGENT)


def _reference_and_chunked_grads(model, chunk: int = 5):
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = ids.clone()
    labels[:, :6] = -100
    labels[mask == 0] = -100
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    total, n = sum_token_loss(model, ids, mask, labels, chunk=chunk)
    (total / n).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return ref, total / n, want, got


def test_full_fine_tuning_gets_the_heads_and_tied_embeddings_gradients_right():
    model = _llama()  # tied embeddings: the head's gradient and the embedding's add up
    for p in model.parameters():
        p.requires_grad_(True)
    ref, loss, want, got = _reference_and_chunked_grads(model)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert set(got) == set(want) and all(g is not None for g in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_soft_capped_head_gets_the_right_gradients():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=3.0, attn_implementation="eager"))
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ref, loss, want, got = _reference_and_chunked_grads(model)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
