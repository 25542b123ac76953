"""`peftkit plan`: memory, trainable share and GPU fit of a training setup, before anything runs."""

from __future__ import annotations

import argparse
import json

from ..cli_format import DefaultsHelpFormatter
from . import hardware, memory, presets

GIB = 2**30


def _targets(text: str) -> str | tuple[str, ...]:
    return text if text in ("all-linear", "attention") else tuple(t.strip() for t in text.split(",") if t.strip())


def settings_from_args(args: argparse.Namespace) -> memory.Settings:
    return memory.Settings(
        method=args.method, r=args.r, targets=_targets(args.target_modules), batch_size=args.batch_size,
        seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
        dtype=args.dtype, adapter_dtype=args.adapter_dtype, num_gpus=args.gpus, device=args.device,
        reduction_factor=args.reduction_factor, variant=args.variant, num_virtual_tokens=args.num_virtual_tokens,
        answer_fraction=args.answer_fraction, loss_chunk=args.loss_chunk)


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def render(est: memory.Estimate, target: hardware.GPU | None = None) -> str:
    s, shape = est.settings, est.shape
    adapter = f" r={s.r} on {', '.join(s.target_names(shape))}" if memory.ranked(s.method) else ""
    sharded = " (states sharded)" if s.num_gpus > 1 and s.method == "full" else ""
    lines = [f"{shape.name}: {shape.total_params() / 1e9:.3f}B parameters, {shape.num_layers} layers, hidden "
             f"{shape.hidden_size}, MLP {shape.intermediate_size}, {shape.num_heads} heads "
             f"({shape.num_kv_heads} key/value), vocabulary {shape.vocab_size}",
             f"setup: {s.method}{adapter}; batch {s.batch_size} x {s.seq_len} tokens; {s.dtype}; {s.optimizer}; "
             f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}; {s.num_gpus} GPU(s){sharded}",
             "", "memory per process at its peak:"]
    for name, value in est.parts.items():
        if value:
            lines.append(f"  {name:<24} {_size(value):>12}  {100 * value / est.total:5.1f}%")
    lines.append(f"  {'total':<24} {_size(est.total):>12}")
    lines += ["", f"trainable parameters: {est.trainable_params:,} of {est.total_params:,} "
              f"({100 * est.trainable_share:.3f}%)",
              f"{'model' if s.method == 'full' else 'adapter'} file: {_size(est.output_bytes)}", ""]
    rows = hardware.table(est)
    header = f"  {'GPU':<34} {'memory':>8}  one GPU" + ("   GPUs, states sharded" if s.method == "full" else "")
    lines += ["GPUs:", header]
    for row in rows:
        line = f"  {row['gpu']:<34} {row['memory_gib']:>5.0f} GiB  {row['one_gpu']:<7}"
        if s.method == "full":
            line += f"  {row['gpus_sharded'] or '-'}"
        lines.append(line)
    lines += [hardware.legend(), "", hardware.recommend(est)]
    fixes = hardware.fixes_text(est, target or hardware.target_gpu())
    return "\n".join(lines + ([""] + fixes if fixes else []))


def run(args: argparse.Namespace) -> int:
    shape = presets.resolve(args.model)
    est = memory.estimate(shape, settings_from_args(args))
    target = hardware.target_gpu(args.max_memory)
    if args.json:
        record = est.to_dict() | {"gpus": hardware.table(est), "recommendation": hardware.recommend(est),
                                  "fit_legend": hardware.legend(), "target": target.name,
                                  "fixes": hardware.fixes(est, target)}
        print(json.dumps(record, indent=2))
    else:
        print(render(est, target))
    return 0


def add_plan_command(sub) -> None:
    p = sub.add_parser("plan", help="predict training memory and which GPUs fit, before anything runs",
                       description="Predict the peak memory of a training setup term by term (weights, "
                       "quantization statistics, gradients, optimizer states, activations, temporary buffers, "
                       "runtime), the trainable parameters and adapter size, and which common GPUs hold it. "
                       "Reads only a config: a preset name, a config.json, or a transformers directory.",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("model", help=f"preset ({', '.join(presets.known())}), a config.json or a model directory")
    p.add_argument("--method", default="lora", choices=memory.METHODS, help="training method")
    p.add_argument("--r", "--rank", "--lora-r", dest="r", type=int, default=16, help="LoRA rank")
    p.add_argument("--target-modules", default="all-linear",
                   help="'all-linear', 'attention' or comma-separated layer names (q_proj,v_proj,...)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per GPU per micro-batch")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block's activations in backward")
    p.add_argument("--optimizer", default="adamw", choices=list(memory.OPTIMIZERS),
                   help="adamw: two fp32 moments; adamw8bit: two 8-bit moments; sgd: one momentum buffer")
    p.add_argument("--dtype", default="bfloat16", choices=list(memory.DTYPES), help="weights and compute dtype")
    p.add_argument("--adapter-dtype", default="float32", choices=list(memory.DTYPES),
                   help="dtype of the adapter's weights (peftkit and HF PEFT keep them in float32)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs; full fine-tuning shards its states across them")
    p.add_argument("--device", default="cuda", choices=list(memory.RUNTIME_BYTES),
                   help="cuda: a GPU's memory; cpu: the process's resident memory")
    p.add_argument("--reduction-factor", type=int, default=16, help="bottleneck only: hidden / bottleneck width")
    p.add_argument("--variant", default="houlsby", choices=("houlsby", "pfeiffer"), help="bottleneck only")
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="prefix only")
    p.add_argument("--answer-fraction", type=float, default=1.0,
                   help="share of tokens that carry a loss (the output head runs on those only)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="rows of the output head computed at once")
    p.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="memory to fit in GiB (default: the largest GPU in the table); when the setup does not "
                   "fit, the changes that make it fit are listed")
    p.add_argument("--json", action="store_true", help="print a JSON record instead of text")
    p.set_defaults(func=run)
