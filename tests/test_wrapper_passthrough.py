"""A LoRA wrapper passes its base module's `weight` and `bias` through (issue 15), as PEFT's does: model code
that reads `self.wo.weight` (T5's feed-forward) runs with adapters in place."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import peftkit


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def test_t5_runs_with_lora_on_every_linear_layer():
    model = tiny_t5()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules="all-linear"))
    with peftkit.disable_adapters(model):
        base = model(input_ids=ids, decoder_input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, base, rtol=0, atol=1e-6)
    wo = model.get_submodule("encoder.block.0.layer.1.DenseReluDense.wo")
    assert type(wo).__name__ == "LoraLayer" and wo.weight is wo.base.weight and wo.bias is None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    changed = model(input_ids=ids, decoder_input_ids=ids).logits
    assert (changed - base).abs().max() > 1e-3
    peftkit.merge(model)
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, changed, rtol=0, atol=1e-5)


def test_weight_and_bias_are_the_base_s_and_absent_on_a_base_without_them():
    model = tiny_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.weight is q.base.weight and q.bias is None
    assert model.get_output_embeddings().weight is model.lm_head.base.weight
    with pytest.raises((AttributeError, KeyError), match="weight"):
        q.weight = torch.nn.Parameter(torch.zeros(1))  # read-only: the base owns it


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return BartForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("build", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_encoder_decoders_take_peft_s_default_targets_both_ways(build, tmp_path):
    """target_modules=None: PEFT's defaults (t5: q, v; bart: q_proj, v_proj); a peftkit file loads in PEFT and
    PEFT's in peftkit with the same outputs; the trainer's loss refuses them by name."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    model = build()
    peftkit.inject(model, peftkit.LoraConfig(r=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        ours = model(input_ids=ids, decoder_input_ids=ids).logits
    peftkit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, decoder_input_ids=ids).logits, ours, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = peftkit.load_adapter(build(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, decoder_input_ids=ids).logits, ours, rtol=0, atol=1e-5)
    from peftkit.train import token_loss

    with pytest.raises(ValueError, match="encoder-decoder model"):
        token_loss(model, ids, torch.ones_like(ids), ids)
