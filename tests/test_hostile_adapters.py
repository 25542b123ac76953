"""Adapter folders written by someone else (issue 17, "Hardening"): regexes that backtrack without end, compile
bombs, NaN and infinite values, configs that are not JSON objects, and the file mode of what is saved. Each is
driven through the public surface (peftkit.load_adapter, inject, save_adapter) on a tiny Llama."""

from __future__ import annotations

import json
import math
import os
import stat
import time

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.patterns import MAX_PATTERN_CHARS, Matcher, PatternError

# Eight groups matched back in reverse: no literal lets `regex` give up early, and every way of splitting a
# module name into eight parts is tried (about n**8 steps): minutes per module name without a bound.
SLOW = "".join(f"(?P<g{i}>.*)" for i in range(8)) + "".join(f"(?P=g{i})" for i in reversed(range(8))) + r"\d"
RE_CATASTROPHIC = "(.*.*)*Z"  # what freezes Python's `re` (the example)
TARGETS = ["q_proj", "v_proj"]


def saved_adapter(path, **options):
    """A LoRA adapter of tiny_llama() with non-zero weights, saved to `path`."""
    model = tiny_llama()
    peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                                             **options))
    return peftkit.save_adapter(model, path)


def edit_config(path, **changes):
    config_path = path / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data.update(changes)
    config_path.write_text(json.dumps(data))  # json writes inf / nan as Infinity / NaN, as Python reads them


@pytest.mark.parametrize("field, edit", [
    ("target_modules", {"target_modules": SLOW}),
    ("exclude_modules", {"exclude_modules": SLOW}),
    ("rank_pattern key", {"rank_pattern": {SLOW: 2}}),
    ("alpha_pattern key", {"alpha_pattern": {SLOW: 3.0}}),
    ("layers_pattern", {"layers_to_transform": [0], "layers_pattern": [SLOW]}),
])
def test_load_adapter_refuses_a_backtracking_pattern_within_seconds(tmp_path, field, edit):
    path = saved_adapter(tmp_path / "a")
    edit_config(path, **edit)
    start = time.monotonic()
    with pytest.raises(ValueError, match="takes too long to match module names") as info:
        peftkit.load_adapter(tiny_llama(), path)
    elapsed = time.monotonic() - start
    assert elapsed < 10, elapsed  # 1 s of CPU time; the rest is a shared machine's load
    message = str(info.value)
    assert message.startswith(f"{field} {SLOW!r}") and "model.layers." in message  # the pattern and a module name


def test_re_catastrophic_pattern_is_answered_at_once(tmp_path):
    path = saved_adapter(tmp_path / "a")
    edit_config(path, target_modules=RE_CATASTROPHIC)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"matched no module") as info:
        peftkit.load_adapter(tiny_llama(), path)
    assert time.monotonic() - start < 5
    assert RE_CATASTROPHIC in str(info.value)
    edit_config(path, target_modules=TARGETS, rank_pattern={RE_CATASTROPHIC: 2})
    model = peftkit.load_adapter(tiny_llama(), path)  # a key that matches nothing leaves the rank at r
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].shape[0] == 4


@pytest.mark.parametrize("pattern, match", [
    ("(?:a{65535}){65535}", "counted repetitions"),  # `regex` would spend gigabytes compiling it
    ("((a{1000}){1000}){1000}", "counted repetitions"),
    ("(" * 60 + "a" + ")" * 60, "nests groups 60 deep"),
    ("q" * (MAX_PATTERN_CHARS + 1), "longer than 1000 characters"),
    ("(unclosed", "not a valid regex"),
])
def test_oversized_patterns_are_refused_before_compiling(tmp_path, pattern, match):
    path = saved_adapter(tmp_path / "a")
    edit_config(path, rank_pattern={pattern: 2})
    start = time.monotonic()
    with pytest.raises(ValueError, match=match):
        peftkit.load_adapter(tiny_llama(), path)
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match=match):
        peftkit.LoraConfig(target_modules=pattern)
    with pytest.raises(ValueError, match=match):
        peftkit.BottleneckConfig(target_modules=pattern)


def test_bottleneck_targets_are_bounded_too():
    start = time.monotonic()
    with pytest.raises(ValueError, match="takes too long"):
        peftkit.inject(tiny_llama(), peftkit.BottleneckConfig(target_modules=SLOW))
    assert time.monotonic() - start < 10


def test_one_budget_bounds_every_module_name_of_a_config():
    # Six groups: about 0.1-0.3 s per module name, under any per-match timeout, but 20 names would take seconds.
    medium = "".join(f"(?P<g{i}>.*)" for i in range(6)) + "".join(f"(?P=g{i})" for i in reversed(range(6))) + r"\d"
    matcher = Matcher(budget_s=0.3, per_match_s=0.0)
    with pytest.raises(PatternError, match="takes too long"):
        for i in range(20):
            matcher.fullmatch(medium, f"model.layers.{i}.self_attn.q_proj", "target_modules")
    assert matcher.spent < 0.6, matcher.spent  # CPU seconds, whatever the number of names


