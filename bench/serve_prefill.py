"""Chunked prefill: how long a running stream waits while an 8k-token prompt is prefilled, without and with chunks.

One engine (serve.Engine) on a random tiny Llama built from a config (hidden 32, 2 layers, 8448 positions by
default) runs one greedy stream; once it is producing tokens, an 8192-token prompt arrives. Measured, per
round and side, from the long prompt's arrival until the stream's first token after that prompt's first token:

    gap       the longest pause between two of the stream's tokens (the stall a user of the stream sees)
    ttft      the long prompt's time to its first token (what chunking costs the long request itself)
    step      the stream's median time between tokens before the long prompt arrived (for scale)

Sides: 'whole' (prefill_chunk=None: the prompt in one forward, what the engine did before chunking, the same
as a chunk of the prompt's length) and 'chunked' (--chunk tokens, 512 by default). The two sides alternate for
--rounds rounds and the median per side is printed, with the ratio whole / chunked of the longest gap. Absolute
times are noise on a shared machine; the ratio is the result.

Run:  python bench/serve_prefill.py [--prompt 8192] [--chunk 512] [--rounds 3] [--hidden 32] [--layers 2]
                                    [--dtype float32] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import threading
import time
import warnings

import torch
import transformers

from peftkit.serve import AdapterRegistry, Engine, GenRequest

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "fma", "f16c")


def cpu_line() -> str:
    """The CPU model and the vector flags that matter for torch's CPU kernels, from lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    have = [f for f in FLAGS_OF_INTEREST if f in flags]
    return f"{fields.get('Model name', '?').strip()} | {os.cpu_count()} CPUs | flags: {' '.join(have) or 'none'}"


def build(args) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=args.prompt + 256, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(getattr(torch, args.dtype))


def one_round(model, registry: AdapterRegistry, chunk: int | None, long_prompt: list[int]) -> dict:
    engine = Engine(model, registry, prefill_chunk=chunk)
    engine.start()
    times: list[float] = []
    try:
        running = engine.submit(GenRequest([1, 2, 3, 4, 5], None, max_tokens=200))
        reader = threading.Thread(target=lambda: [times.append(time.perf_counter()) for _ in running.tokens()])
        reader.start()
        while len(times) < 20:
            time.sleep(0.001)
        t0 = time.perf_counter()
        long = engine.submit(GenRequest(long_prompt, None, max_tokens=1))
        next(long.tokens())
        t1 = time.perf_counter()
        count = len(times)
        while len(times) < count + 3 and not running.done:  # the gap around the long prompt's end closes
            time.sleep(0.001)
        running.cancel()
        reader.join()
    finally:
        engine.close()
    before = [b - a for a, b in zip(times, times[1:]) if b < t0]
    after = next((t for t in times if t > t1), times[-1])
    window = [t0] + [t for t in times if t0 < t < after] + [after]
    return {"gap": max(b - a for a, b in zip(window, window[1:])), "ttft": t1 - t0,
            "step": statistics.median(before), "chunks": engine.stats()["prefill_chunks"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=8192, help="tokens of the long prompt")
    p.add_argument("--chunk", type=int, default=512, help="prefill_chunk of the chunked side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=32, help="hidden size of the tiny Llama")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on shared machines)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"{cpu_line()} | torch {torch.__version__} threads={torch.get_num_threads()} | "
          f"transformers {transformers.__version__}")
    print(f"tiny Llama hidden={args.hidden} layers={args.layers} {args.dtype}; one running stream, then a "
          f"{args.prompt}-token prompt; chunk={args.chunk}; median of {args.rounds} rounds")
    model = build(args)
    registry = AdapterRegistry(model, adapters={})  # wraps the model's linears once; each round its own engine
    long_prompt = torch.randint(0, 128, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    sides = {"whole": None, "chunked": args.chunk}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    one_round(model, registry, args.chunk, long_prompt[:args.chunk * 2])  # warm-up
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            results[name].append(one_round(model, registry, sides[name], long_prompt))
    med = {name: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for name, rows in results.items()}
    print(f"{'side':<8} {'longest gap (s)':>16} {'8k ttft (s)':>12} {'stream step (ms)':>17} {'chunks':>7}")
    for name, m in med.items():
        print(f"{name:<8} {m['gap']:>16.3f} {m['ttft']:>12.3f} {m['step'] * 1e3:>17.2f} {m['chunks']:>7.0f}")
    ratio = med["whole"]["gap"] / med["chunked"]["gap"]
    print(f"longest gap, whole / chunked: {ratio:.1f}x shorter with chunks; "
          f"ttft chunked / whole: {med['chunked']['ttft'] / med['whole']['ttft']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpu": cpu_line(), "median": med, "rounds": results,
                       "gap_ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
