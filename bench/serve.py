"""Multi-adapter serving throughput: peftkit's engine vs HF PEFT, same model, adapters and requests, one run.

On SmolLM2-135M-Instruct (or a random tiny Llama with --model tiny) with K distinct LoRA adapters
(r=16, all linear layers, random non-zero weights, PEFT files in a temporary directory), R requests
(prompts of the built-in ticket task rendered with the chat template; request i uses adapter i % K;
greedy; a request generates exactly its max_tokens, no stop token, so all sides produce the same tokens).
Two workloads: 'equal', every request --max-tokens long (static batching's best case), and 'mixed',
max_tokens drawn (seeded) from --max-tokens/4 .. 2 x --max-tokens, as replies of real traffic differ:

    peftkit    serve.Engine: continuous batching (up to --max-batch rows share each decode forward, with
               a KV cache), rows of different adapters in one forward through the gathered slot layers
    hf-mixed   HF PEFT's mixed-batch generation: PeftModel with all K adapters loaded, generate() on
               --max-batch requests at a time in arrival order (left-padded) with adapter_names=[...];
               a batch runs until its longest request is done (what generate() does)
    hf-swap    one adapter per request: HF PEFT's set_adapter(name) then generate() for that request
               alone, one after another (how a single-adapter server swaps)

Throughput = requested tokens / wall seconds for the whole set of requests (median of --rounds rounds,
the sides interleaved, after one untimed warm-up load); ratios against peftkit's own
single-adapter throughput (goal >= 0.8) and against the two HF PEFT ways (goal >= 2). Before timing, a
few requests served by the engine are checked token for token against HF PEFT's generate() with the same
adapter. Also measured: the cold-load time of an r=16 all-linear adapter into a running registry that holds
the K adapters already (median of --cold-loads fresh adapters; goal < 100 ms) and the memory one loaded
adapter takes in the slots.

Run:  python bench/serve.py [--model smollm2|tiny] [--adapters 1,8,32] [--requests 32] [--max-tokens 32]
                            [--max-batch 16] [--swap-requests 8] [--rounds 3] [--device cpu|cuda] [--threads 1] [--json out.json]
(about 5 minutes for the defaults on the project's 2-core CPU machine; --quick: tiny model, seconds)
--dtype bfloat16 (or float16): the base, its KV cache and the engine's batch in that dtype on both sides; the
adapters in fp32 on both (the engine's slots, and PEFT's default autocast_adapter_dtype). The header lists the
CPU's AVX/AMX flags: without avx512_bf16 or amx_bf16 bf16 matmuls are slower than fp32 ones (precision.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import peftkit  # noqa: E402
from peftkit import precision  # noqa: E402
from peftkit.serve import AdapterRegistry, Engine, GenRequest  # noqa: E402
from peftkit.train import task  # noqa: E402
from peftkit.train.infer import chat_prompt  # noqa: E402

RANK = 16


def load(name: str):
    from peftkit.models import load_model, resolve_model_dir

    if name == "tiny":  # a small random body with SmolLM2's tokenizer
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                       tie_word_embeddings=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_dir("smollm2"))
        return transformers.LlamaForCausalLM(cfg).eval(), tokenizer
    model, tokenizer = load_model("smollm2")
    return model.eval(), tokenizer


def make_adapters(model, root: Path, count: int) -> list[str]:
    """`count` PEFT-format adapters with random A and non-zero B, small enough to keep the text sensible."""
    scratch = copy.deepcopy(model)
    peftkit.inject(scratch, peftkit.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for n, p in scratch.named_parameters():
                if "lora_" in n:
                    std = 0.02 if "lora_A" in n else 0.005
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        name = f"adapter-{i:02d}"
        peftkit.save_adapter(scratch, root / name)
        names.append(name)
    del scratch
    return names


def prompts(tokenizer, count: int) -> list[list[int]]:
    tickets = task.eval_set(count)
    return [tokenizer(chat_prompt(tokenizer, t.messages(with_answer=False)), add_special_tokens=False)["input_ids"]
            for t in tickets]


def run_engine(engine: Engine, reqs: list[tuple[list[int], str | None, int]]) -> tuple[float, list]:
    t0 = time.perf_counter()
    handles = [engine.submit(GenRequest(prompt_ids=ids, adapter=a, max_tokens=n)) for ids, a, n in reqs]
    outs = [list(h.tokens()) for h in handles]
    wall = time.perf_counter() - t0
    bad = [h.error for h in handles if h.finish_reason != "length"]
    if bad:
        raise SystemExit(f"engine requests did not finish by length: {bad[:3]}")
    return wall, outs


def hf_generate(model, tokenizer, batch: list[list[int]], max_tokens: int, adapter_names=None) -> list[list[int]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(ids) for ids in batch)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=pad, **kwargs)
    return [row[width:].tolist() for row in out]


def run_hf_mixed(model, tokenizer, reqs, max_batch: int) -> float:
    """Static batches in arrival order; generate() runs a batch until its longest request is done."""
    t0 = time.perf_counter()
    for start in range(0, len(reqs), max_batch):
        chunk = reqs[start:start + max_batch]
        hf_generate(model, tokenizer, [ids for ids, _, _ in chunk], max(n for _, _, n in chunk),
                    [a for _, a, _ in chunk])
    return time.perf_counter() - t0


def run_hf_swap(model, tokenizer, reqs) -> float:
    t0 = time.perf_counter()
    for ids, adapter, n in reqs:
        model.set_adapter(adapter)
        hf_generate(model, tokenizer, [ids], n)
    return time.perf_counter() - t0


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--adapters", default="1,8,32", help="comma-separated counts of distinct adapters in the load")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--swap-requests", type=int, default=8, help="requests timed for hf-swap (it is sequential)")
    p.add_argument("--lengths", default="equal,mixed",
                   help="workloads: 'equal' (every request --max-tokens long), 'mixed' (max_tokens drawn from "
                        "max_tokens/4 .. 2*max_tokens, seeded); comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side and adapter count (medians)")
    p.add_argument("--cold-loads", type=int, default=8, help="fresh adapters whose first load is timed")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the base's dtype on both sides (default float32)")
    p.add_argument("--quick", action="store_true", help="tiny model, 8 requests, 8 tokens, adapters 1,4")
    args = p.parse_args()
    if args.quick:
        args.model, args.requests, args.max_tokens, args.adapters, args.swap_requests = "tiny", 8, 8, "1,4", 4
        args.cold_loads, args.rounds = 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.adapters.split(",")]
    print(f"peftkit {peftkit.__version__} | peft {peft.__version__} | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    print(f"{platform.platform()} | cpu_count={os.cpu_count()} | torch threads={torch.get_num_threads()}")
    facts = precision.machine_facts()
    print(f"CPU {facts['cpu']} | flags {' '.join(facts['cpu_flags']) or 'none'} | bf16 flags "
          f"{' '.join(facts['bf16_flags']) or 'none'} | CUDA {facts['cuda']} | --dtype auto here: "
          f"{facts['auto']['dtype']} | this run: {args.dtype}")

    model, tokenizer = load(args.model)
    model = model.to(args.device, getattr(torch, args.dtype))
    pristine = copy.deepcopy(model)  # HF PEFT's base: the engine's model gets slot layers
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    n_adapters = max(counts) + args.cold_loads
    names = make_adapters(model, root, n_adapters)
    cold_names, names = names[max(counts):], names[:max(counts)]
    ids = prompts(tokenizer, args.requests)
    print(f"model {args.model}; {len(names)} adapters r={RANK} all-linear; {args.requests} requests, prompts "
          f"{min(map(len, ids))}-{max(map(len, ids))} tokens, {args.max_tokens} generated each; "
          f"max batch {args.max_batch}")

    before = rss_mib()
    registry = AdapterRegistry(model, adapter_dir=root, max_loaded=n_adapters, max_rank=64)
    engine = Engine(model, registry, max_batch=args.max_batch, max_queue=4 * args.requests)
    engine.start()
    for name in names:
        registry.acquire(name).release()
    loaded = registry.stats()
    per_adapter_mib = loaded["bytes"] / max(loaded["loaded"], 1) / 2**20
    rss_growth = (rss_mib() - before) / max(loaded["loaded"], 1)
    cold = []
    for name in cold_names:  # first use of each in a running server: read, hash, validate, copy into a slot
        t0 = time.perf_counter()
        registry.acquire(name).release()
        cold.append(1000 * (time.perf_counter() - t0))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(pristine, root / names[0], adapter_name=names[0]).eval()
        for name in names[1:]:
            hf.load_adapter(root / name, adapter_name=name)

    # correctness first: a few requests, engine (batched together) vs HF PEFT alone, token for token
    check = [(ids[i], names[i % len(names)], args.max_tokens) for i in range(min(4, len(ids)))]
    _, ours = run_engine(engine, check)
    agree = 0
    for (prompt, adapter, n), got in zip(check, ours):
        hf.set_adapter(adapter)
        agree += hf_generate(hf, tokenizer, [prompt], n)[0] == got
    print(f"engine vs HF PEFT, greedy, {len(check)} requests: {agree}/{len(check)} identical")

    gen = torch.Generator().manual_seed(7)
    lengths = {"equal": [args.max_tokens] * args.requests,  # every request as long: static batching's best case
               "mixed": torch.randint(args.max_tokens // 4, 2 * args.max_tokens + 1, (args.requests,),
                                      generator=gen).tolist()}  # replies of different lengths, as in real traffic
    warm = [(ids[i], names[i % len(names)], args.max_tokens) for i in range(args.requests)]
    run_engine(engine, warm)  # warm-up: the first full load pays for allocations
    run_hf_mixed(hf, tokenizer, [(p, a, 2) for p, a, _ in warm[: args.max_batch]], args.max_batch)
    rows = []
    for workload in args.lengths.split(","):
        for k in counts:
            reqs = [(ids[i], names[i % k], lengths[workload][i]) for i in range(args.requests)]
            walls, mixed, swap = [], [], []
            for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits every side alike
                walls.append(run_engine(engine, reqs)[0])
                mixed.append(run_hf_mixed(hf, tokenizer, reqs, args.max_batch))
                swap.append(run_hf_swap(hf, tokenizer, reqs[: args.swap_requests]))
            tokens = sum(n for _, _, n in reqs)
            rows.append({"lengths": workload, "adapters": k, "peftkit_tok_s": tokens / statistics.median(walls),
                         "hf_mixed_tok_s": tokens / statistics.median(mixed),
                         "hf_swap_tok_s": sum(n for _, _, n in reqs[: args.swap_requests]) / statistics.median(swap)})
    engine.close()
    print()
    print(f"{'lengths':>7} | {'adapters':>8} | {'peftkit tok/s':>13} | {'/ 1 adapter':>11} | {'HF mixed tok/s':>14} | "
          f"{'peftkit / HF mixed':>18} | {'HF swap tok/s':>13} | {'peftkit / HF swap':>17}")
    print("-" * 122)
    for r in rows:
        single = next(x for x in rows if x["lengths"] == r["lengths"])["peftkit_tok_s"]
        r["vs_single"] = r["peftkit_tok_s"] / single
        r["vs_hf_mixed"] = r["peftkit_tok_s"] / r["hf_mixed_tok_s"]
        r["vs_hf_swap"] = r["peftkit_tok_s"] / r["hf_swap_tok_s"]
        print(f"{r['lengths']:>7} | {r['adapters']:>8} | {r['peftkit_tok_s']:>13.1f} | {r['vs_single']:>11.2f} | "
              f"{r['hf_mixed_tok_s']:>14.1f} | {r['vs_hf_mixed']:>18.2f} | {r['hf_swap_tok_s']:>13.1f} | "
              f"{r['vs_hf_swap']:>17.2f}")
    cold_ms = statistics.median(cold)
    print(f"\ncold load of an r={RANK} all-linear adapter: median {cold_ms:.1f} ms over {len(cold)} "
          f"(min {min(cold):.1f}, max {max(cold):.1f}); goal < 100 ms")
    print(f"memory per loaded adapter: {per_adapter_mib:.2f} MiB in the slots "
          f"(RSS growth {rss_growth:.2f} MiB per adapter over {loaded['loaded']} loaded)")
    print("goals: peftkit with K adapters / 1 adapter >= 0.8; peftkit / HF mixed >= 2; peftkit / HF swap >= 2")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "cold_load_ms": cold, "agree": agree,
                                               "per_adapter_mib": per_adapter_mib, "dtype": args.dtype,
                                               "machine": facts}, indent=2))
        print(f"wrote {args.json}")
    tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
