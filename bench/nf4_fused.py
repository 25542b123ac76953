"""bench/nf4.py's 'fused' rows: a QLoRA training step (NF4 base, bf16 compute, fp32 adapters r=16 on all
linears) through peftkit's training loss, three sides on the same random Llama body and batch:

    qlora         the fused NF4 nodes (methods/lora/fused_nf4.py, mlp_nf4.py), padding-free rows
    qlora-module  the same model with the NF4 nodes switched off: each layer through NF4Linear + LoRA's ops
    lora-bf16     the same body as a dense bf16 base (peftkit's fused bf16 nodes where they apply)

Step time: medians of steps timed round-robin. Memory: what autograd keeps between forward and backward (the
bytes of the distinct storages its saved tensors hold, counted through saved_tensors_hooks: deterministic on
any device), and on CUDA the growth of max_memory_allocated over one step. Model shapes: 'smollm2' is
SmolLM2-135M's configuration with random weights (no download); 'tiny' a 2-layer body for quick CPU runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import transformers
from torch import nn

import peftkit
from peftkit.methods.lora import fused_nf4
from peftkit.methods.lora import layer as lora_layer
from peftkit.methods.lora import mlp_nf4
from peftkit.train.loss import sum_token_loss

SHAPES = {
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3),
}
BF16 = torch.bfloat16


def body(shape: str) -> nn.Module:
    """A random Llama of the named shape in bf16 (seeded: every side starts from the same weights)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).to(BF16)


def adapted(model: nn.Module, quantized: bool, device: torch.device) -> nn.Module:
    model = model.to(device)
    if quantized:
        peftkit.quantize(model, compute_dtype=BF16)
    torch.manual_seed(1)
    peftkit.inject(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return model.train()


def make_batch(vocab: int, batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Instruction-like rows: every other row right-padded to 70%, labels on the last 70% of the real tokens."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1::2, int(0.7 * seq):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : int(0.3 * seq)] = -100
    return ids.to(device), mask.to(device), labels.to(device)


@contextmanager
def module_path() -> Iterator[None]:
    """The NF4 nodes switched off: every LoRA layer over NF4 runs NF4Linear's forward and LoRA's own ops."""
    saved = lora_layer.nf4_fusable, mlp_nf4.nf4_fusable
    lora_layer.nf4_fusable = mlp_nf4.nf4_fusable = lambda *a: False
    try:
        yield
    finally:
        lora_layer.nf4_fusable, mlp_nf4.nf4_fusable = saved


def stepper(model: nn.Module, batch: tuple[torch.Tensor, ...], module: bool) -> Callable[[], float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        with module_path() if module else nullcontext():
            total, n = sum_token_loss(model, *batch)
            (total / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total.item() / n

    return step


def saved_bytes(model: nn.Module, batch: tuple[torch.Tensor, ...], module: bool) -> int:
    """Bytes of the distinct storages autograd keeps from forward to backward in one training forward."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), module_path() if module else nullcontext():
        total, n = sum_token_loss(model, *batch)
    total.backward()
    model.zero_grad(set_to_none=True)
    return sum(sizes.values())


def cuda_growth(step: Callable[[], float], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def fused_rows(args, device: torch.device, race: Callable, add_times: Callable, add: Callable) -> None:
    """Time and measure the three sides; rows go through bench/nf4.py's add/add_times."""
    base = body(args.fused_shape)
    models = {"qlora": adapted(copy.deepcopy(base), True, device), "lora-bf16": adapted(base, False, device)}
    models["qlora-module"] = copy.deepcopy(models["qlora"])
    batch = make_batch(base.config.vocab_size, args.fused_batch, args.fused_seq, device)
    steps = {k: stepper(m, batch, module=k == "qlora-module") for k, m in models.items()}
    losses = {k: f"{s():.4f}" for k, s in steps.items()}  # warm-up, and the three start from one loss
    print(f"  shape {args.fused_shape}, batch {args.fused_batch} x {args.fused_seq}, first losses {losses}")
    mem = {k: saved_bytes(models[k], batch, module=k == "qlora-module") for k in steps}
    times = race(steps, args.fused_repeats, args.warmup, device)
    shape = f"{args.fused_shape} {args.fused_batch}x{args.fused_seq}"
    add_times(f"QLoRA step {shape}, fused / module path", times, "qlora", "qlora-module", "module", 1.0)
    add_times(f"QLoRA step {shape} / bf16 LoRA", times, "qlora", "lora-bf16", "LoRA", 1.15)
    mib = 2.0**20
    add("QLoRA saved for backward, fused / module", mem["qlora"] / mib, mem["qlora-module"] / mib, "module", "MiB",
        mem["qlora"] / mem["qlora-module"], 1.0, "distinct storages of autograd's saved tensors, one forward")
    add("QLoRA saved for backward / bf16 LoRA", mem["qlora"] / mib, mem["lora-bf16"] / mib, "LoRA", "MiB",
        mem["qlora"] / mem["lora-bf16"], 1.0, "includes LoRA's weights it saves; the 4-bit base saves none")
    if device.type == "cuda":
        peak = {k: cuda_growth(s, device) for k, s in steps.items()}
        for ref, name in (("qlora-module", "module"), ("lora-bf16", "LoRA")):
            add(f"QLoRA peak growth (CUDA) / {name}", peak["qlora"] / mib, peak[ref] / mib, name, "MiB",
                peak["qlora"] / peak[ref], 1.0, "max_memory_allocated over one step minus before it")
