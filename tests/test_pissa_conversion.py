"""PiSSA saved as a plain LoRA file for the untouched base (issue 15): `save_adapter(..., initial_adapter=)`,
HF PEFT's `path_initial_model_for_weight_conversion`, checked against HF PEFT both ways."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import inputs, tiny_llama
from safetensors.torch import load_file

import peftkit

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _train_a_little(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _logits(model):
    with torch.no_grad():
        return model(inputs("llama")).logits


def _ours(tmp_path, **config):
    model = peftkit.inject(tiny_llama(), peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            init_lora_weights="pissa", **config))
    peftkit.save_adapter(model, tmp_path / "init")
    _train_a_little(model)
    peftkit.save_adapter(model, tmp_path / "plain", initial_adapter=tmp_path / "init")
    return model, _logits(model)


@pytest.mark.parametrize("config", [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2}}])
def test_the_converted_file_gives_the_trained_outputs_on_the_original_base(tmp_path, config):
    _, trained = _ours(tmp_path, **config)
    saved = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    assert saved["lora_alpha"] == pytest.approx(8 * 2 ** 0.5 if config.get("use_rslora") else 16)
    if "rank_pattern" in config:
        assert saved["rank_pattern"] == {"v_proj": 4}
    ours = peftkit.load_adapter(tiny_llama(), tmp_path / "plain")
    torch.testing.assert_close(_logits(ours), trained, rtol=0, atol=1e-5)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")
    torch.testing.assert_close(_logits(theirs), trained, rtol=0, atol=1e-5)


def test_the_same_file_as_hf_peft_s_conversion(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                              init_lora_weights="pissa"))
    model.save_pretrained(tmp_path / "theirs_init")  # PEFT's recipe: the initial adapter saved first
    _train_a_little(model)
    trained = _logits(model)
    model.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "theirs_init"))
    # peftkit converts PEFT's trained (unconverted) file with PEFT's initial file
    model.save_pretrained(tmp_path / "raw")
    ours = peftkit.load_adapter(tiny_llama(), tmp_path / "raw", trainable=True)
    torch.testing.assert_close(_logits(ours), trained, rtol=0, atol=1e-5)
    peftkit.save_adapter(ours, tmp_path / "ours", initial_adapter=tmp_path / "theirs_init")
    theirs_t = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    ours_t = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_t.keys() == theirs_t.keys()
    for key in ours_t:
        torch.testing.assert_close(ours_t[key], theirs_t[key], rtol=0, atol=1e-6)
    theirs_c, ours_c = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("theirs", "ours"))
    assert {k: ours_c[k] for k in ("r", "lora_alpha", "init_lora_weights")} == \
        {k: theirs_c[k] for k in ("r", "lora_alpha", "init_lora_weights")}
    fresh = peftkit.load_adapter(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(fresh), trained, rtol=0, atol=1e-5)


def test_conversion_refuses_what_it_cannot_do(tmp_path):
    model, _ = _ours(tmp_path)
    other = peftkit.inject(tiny_llama(), peftkit.LoraConfig(r=2, target_modules=TARGETS))
    peftkit.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match="does not match this one .*r 2 vs 4"):
        peftkit.save_adapter(model, tmp_path / "x", initial_adapter=tmp_path / "other")
    assert not (tmp_path / "x").exists()
    dora = peftkit.inject(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=TARGETS, use_dora=True,
                                                           init_lora_weights="pissa"))
    peftkit.save_adapter(dora, tmp_path / "dora_init")
    with pytest.raises(ValueError, match="DoRA adapter cannot be converted"):
        peftkit.save_adapter(dora, tmp_path / "y", initial_adapter=tmp_path / "dora_init")
    ia3 = peftkit.inject(tiny_llama(), peftkit.IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="IA3 adapters never do"):
        peftkit.save_adapter(ia3, tmp_path / "z", initial_adapter=tmp_path / "init")
