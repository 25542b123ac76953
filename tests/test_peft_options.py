"""PEFT options peftkit does not implement are named (issue 15): a file that sets one that changes the
outputs is refused naming it; an option this version does not know at all is named when the file then does
not fit, instead of only "another base model?"."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

import peftkit


def saved(tmp_path, **extra):
    model = tiny_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    peftkit.save_adapter(model, tmp_path / "a")
    cfg = tmp_path / "a" / "adapter_config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | extra))
    return tmp_path / "a"


@pytest.mark.parametrize("option, value", [
    ("kasa_config", {"rank": 4}), ("use_kasa", True), ("velora_config", {"r": 2}),
    ("monteclora_config", {"n": 2}), ("arrow_config", {"top_k": 2}), ("layer_replication", [[0, 1]]),
])
def test_an_unimplemented_peft_option_is_refused_by_name(tmp_path, option, value):
    with pytest.raises(ValueError, match=rf"does not support yet: {option}="):
        peftkit.load_adapter(tiny_llama(), saved(tmp_path, **{option: value}))


def test_the_same_options_switched_off_load(tmp_path):
    model = tiny_llama()
    peftkit.load_adapter(model, saved(tmp_path, kasa_config=None, use_kasa=False, velora_config=None))
    assert "default" in peftkit.active_adapters(model)


def test_an_unknown_option_is_named_when_the_file_does_not_fit(tmp_path):
    folder = saved(tmp_path, future_magic_config={"blocks": 3}, peft_version="9.9.9")
    tensors = peftkit.read_adapter(folder)[1]
    from safetensors.torch import save_file

    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(4, 7)  # a shape the option might have explained
    save_file({f"base_model.model.{k}": v for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not know, which may be why: future_magic_config=\{'blocks': 3\}"):
        peftkit.load_adapter(tiny_llama(), folder)


def test_an_unknown_option_is_ignored_when_the_file_fits(tmp_path):
    model = tiny_llama()
    peftkit.load_adapter(model, saved(tmp_path, future_flag=True))  # tolerated: nothing contradicts the file
    assert "default" in peftkit.active_adapters(model)


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "bar.1.q_proj", "model.bar.1.q_proj",
         "model.foobar.1.q_proj", "model.h.2.q_proj", "model.layers.1.experts.0.q_proj", "q_proj"]


def model_with(names: list[str]) -> torch.nn.Module:
    """Linear layers at exactly these module paths."""
    root = torch.nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(2, 2))
    return root


@pytest.mark.parametrize("layers_pattern", [None, "", [], ["layers"], "layers", ["bar"], ["h", "layers"], "bar"])
def test_layers_pattern_selects_what_peft_selects(layers_pattern):
    """PEFT's check_target_module_exists is the reference, name by name."""
    peft_utils = pytest.importorskip("peft.tuners.tuners_utils")
    from peft import LoraConfig as PeftLoraConfig

    from peftkit.targeting import select_targets

    ours = peftkit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=layers_pattern)
    theirs = PeftLoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=layers_pattern)
    want = sorted(n for n in NAMES if peft_utils.check_target_module_exists(theirs, n))
    assert want, layers_pattern
    assert sorted(n for n, _ in select_targets(model_with(NAMES), ours)) == want


def test_lora_default_targets_are_peft_s_table():
    constants = pytest.importorskip("peft.utils.constants")
    from peftkit.hf.arch import LORA_DEFAULT_TARGETS

    theirs = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for model_type, targets in theirs.items():
        ours = LORA_DEFAULT_TARGETS[model_type]
        assert (ours if isinstance(ours, str) else list(ours)) == targets, model_type
    assert set(LORA_DEFAULT_TARGETS) - set(theirs) == {"phi3"}


@pytest.mark.parametrize("model_type, expect", [("gptj", {"q_proj", "v_proj"}), ("bloom", {"query_key_value"}),
                                                ("gemma3_text", {"q_proj", "v_proj"})])
def test_default_targets_on_models_that_had_none(model_type, expect):
    from test_arch_parity import tiny_base

    model = tiny_base(model_type)
    peftkit.inject(model, peftkit.LoraConfig(r=2))  # target_modules=None: the architecture's defaults
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "LoraLayer"}
    assert wrapped == expect


def _peft_pissa(tmp_path, init: str):
    """A PEFT PiSSA/OLoRA adapter 'trained' (A, B moved) and saved without conversion, and the model's logits."""
    peft = pytest.importorskip("peft")
    from conftest import inputs

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=init))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(tmp_path / "pissa")
    with torch.no_grad():
        return tmp_path / "pissa", model(inputs("llama")).logits


def test_an_unconverted_pissa_file_loads_onto_the_original_base_as_in_peft(tmp_path):
    from conftest import inputs

    folder, trained = _peft_pissa(tmp_path, "pissa")
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), folder)
    ours = peftkit.load_adapter(tiny_llama(), folder)
    with torch.no_grad():
        want = theirs(inputs("llama")).logits
        torch.testing.assert_close(want, trained, rtol=0, atol=1e-5)  # PEFT rebuilds the residual base
        torch.testing.assert_close(ours(inputs("llama")).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["olora", "pissa_niter_4"])
def test_base_changing_inits_peftkit_cannot_rebuild_are_refused_with_the_conversion(tmp_path, init):
    folder, _ = _peft_pissa(tmp_path, init)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        peftkit.load_adapter(tiny_llama(), folder)


def test_a_pissa_adapter_saved_by_peftkit_round_trips_onto_a_fresh_base(tmp_path):
    from conftest import inputs

    model = tiny_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05)
        trained = model(inputs("llama")).logits
    peftkit.save_adapter(model, tmp_path / "a")
    fresh = peftkit.load_adapter(tiny_llama(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs("llama")).logits, trained, rtol=0, atol=1e-5)
