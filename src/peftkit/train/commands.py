"""The training-side subcommands of `peftkit`: train, eval, generate, chat, merge."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..precision import CHOICES
from . import options as opts

MODEL_HELP = "'smollm2' (embedded), a transformers directory or a .gguf file (default: the adapter's base)"


def _cmd_train(args: argparse.Namespace) -> int:
    o = opts.from_args(args)
    if o.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from .distributed import launch

        return launch(o.nproc, _without_nproc(args.argv))
    from .distributed import init_distributed
    from .loop import train
    from .process import configure_process
    from .report import format_summary
    from .stop import Stopped, StopRequests

    configure_process(o, init_distributed(o.device))  # threads and allocator: the command's, not train()'s
    try:
        with StopRequests() as stop:  # Ctrl-C / SIGTERM: checkpoint the step under way, then stop (stop.py)
            summary = train(o, stop)
    except Stopped as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(f"peftkit train: {stopped.describe()}", file=sys.stderr, flush=True)
        return stopped.exit_code
    if summary:
        print(format_summary(summary))
        if summary.get("exact_match_after") is not None and o.builtin:
            met = summary["exact_match_after"] >= 0.9
            print(f"  target >= 90% exact match: {'met' if met else 'NOT met'}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def resolve_adapter(path: str) -> Path:
    """An adapter directory, or a run directory holding one in adapter/."""
    p = Path(path)
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if (p / "adapter_config.json").is_file() or p.is_dir() and any(p.glob("*/adapter_config.json")):
        return p
    raise FileNotFoundError(f"no adapter at {p}: expected adapter_config.json there or in {p / 'adapter'}")


def base_model_for(adapter: Path | None, given: str | None) -> str:
    """The base to load: --model if given, else the run's own model, else the adapter config's base."""
    if given:
        return given
    if adapter is None:
        return "smollm2"
    run_options = adapter.parent / "run_options.json"
    if run_options.is_file():
        return json.loads(run_options.read_text()).get("model") or "smollm2"
    from ..models import SMOLLM2_HUB_ID

    config = adapter / "adapter_config.json"
    base = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
    if base in (None, SMOLLM2_HUB_ID) or not Path(base).exists():
        return "smollm2"
    return base


def _load(args: argparse.Namespace):
    from ..precision import resolve_dtype
    from .infer import load_for_inference

    adapters = [resolve_adapter(a) for a in (args.adapter or [])]
    model = base_model_for(adapters[0] if adapters else None, args.model)
    choice = resolve_dtype(getattr(args, "dtype", "float32"), "cpu")  # these commands run on the CPU
    label = " ".join(["peftkit", *([args.command] if getattr(args, "command", None) else [])])
    print(f"{label}: {choice.describe()}", file=sys.stderr, flush=True)  # stdout stays the commands' output
    return load_for_inference(model, [str(a) for a in adapters] or None,
                              quantize="nf4" if getattr(args, "nf4", False) else None, dtype=choice.torch_dtype())


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from . import data as data_mod
    from . import task
    from .scoring import answer_scores, describe_scores, exact_match, validation_loss

    if args.examples < 0:
        raise ValueError(f"--examples must be 0 or more, got {args.examples}")
    chats = data_mod.to_chats(data_mod.read_records(args.data), args.data) if args.data else None  # before loading
    model, tokenizer = _load(args)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    result: dict = {}
    if chats is not None:
        examples, stats = data_mod.tokenize_chats(chats, tokenizer, args.max_length, "truncate", args.data)
        result["data"] = stats.describe()
        with torch.inference_mode():
            result["loss"] = validation_loss(model, examples, pad, device, args.batch_size, 1024)
        if args.examples:
            scored = chats[:args.examples]
            result.update(answer_scores(model, tokenizer, scored, progress=not args.json,
                                        label=f"first {len(scored)}", command="peftkit eval"))
    else:
        tickets = task.eval_set(args.examples)
        result["exact_match"] = exact_match(model, tokenizer, tickets, progress=not args.json,
                                            label="built-in task", command="peftkit eval")
        result["examples"] = len(tickets)
        examples, _ = data_mod.build_examples([{"messages": t.messages()} for t in tickets], tokenizer, 512)
        result["loss"] = validation_loss(model, examples, pad, device, args.batch_size, 1024)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if "data" in result:
            print(f"data: {result['data']}")
        if "exact_match" in result:
            unit = "held-out tickets" if chats is None else "examples (greedy answers to their last assistant turn)"
            print(f"on {result['examples']} {unit}: {describe_scores(result)}")
        print(f"loss (answer tokens): {result['loss']:.4f}")
    return 0


def read_prompts(args: argparse.Namespace, stdin=None) -> list[list[dict] | str]:
    """The prompts to complete: arguments; else --prompts-file (JSON lines: a string, {"prompt"},
    {"instruction", optional "input"} or {"messages"}); else standard input, one per line, or split at
    lines equal to --separator so that prompts may span lines. A chat (list of messages) or a text each."""
    if args.prompt:
        return list(args.prompt)
    if args.prompts_file:
        return _prompts_file(Path(args.prompts_file))
    text = (stdin or sys.stdin).read()
    if args.separator is None:
        return [line for line in text.split("\n") if line.strip()]
    chunks, current = [], []
    for line in text.split("\n"):
        if line.strip() == args.separator:
            chunks.append("\n".join(current))
            current = []
        else:
            current.append(line)
    chunks.append("\n".join(current))
    return [c.strip("\n") for c in chunks if c.strip()]


def _prompts_file(path: Path) -> list[list[dict] | str]:
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); re-save it as UTF-8") from e
    prompts: list[list[dict] | str] = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); each line holds one "
                             "prompt, a JSON string or object") from e
        if not isinstance(value, (str, dict)):
            raise ValueError(f"{path} line {n}: expected a JSON string or object, got a {type(value).__name__}")
        prompts.append(value if isinstance(value, str) else _prompt_of(value, f"{path} line {n}"))
    return prompts


def _prompt_of(record: dict, where: str) -> list[dict] | str:
    """One prompt from a prompts-file line; a chat that ends with an assistant message (a training record)
    is asked for that message again."""
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        for n, m in enumerate(messages, start=1):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: message {n} must be {{\"role\": system|user|assistant, \"content\": "
                                 f"text}}, got {m!r}"[:300])
        return messages[:-1] if messages[-1]["role"] == "assistant" and len(messages) > 1 else messages
    for key in ("prompt", "instruction"):
        if isinstance(record.get(key), str):
            extra = record.get("input") if key == "instruction" else None
            return record[key] + (f"\n\n{extra}" if isinstance(extra, str) and extra else "")
    raise ValueError(f"{where}: expected a JSON string or an object with 'prompt', 'instruction' (optional "
                     f"'input') or 'messages'; got keys {sorted(record)[:10]}")


def _cmd_generate(args: argparse.Namespace) -> int:
    from .infer import chat_prompt, generate

    if args.prompts_file and args.prompt:
        raise ValueError("give prompts as arguments or with --prompts-file, not both")
    prompts = read_prompts(args) if args.prompt or args.prompts_file else None  # files checked before the model
    model, tokenizer = _load(args)
    if prompts is None:
        prompts = read_prompts(args)
    if not prompts:
        raise ValueError("give one or more prompts as arguments, with --prompts-file, or on standard input")
    system = [{"role": "system", "content": args.system}] if args.system else []
    rendered = []
    for p in prompts:
        if args.raw and isinstance(p, list):
            raise ValueError("--raw sends text as it is; a prompts file with 'messages' needs the chat template")
        chat = p if isinstance(p, list) else [{"role": "user", "content": p}]
        rendered.append(p if args.raw else chat_prompt(tokenizer, (system if chat[0]["role"] != "system" else [])
                                                       + chat))
    outputs = generate(model, tokenizer, rendered, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(prompts, outputs):
        print(json.dumps({"prompt": prompt, "output": text}) if args.json else text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .infer import chat_loop

    model, tokenizer = _load(args)  # chat_loop prints the intro
    chat_loop(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..models import resolve_model_dir
    from . import data as data_mod
    from .preview import preview

    if args.count < 0:
        raise ValueError(f"--count must be 0 or more, got {args.count}")
    data_mod.read_records(args.file)  # a missing or malformed file is reported before any model is resolved
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.model))
    colour = args.color == "always" or args.color == "auto" and sys.stdout.isatty()
    counts = preview(args.file, tokenizer, args.count, args.max_length, args.overflow, colour)
    if args.json:
        print(json.dumps(counts))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .infer import merge_to_directory

    adapters = [str(resolve_adapter(a)) for a in args.adapter]
    model = base_model_for(Path(adapters[0]), args.model)
    result = merge_to_directory(model, adapters, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                verify=not args.no_verify)
    print(f"merged {', '.join(adapters)} into {model}: wrote {result['out_dir']}")
    if result.get("max_abs_diff") is not None:
        print(f"  from_pretrained({result['out_dir']}) logits vs the adapter model: max |diff| "
              f"{result['max_abs_diff']:.2e}")
    return 0


def _inference_args(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    p.add_argument("--adapter", action="append", required=adapter_required, metavar="DIR",
                   help="adapter directory or a `peftkit train` run directory (repeat to load several)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--nf4", action="store_true", help="load the base in 4-bit NF4 (as QLoRA trained it)")
    p.add_argument("--dtype", default="auto", choices=CHOICES, help="dtype of the base's weights (default auto: "
                   "bfloat16 on a CPU with AMX or AVX512-BF16, else float32; the choice is printed)")


def add_commands(sub) -> None:
    train = sub.add_parser(
        "train", help="fine-tune an adapter (LoRA or QLoRA); with no --data, on the built-in ticket task",
        description="Fine-tune an adapter. Without --data it trains LoRA on SmolLM2-135M-Instruct for the built-in "
        "task (support tickets to strict JSON records) and prints exact match before and after, training time, "
        "trainable share, adapter size and peak memory. Output: the adapter in PEFT format, metrics.jsonl, "
        "loss_curve.png, summary.json and checkpoints in --output-dir.")
    opts.add_arguments(train)
    train.add_argument("--rank", dest="r", default=None, metavar="R", help="the same as --r and --lora-r (the name "
                       "`plan`, `demo` and `targets` use)")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="loss and answer match on a dataset, or on the built-in task",
                        description="Evaluate a base model with or without adapters. On --data: answer-token loss "
                        "over every record, and for the first --examples records the greedy answer to the last "
                        "assistant turn, scored by exact match and (for JSON answers) JSON match: parsed and "
                        "compared as values, so key order and spacing do not count. Without --data: exact match "
                        "and loss on the built-in task's held-out tickets.")
    _inference_args(ev)
    ev.add_argument("--data", default=None, help="a .jsonl/.json file or saved datasets directory to evaluate on")
    ev.add_argument("--examples", type=int, default=100, help="records (or built-in tickets) to answer by greedy "
                    "generation and score; 0: loss only (default 100)")
    ev.add_argument("--batch-size", type=int, default=8, help="examples per forward pass for the loss (default 8)")
    ev.add_argument("--max-length", type=int, default=512, help="truncate examples to this many tokens")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=_cmd_eval)

    gen = sub.add_parser("generate", help="complete prompts with a base model and adapters",
                         description="Generate replies to prompts (arguments; a --prompts-file of JSON lines; "
                         "or standard input, one per line, or split at --separator lines for prompts of several "
                         "lines), rendered with the tokenizer's chat template unless --raw.")
    _inference_args(gen)
    gen.add_argument("prompt", nargs="*", help="prompts (default: read lines from standard input)")
    gen.add_argument("--prompts-file", default=None, metavar="FILE", help="JSON lines: each a string, "
                     "{\"prompt\": ...}, {\"instruction\": ..., \"input\": ...} or {\"messages\": [...]}")
    gen.add_argument("--separator", default=None, metavar="LINE", help="on standard input, prompts are separated "
                     "by lines equal to LINE (e.g. ---), so one prompt may span lines (default: one per line)")
    gen.add_argument("--system", default=None, help="a system message to put before each prompt")
    gen.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="talk to a base model with adapters in the terminal",
                          description="An interactive chat that keeps the conversation and streams replies.")
    _inference_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="default 256")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.set_defaults(func=_cmd_chat)

    _add_data_command(sub)

    merge = sub.add_parser("merge", help="write base + adapters merged as a plain transformers model directory",
                           description="Merge adapters into the base weights and save a transformers model directory "
                           "with its tokenizer; from_pretrained on it gives the adapter model's logits (checked).")
    merge.add_argument("--adapter", action="append", required=True, metavar="DIR",
                       help="adapter directory or a `peftkit train` run directory (repeat to merge several)")
    merge.add_argument("--model", default=None, help=MODEL_HELP)
    merge.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    merge.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype of the saved weights (default float32)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    merge.add_argument("--no-verify", action="store_true", help="skip reloading the result to compare logits")
    merge.set_defaults(func=_cmd_merge)


def _add_data_command(sub) -> None:
    """`peftkit data preview`."""
    from . import preview as preview_mod

    data = sub.add_parser("data", help="look at a training file as training will see it",
                          description="Tools for training data. `peftkit data preview FILE` prints the first "
                          "records as chats, rendered with the model's chat template, with the labelled (trained) "
                          "part marked, and the counts for the whole file.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    pv = data_sub.add_parser("preview", help="the first examples rendered, with the labelled part marked",
                             description=preview_mod.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    pv.add_argument("file", help="a .jsonl/.json file or saved datasets directory, as for train --data")
    pv.add_argument("--model", default="smollm2", help="whose tokenizer and chat template to use (default smollm2)")
    pv.add_argument("-n", "--count", type=int, default=3, help="records to show (default 3)")
    pv.add_argument("--max-length", type=int, default=512, help="as train's --max-length (default 512)")
    pv.add_argument("--overflow", choices=["truncate", "skip"], default="truncate", help="as train's --overflow")
    pv.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                    help="labelled text in green (auto: on a terminal) instead of between « and »")
    pv.add_argument("--json", action="store_true", help="also print the counts as one JSON line")
    pv.set_defaults(func=_cmd_data_preview, command_parser=pv)
