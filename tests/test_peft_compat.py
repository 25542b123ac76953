"""Files are HF PEFT's in both directions: same logits (fp32, atol 1e-5) on a tiny Llama and a tiny GPT-2."""

from __future__ import annotations

import pytest
import torch
from conftest import LazyImport, inputs, nonzero_adapter, run, tiny_gpt2, tiny_llama

import peftkit

peft = LazyImport("peft", optional=True)  # imported by the first test that uses it
ATOL = 1e-5

CASES = {
    "llama-basic": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "llama-rslora-patterns": (tiny_llama, dict(target_modules="all-linear", use_rslora=True,
                                               rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})),
    "llama-embedding-and-head-copy": (tiny_llama, dict(target_modules=["embed_tokens", "gate_proj"],
                                                       modules_to_save=["lm_head"])),
    "llama-layers": (tiny_llama, dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1])),
    "llama-regex": (tiny_llama, dict(target_modules=r".*\.(up|down)_proj")),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2-bias-all": (tiny_gpt2, dict(target_modules=["c_attn"], bias="all")),
}


def _perturb(model, words, seed=3):
    """Make modules_to_save copies and biases differ from the base, so loading them is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and any(w in n for w in words):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_adapter_loads_in_hf_peft(case, tmp_path):
    builder, kw = CASES[case]
    kw = dict(kw)
    model, ids = builder(), inputs("llama")
    nonzero_adapter(model, kw.pop("target_modules"), **kw)
    _perturb(model, ["copies", "bias"])
    expected = run(model, ids)
    peftkit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(builder(), tmp_path / "ours").eval()
    torch.testing.assert_close(run(theirs, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_peft_adapter_loads_in_peftkit(case, tmp_path):
    builder, kw = CASES[case]
    kw = dict(kw)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(builder(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    _perturb(theirs, ["modules_to_save", "bias"])
    theirs.eval()
    ids = inputs("llama")
    expected = run(theirs, ids)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftkit.load_adapter(builder(), tmp_path / "theirs")
    torch.testing.assert_close(run(ours, ids), expected, atol=ATOL, rtol=0)


def test_non_default_adapter_names_in_subfolders(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                init_lora_weights=False))
    theirs.add_adapter("tickets", peft.LoraConfig(r=2, lora_alpha=16, use_rslora=True,
                                                   target_modules=["v_proj", "up_proj"], init_lora_weights=False))
    theirs.eval()
    ids = inputs("llama")
    default_logits = run(theirs, ids)
    theirs.set_adapter("tickets")
    tickets_logits = run(theirs, ids)
    theirs.save_pretrained(tmp_path / "multi")
    assert (tmp_path / "multi" / "tickets" / "adapter_config.json").is_file()

    ours = tiny_llama()
    peftkit.load_adapter(ours, tmp_path / "multi")  # "default" at the root
    peftkit.load_adapter(ours, tmp_path / "multi", name="tickets")
    assert peftkit.active_adapters(ours) == ["tickets"]
    torch.testing.assert_close(run(ours, ids), tickets_logits, atol=ATOL, rtol=0)
    peftkit.set_active(ours, "default")
    torch.testing.assert_close(run(ours, ids), default_logits, atol=ATOL, rtol=0)
    with peftkit.per_row(ours, ["tickets", "default", None]):
        mixed = run(ours, ids)
    torch.testing.assert_close(mixed[0], tickets_logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], default_logits[1], atol=ATOL, rtol=0)


def test_same_keys_and_config_fields_as_hf_peft(tmp_path):
    """Beyond equal logits: the file has exactly PEFT's key set and PEFT reads back our config fields."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw))
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=False)
    ours = nonzero_adapter(tiny_llama(), kw.pop("target_modules"))
    peftkit.save_adapter(ours, tmp_path / "ours")
    their_keys = set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    our_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert our_keys == their_keys
    cfg = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules)) == (4, 8, {"q_proj", "embed_tokens"})
