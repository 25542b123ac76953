"""The planner: model shapes, the memory model (checked against what autograd really saves and what
peftkit really injects), the published reference points, the GPU table and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama

import peftkit
from peftkit.cli import main
from peftkit.plan import hardware, memory, presets

GIB = 2**30


def test_presets_have_the_published_parameter_counts():
    published = {"llama-7b": 6.74e9, "llama-65b": 65.2e9, "llama-2-70b": 69.0e9, "llama-3-8b": 8.03e9,
                 "mistral-7b": 7.24e9, "qwen2.5-7b": 7.62e9, "smollm2-135m": 134.5e6, "smollm2-1.7b": 1.71e9}
    for name, count in published.items():
        assert presets.resolve(name).total_params() == pytest.approx(count, rel=0.01), name


def test_a_shape_from_a_real_config_counts_that_model_exactly():
    model = tiny_llama()
    shape = presets.from_config(model.config.to_dict(), name="tiny")
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    assert (shape.num_kv_heads, shape.tie_embeddings) == (2, False)


@pytest.mark.parametrize("method, config", [
    ("lora", lambda: peftkit.LoraConfig(r=4, target_modules="all-linear")),
    ("dora", lambda: peftkit.LoraConfig(r=4, target_modules="all-linear", use_dora=True)),
    ("bottleneck", lambda: peftkit.BottleneckConfig(variant="houlsby", reduction_factor=4)),
    ("prefix", lambda: peftkit.PrefixConfig(num_virtual_tokens=5)),
    ("ia3", lambda: peftkit.IA3Config()),  # the planner's all-linear: IA3's defaults, as `train --method ia3`
    ("prompt", lambda: peftkit.PromptTuningConfig(num_virtual_tokens=5)),
    ("ptuning", lambda: peftkit.PromptEncoderConfig(num_virtual_tokens=5)),
    ("ptuning-lstm", lambda: peftkit.PromptEncoderConfig(num_virtual_tokens=5, encoder_reparameterization_type="LSTM")),
    ("adalora", lambda: peftkit.AdaLoraConfig(init_r=4, target_r=2, target_modules="all-linear")),
    ("loha", lambda: peftkit.LoHaConfig(r=4, target_modules="all-linear")),
    ("lokr", lambda: peftkit.LoKrConfig(r=4, target_modules="all-linear")),
    ("vera", lambda: peftkit.VeraConfig(r=4, target_modules="all-linear")),
])
def test_planned_trainable_parameters_equal_what_inject_adds(method, config):
    model = tiny_llama()
    shape = presets.from_config(model.config.to_dict())
    settings = memory.Settings(method=method, r=4, reduction_factor=4, num_virtual_tokens=5, dtype="float32")
    peftkit.inject(model, config())
    trained, _ = peftkit.trainable_parameters(model)
    assert memory.adapter_params(shape, settings) == trained


def _measured_layer_bytes(model, adapted: bool, batch: int = 3, seq: int = 16) -> float:
    """Bytes of the distinct tensors autograd saves inside decoder block 1 (parameters, the shared mask and
    rotary tables excluded) per token."""
    layer = model.model.layers[1]
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, recording = {}, [False]

    def pre(module, args, kwargs):
        recording[0] = True
        for value in list(kwargs.values()) + list(kwargs.get("position_embeddings") or ()):
            if isinstance(value, torch.Tensor):
                excluded.add(value.untyped_storage().data_ptr())

    def pack(t):
        if recording[0]:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = [layer.register_forward_pre_hook(pre, with_kwargs=True),
             layer.register_forward_hook(lambda *a: recording.__setitem__(0, False))]
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :3] = 0  # padding, as real batches have
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return sum(n for ptr, n in saved.items() if ptr not in excluded) / (batch * seq)


@pytest.mark.parametrize("method", ["lora", "ia3", "full"])
def test_activation_bytes_per_token_match_what_autograd_saves(method):
    model = tiny_llama()
    shape = presets.from_config(model.config.to_dict())
    if method == "lora":
        peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    elif method == "ia3":
        peftkit.inject(model, peftkit.IA3Config())
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    predicted = memory._layer_activations(shape, memory.Settings(method=method, r=4, dtype="float32"))
    assert _measured_layer_bytes(model, method == "lora") == pytest.approx(predicted, rel=0.05)


def test_qlora_65b_fits_one_48gb_gpu_as_the_qlora_paper_reports():
    est = memory.estimate(presets.resolve("llama-65b"), memory.Settings(
        method="qlora", r=64, batch_size=1, seq_len=512, gradient_checkpointing=True))
    assert 33 <= est.total / GIB <= 48
    assert hardware.fit(est.total, hardware.GPU("48 GB", 48)) != "no"
    assert 0.45 <= (est.parts["weights"] + est.parts["quantization statistics"]) / est.shape.total_params() <= 0.6


def test_sixteen_bit_full_fine_tuning_of_65b_needs_hundreds_of_gb_and_sharding():
    shape = presets.resolve("llama-65b")
    est = memory.estimate(shape, memory.Settings(method="full", batch_size=1, seq_len=512))
    assert 300 <= est.total / GIB <= 1000
    assert all(row["one_gpu"] == "no" for row in hardware.table(est))
    assert hardware.gpus_needed(shape, est.settings, hardware.GPU("H100 80GB", 80)) >= 8


def test_qlora_on_a_7b_model_needs_5_to_8_gb():
    est = memory.estimate(presets.resolve("llama-2-7b"), memory.Settings(
        method="qlora", r=64, batch_size=1, seq_len=512, gradient_checkpointing=True))
    assert 5 <= est.total / GIB <= 8


def test_the_terms_move_the_way_they_should():
    shape = presets.resolve("llama-2-7b")
    base = memory.Settings(method="lora", batch_size=4, seq_len=1024)
    plain = memory.estimate(shape, base)
    assert memory.estimate(shape, replace(base, gradient_checkpointing=True)).parts["activations"] < \
        plain.parts["activations"] / 5
    assert memory.estimate(shape, replace(base, r=64)).trainable_params == 4 * plain.trainable_params
    assert memory.estimate(shape, replace(base, method="qlora")).parts["weights"] < \
        plain.parts["weights"] / 3
    assert memory.estimate(shape, replace(base, optimizer="adamw8bit")).parts["optimizer states"] == \
        plain.parts["optimizer states"] / 4


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="Known presets: .*llama-65b"):
        presets.resolve("llama-9000")
    with pytest.raises(ValueError, match="num_hidden_layers or n_layer"):
        presets.from_config({"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10, "intermediate_size": 8})
    shape = presets.resolve("smollm2")
    with pytest.raises(ValueError, match="rank 1024 is larger than the layers"):
        memory.estimate(shape, memory.Settings(r=1024))
    with pytest.raises(ValueError, match="qkv_proj"):
        memory.estimate(shape, memory.Settings(targets=("qkv_proj",)))
    with pytest.raises(ValueError, match="optimizer 'lion'"):
        memory.estimate(shape, memory.Settings(optimizer="lion"))


def test_a_config_file_or_directory_is_read(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    assert presets.resolve(str(tmp_path)).total_params() == sum(p.numel() for p in model.parameters())
    assert presets.resolve(str(tmp_path / "config.json")).hidden_size == 32
    with pytest.raises(ValueError, match="no config.json"):
        presets.resolve(str(tmp_path / ".."))


def test_cli_prints_a_breakdown_a_gpu_table_and_json(capsys):
    assert main(["plan", "llama-65b", "--method", "qlora", "--r", "64", "--gradient-checkpointing"]) == 0
    text = capsys.readouterr().out
    for part in ("weights", "quantization statistics", "optimizer states", "activations", "A100 80GB", "H200"):
        assert part in text
    assert main(["plan", "llama-2-7b", "--method", "full", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["trainable_share"] == 1.0 and record["gpus"][0]["gpus_sharded"] > 1
    assert "sharded" in record["recommendation"]
    assert main(["plan", "gpt-9"]) == 2
    assert "Known presets" in capsys.readouterr().err
