"""The `peftkit` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.model, rank=args.rank, targets=args.targets, steps=args.steps, lr=args.lr, out=args.out,
                      quantize=args.quantize)
    return 0 if result["agree"] else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Print an adapter's config and tensors without loading any model."""
    from pathlib import Path

    from .checkpoint import find_adapter_dir, read_adapter

    run_adapter = Path(args.adapter) / "adapter"  # a `peftkit train` run directory holds its adapter there
    where = run_adapter if (run_adapter / "adapter_config.json").is_file() else Path(args.adapter)
    config, tensors = read_adapter(where, args.name, allow_pickle=args.allow_pickle)
    folder = find_adapter_dir(where, args.name)
    n_params = sum(t.numel() for t in tensors.values())
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    if args.json:
        print(json.dumps({"config": config.to_peft_dict(), "parameters": n_params, "modules": modules,
                          "tensors": {k: list(t.shape) for k, t in tensors.items()}}, indent=2))
        return 0
    print(f"adapter: {folder}")
    if config.peft_type == "LORA":
        print(f"type: LORA  r={config.r}  lora_alpha={config.lora_alpha}  rslora={config.use_rslora}  "
              f"dora={config.use_dora}")
        print(f"targets: {config.target_modules}  base: {config.base_model_name_or_path}")
    else:
        print(f"type: {config.peft_type}  {json.dumps(config.to_peft_dict(), sort_keys=True)}")
    print(f"{len(tensors)} tensors, {n_params:,} parameters, on {len(modules)} modules")
    limit = args.limit or len(tensors)
    for key in list(tensors)[:limit]:
        print(f"  {key}  {tuple(tensors[key].shape)}  {tensors[key].dtype}")
    if len(tensors) > limit:
        print(f"  ... {len(tensors) - args.limit} more (--limit N to see them)")
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    """Which modules a target spec selects in a model, and what LoRA at rank r would add."""
    from .methods.lora import LoraConfig
    from .models import load_model
    from .targeting import select_targets

    model, _ = load_model(args.model)
    spec = args.target_modules[0] if len(args.target_modules) == 1 and (
        args.target_modules[0] == "all-linear" or args.regex) else args.target_modules
    config = LoraConfig(r=args.rank, target_modules=spec, exclude_modules=args.exclude or None)
    selected = select_targets(model, config)
    from .methods.lora import factor_shapes, parameter_count
    from .targeting import adaptable_kind

    added = 0
    for name, module in selected:
        a, b = factor_shapes(adaptable_kind(module), module, config.rank_for(name))
        added += parameter_count(adaptable_kind(module), module, config.rank_for(name))
        if args.verbose:
            print(f"  {name}  A{a} B{b}")
    total = sum(p.numel() for p in model.parameters())
    print(f"{len(selected)} modules selected; LoRA r={args.rank} adds {added:,} parameters "
          f"({100 * added / total:.3f}% of {total:,})")
    print(describe_verified(model))
    return 0


def describe_verified(model) -> str:
    """Which of peftkit's fast paths a parity test proves for this model's architecture (hf.arch.VERIFIED)."""
    from . import hf

    kind = hf.model_type(model)
    have = hf.verified_features(model)
    fast = [f for f in ("head_loss", "fused_linear", "fused_mlp") if f in have]
    if not fast:
        return (f"architecture {kind!r}: no training fast path is verified for it, so training uses the model's "
                "own forward (exact, slower; tests/test_arch_parity.py lists the verified ones)")
    others = [f for f in hf.FEATURES if f in have and f not in fast]
    return (f"architecture {kind!r}: verified fast paths {', '.join(fast)}"
            + (f"; also verified: {', '.join(others)}" if others else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning, "
                                     "with adapters in HF PEFT's file format.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="inject, briefly train, save, load, merge LoRA on the default model",
                          description="Show the core on SmolLM2-135M-Instruct: inject LoRA, print the trainable "
                          "share, train a few steps, save (PEFT format), load into a fresh model, merge, and "
                          "check that all outputs agree. Exit status 1 if they do not.")
    demo.add_argument("--model", default="smollm2", help="'smollm2' (embedded), a transformers dir or a .gguf file")
    demo.add_argument("--rank", "--r", "--lora-r", dest="rank", type=int, default=8, help="LoRA rank r (default 8)")
    demo.add_argument("--targets", default="all-linear", help="target_modules (default all-linear)")
    demo.add_argument("--steps", type=int, default=12, help="optimizer steps on the demo example (default 12)")
    demo.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    demo.add_argument("--out", default=None, help="where to save the adapter (default: a temporary directory)")
    demo.add_argument("--quantize", choices=["nf4"], default=None,
                      help="load the base in 4-bit NF4 with double quantization and train LoRA on it (QLoRA)")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser("inspect", help="show an adapter directory's config and tensors",
                             description="Read a PEFT-format adapter (ours or HF PEFT's) without a model.")
    inspect.add_argument("adapter", help="adapter directory (with adapter_config.json), or a `peftkit train` run "
                         "directory")
    inspect.add_argument("--name", default="default", help="adapter name, for PEFT's per-name subfolders")
    inspect.add_argument("--limit", type=int, default=12, help="tensors to list, 0 for all (default 12)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--allow-pickle", action="store_true",
                         help="read adapter_model.bin (pickle) if there is no safetensors file; only for trusted files")
    inspect.set_defaults(func=_cmd_inspect)

    targets = sub.add_parser("targets", help="list the modules a target spec selects in a model",
                             description="Apply PEFT's target rules to a model, count what LoRA would add, and "
                             "say which training fast paths a parity test verifies for its architecture.")
    targets.add_argument("target_modules", nargs="+", help="module names, 'all-linear', or one regex with --regex")
    targets.add_argument("--model", default="smollm2", help="'smollm2', a transformers dir or a .gguf file")
    targets.add_argument("--regex", action="store_true", help="treat the single target as a fullmatch regex")
    targets.add_argument("--exclude", nargs="*", default=[], help="module names to exclude")
    targets.add_argument("--rank", "--r", "--lora-r", dest="rank", type=int, default=8,
                         help="rank used for the parameter count (default 8)")
    targets.add_argument("-v", "--verbose", action="store_true", help="list every selected module")
    targets.set_defaults(func=_cmd_targets)

    from .plan.cli import add_plan_command
    from .plan.sweep_cli import add_sweep_command
    from .serve.cli import add_serve_command
    from .ui.cli import add_ui_command
    from .train.commands import add_commands

    add_commands(sub)
    add_plan_command(sub)
    add_sweep_command(sub)
    add_serve_command(sub)
    add_ui_command(sub)
    for command in sub.choices.values():  # so that main() can answer a mistyped flag with its usage
        command.set_defaults(command_parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a mistyped flag: the subcommand's usage, not the top-level one
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        print(f"peftkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