def test_legitimate_patterns_select_as_before():
    config = peftkit.LoraConfig(target_modules=r".*\.(q|v)_proj", rank_pattern={r"layers\.1\.self_attn\.v_proj": 2},
                                alpha_pattern={"q_proj": 3.0}, layers_to_transform=[1], layers_pattern="layers")
    model = peftkit.inject(tiny_llama(), config)
    wrapped = sorted(n for n, m in model.named_modules() if getattr(m, "peftkit_wrapper", False))
    assert wrapped == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 2
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 3.0
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 8


# --- NaN and infinity ------------------------------------------------------------------------------------------
def test_nan_tensors_are_refused_unless_allowed(tmp_path):
    path = saved_adapter(tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    bad_key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[bad_key][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or infinite") as info:
        peftkit.load_adapter(model, path)
    assert bad_key.removeprefix("base_model.model.") in str(info.value) and "allow_nonfinite=True" in str(info.value)
    assert peftkit.record.configs(model) == {}  # nothing changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    peftkit.load_adapter(model, path, allow_nonfinite=True)
    assert "default" in peftkit.record.configs(model)


@pytest.mark.parametrize("edit, named", [
    ({"lora_alpha": math.inf}, "lora_alpha=inf"),
    ({"alpha_pattern": {"q_proj": math.nan}}, "alpha_pattern['q_proj']=nan"),
    ({"lora_alpha": -math.inf}, "lora_alpha=-inf"),
])
def test_nonfinite_config_values_are_refused_unless_allowed(tmp_path, edit, named):
    path = saved_adapter(tmp_path / "a")
    edit_config(path, **edit)
    with pytest.raises(ValueError, match="NaN or infinite") as info:
        peftkit.load_adapter(tiny_llama(), path)
    assert named in str(info.value)
    peftkit.load_adapter(tiny_llama(), path, allow_nonfinite=True)


@pytest.mark.parametrize("text, kind", [("[1, 2]", "list"), ("7", "int"), ('"LORA"', "str"), ("null", "NoneType")])
def test_a_config_that_is_not_a_json_object_is_named(tmp_path, text, kind):
    path = saved_adapter(tmp_path / "a")
    (path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match="not an object") as info:
        peftkit.load_adapter(tiny_llama(), path)
    assert str(path / "adapter_config.json") in str(info.value) and f"JSON {kind}" in str(info.value)
    with pytest.raises(ValueError, match="JSON object"):
        peftkit.registry.config_from_peft_dict(json.loads(text))


# --- file modes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_adapters_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = saved_adapter(tmp_path / "a")
        saved_adapter(tmp_path / "a")  # overwriting keeps the same rule
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE(os.stat(path / name).st_mode) == mode, name
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_checkpoints_and_quantized_models_honour_the_umask(tmp_path):
    from peftkit.train.checkpoints import save_checkpoint

    old = os.umask(0o022)
    try:
        checkpoint = save_checkpoint(tmp_path / "run", 1, params={"w": torch.ones(2)}, trainer_state={"step": 1},
                                     extra_dirs={"adapter": lambda d: saved_adapter(d)})
        quantized = peftkit.save_quantized(peftkit.quantize(tiny_llama()), tmp_path / "nf4")
    finally:
        os.umask(old)
    written = [f for root in (checkpoint, quantized) for f in root.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in written)
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in written} == {f.name: "0o644" for f in written}


def test_an_adapter_for_another_base_gets_a_short_error_that_names_the_likely_base(tmp_path):
    """An adapter from a wider, deeper Llama: the message shows the counts, the first keys of each kind and
    what the shapes say (width 64 against 32, layers up to 5 against 1), not all 100+ keys; the error
    object still holds every key."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit.files import SHOWN_KEYS, AdapterMismatch

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2))
    peftkit.inject(other, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    peftkit.save_adapter(other, tmp_path / "big")
    with pytest.raises(AdapterMismatch) as caught:
        peftkit.load_adapter(tiny_llama(), tmp_path / "big")
    err = caught.value
    text = str(err)
    assert len(err.wrong) == 28 and len(err.unexpected) == 56  # 2 shared layers x 7 x (A, B); 4 more layers
    assert "28 key(s) with wrong shapes" in text and "56 unexpected key(s)" in text
    assert f"... and {28 - SHOWN_KEYS} more" in text and f"... and {56 - SHOWN_KEYS} more" in text
    assert "64 in the file where this model has 32" in text
    assert "layers up to 5, this model's go up to 1" in text
    assert len(text.splitlines()) < 30, text
