"""`peftkit demo`: the core at work on the embedded default model, end to end, in about a minute on a CPU.

Loads SmolLM2-135M-Instruct, injects LoRA, prints the trainable share, teaches the adapter one fact with
a few optimizer steps (so the adapter is real, not zeros), saves it in PEFT format, loads it into a fresh
copy of the model, merges it, and shows that every variant computes the same logits.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from . import (LoraConfig, inject, load_adapter, merge, merge_and_unload, save_adapter, summary,
               trainable_parameters, unmerge)
from .adapters import disable_adapters

QUESTION = "What is peftkit?"
TOLERANCE = 1e-3  # merging adds W + BA in fp32: rounding, not a difference in the function
ANSWER = "peftkit is a toolkit that fine-tunes language models with small LoRA adapters."


def _weight_mb(model) -> float:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


def _chat_ids(tokenizer, question: str, answer: str | None = None) -> tuple[torch.Tensor, int]:
    """Token ids of a chat prompt (and answer), and the prompt length (loss starts after it)."""
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + (tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"] if answer else [])
    return torch.tensor([ids]), len(prompt_ids)


def _generate(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    ids, _ = _chat_ids(tokenizer, question)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run_demo(model_name: str = "smollm2", rank: int = 8, targets: str = "all-linear", steps: int = 12,
             lr: float = 2e-3, out: str | None = None, quantize: str | None = None) -> dict:
    """quantize="nf4" runs the same on a 4-bit base (QLoRA); the merge step then dequantizes."""
    from .models import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name, quantize=quantize)
    kind = f"NF4 base (QLoRA), {_weight_mb(model):.0f} MB of weights" if quantize else f"{_weight_mb(model):.0f} MB of weights"
    print(f"loaded {model_name}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{kind} ({time.perf_counter() - t0:.1f}s)")
    print(f"\nQ: {QUESTION}\nbase model:    {_generate(model, tokenizer, QUESTION)}")

    inject(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    trainable, total = trainable_parameters(model)
    print(f"\n{summary(model)}")

    ids, prompt_len = _chat_ids(tokenizer, QUESTION, ANSWER)
    labels = ids.clone()
    labels[:, :prompt_len] = -100  # loss on the answer only
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    t1 = time.perf_counter()
    for step in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (0, steps - 1):
            print(f"step {step + 1:>3}/{steps}  loss {loss.item():.4f}")
    model.eval()
    print(f"trained {steps} steps in {time.perf_counter() - t1:.1f}s")
    print(f"with adapter:  {_generate(model, tokenizer, QUESTION)}")

    directory = Path(out) if out else Path(tempfile.mkdtemp(prefix="peftkit-demo-"))
    save_adapter(model, directory)
    size = sum(f.stat().st_size for f in directory.iterdir())
    print(f"\nsaved adapter to {directory} ({size / 1e6:.2f} MB, PEFT format: "
          f"{', '.join(sorted(f.name for f in directory.iterdir()))})")

    probe = ids[:, :prompt_len]
    with torch.no_grad():
        logits = {"trained (unmerged)": model(probe).logits}
        with disable_adapters(model):
            logits["base (adapters disabled)"] = model(probe).logits
        fresh, _ = load_model(model_name, quantize=quantize)
        load_adapter(fresh, directory)
        logits["fresh model + loaded adapter"] = fresh(probe).logits
        if quantize:  # an exact merge into a 4-bit base means dequantizing it
            logits["merged into dequantized base"] = merge_and_unload(fresh, dtype=torch.float32)(probe).logits
        else:
            merge(fresh)
            logits["loaded adapter, merged"] = fresh(probe).logits
            unmerge(fresh)
            logits["unmerged again"] = fresh(probe).logits

    ref = logits["trained (unmerged)"]
    print("\nlogits on the prompt, compared with the trained model:")
    diffs = {}
    for label, value in logits.items():
        diffs[label] = (value - ref).abs().max().item()
        print(f"  {label:<30} max |diff| = {diffs[label]:.2e}")
    agree = all(d < TOLERANCE for label, d in diffs.items() if not label.startswith("base"))
    print(f"\noutputs agree across save -> load -> merge -> unmerge: {'yes' if agree else 'NO'} "
          f"(tolerance {TOLERANCE:g} on logits of magnitude ~{ref.abs().max().item():.0f}); "
          f"the adapter changes the base logits by up to {diffs['base (adapters disabled)']:.2f}")
    print(f"trainable share: {100 * trainable / total:.3f}% of {total:,}; total time {time.perf_counter() - t0:.1f}s")
    return {"agree": agree, "diffs": diffs, "trainable": trainable, "total": total, "adapter_dir": str(directory)}
