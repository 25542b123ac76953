"""Every `peftkit train` option in one frozen dataclass: defaults, help text, YAML files, overrides.

Precedence, lowest first: the defaults below, the built-in task's preset (only when no --data is
given), a YAML file (--config), then the command line. The command line's flags and `--help` are
generated from the fields, so adding an option touches this file only.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import precision, registry, tracking

METHODS = (*registry.train_names(), "full")  # the registered methods, and full fine-tuning
AVAILABLE_METHODS = METHODS
SCHEDULES = ("cosine", "linear", "constant")


def _opt(default: Any, help: str, choices: tuple | None = None, metavar: str | None = None,
         same_run: bool = False) -> Any:
    """A TrainOptions field. `same_run=True` says the option changes what training computes (the model, the
    data or their order, the adapter, the optimisation), so a resumed run must keep the value it started with."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar,
                                            "same_run": same_run})


@dataclass(frozen=True)
class TrainOptions:
    # what to train
    model: str = _opt("smollm2", "'smollm2' (the embedded SmolLM2-135M-Instruct), a transformers directory or a "
                      ".gguf file", same_run=True)
    data: str | None = _opt(None, "training data: a .jsonl/.json file (chat 'messages' or instruction/input/output "
                            "records) or a saved `datasets` directory; omit it for the built-in ticket task",
                            same_run=True)
    val_data: str | None = _opt(None, "validation data in the same formats (default: split --val-fraction off "
                                "--data)", same_run=True)
    val_fraction: float = _opt(0.05, "share of --data held out for validation loss when --val-data is not given",
                               same_run=True)
    method: str = _opt("lora", f"adapter method: {registry.train_help()}; full = every weight trains (no adapter; "
                       "the whole model is saved in <output-dir>/model)", METHODS, same_run=True)
    # the adapter
    r: int = _opt(16, "LoRA rank", same_run=True)
    lora_alpha: float = _opt(32.0, "LoRA alpha (the update is scaled by alpha / r)", same_run=True)
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input path", same_run=True)
    target_modules: str = _opt("all-linear", "modules to adapt: 'all-linear', a comma-separated list of names "
                               "(q_proj,v_proj), or a regex that fullmatches module paths", same_run=True)
    use_rslora: bool = _opt(False, "rsLoRA scaling alpha / sqrt(r)", same_run=True)
    variant: str = _opt("houlsby", "bottleneck only: houlsby (after attention and feed-forward blocks) or "
                        "pfeiffer (after the feed-forward block)", ("houlsby", "pfeiffer"), same_run=True)
    reduction_factor: int = _opt(16, "bottleneck only: hidden size / bottleneck size", same_run=True)
    non_linearity: str = _opt("relu", "bottleneck only: activation inside the bottleneck", ("relu", "gelu", "silu"),
                              same_run=True)
    num_virtual_tokens: int = _opt(20, "prefix only: trainable key/value positions per attention layer",
                                   same_run=True)
    prefix_projection: int | None = _opt(None, "prefix only: train the prefix through an MLP of this width "
                                         "(folded away when saving)", same_run=True)
    # optimisation
    lr: float = _opt(2e-4, "peak learning rate (AdamW); when not given, a method that trains well only at a higher "
                     "rate (LoHa, LoKr, IA3, VeRA, AdaLoRA, prompt tuning) takes a multiple of the default, said in "
                     "the run's header", same_run=True)
    weight_decay: float = _opt(0.0, "AdamW weight decay", same_run=True)
    warmup_steps: int = _opt(10, "linear warm-up steps from 0 to --lr; when not given and more than 10%% of a short "
                             "run's steps, shortened to 10%% of them (and said)", same_run=True)
    schedule: str = _opt("cosine", "learning-rate schedule after warm-up", SCHEDULES, same_run=True)
    batch_size: int = _opt(8, "examples per optimizer step, over all processes (the global batch)",
                           same_run=True)
    grad_accum: int = _opt(1, "split each process's share of a batch into this many micro-batches",
                           same_run=True)
    max_steps: int | None = _opt(None, "optimizer steps to run (default: --epochs worth)", same_run=True)
    epochs: float = _opt(1.0, "passes over the training data when --max-steps is not given", same_run=True)
    max_grad_norm: float = _opt(1.0, "clip the adapter gradients' global norm to this (0 = no clipping)",
                                same_run=True)
    max_length: int = _opt(512, "longest example in tokens", same_run=True)
    overflow: str = _opt("truncate", "what to do with longer examples (both are counted and reported)",
                         ("truncate", "skip"), same_run=True)
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward: less memory, ~30%% more time")
    loss_chunk: int = _opt(1024, "answer tokens per chunk of the output-head loss (never the whole batch's logits)")
    seed: int = _opt(0, "seed for the adapter's initialisation, data order and dropout", same_run=True)
    dtype: str = _opt("auto", "compute dtype of the frozen base (adapters train in float32); auto: bfloat16 where "
                      "the device runs it fast (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), else float32 "
                      "(the choice and why: in the header and summary.json)", precision.CHOICES, same_run=True)
    device: str | None = _opt(None, "cpu, cuda or cuda:N (default: cuda if available)")
    threads: int | None = _opt(None, "torch CPU threads (default: the cores free to this process when it "
                                "starts, said in the run's header)")
    # built-in task
    train_examples: int | None = _opt(None, "built-in task only: training tickets to generate "
                                      "(default: batch size x steps)", same_run=True)
    eval_examples: int = _opt(100, "held-out examples scored by greedy generation before and after training: the "
                              "built-in task's tickets (at most 1000), or up to this many of --data's validation "
                              "examples (exact match, and JSON match for JSON answers; 0: none)", same_run=True)
    score_base: bool = _opt(True, "also score the base model before training (the 'before' figures; sweeps skip "
                            "it, it is the same for every trial)")
    # evaluation, checkpoints, output
    eval_every: int = _opt(0, "validation loss every N steps (0: only at the end)")
    save_every: int = _opt(100, "checkpoint every N steps (0: no intermediate checkpoints)")
    keep_checkpoints: int = _opt(2, "keep the newest K checkpoints")
    output_dir: str | None = _opt(None, "run directory (default: runs/<task>-<method>-<time>)")
    resume: str | None = _opt(None, "continue a run: 'latest' (newest checkpoint in --output-dir) or a checkpoint path")
    overwrite: bool = _opt(False, "replace a previous run in --output-dir instead of refusing")
    fsdp: bool = _opt(False, "with more than one process: shard the frozen base with FSDP (fully_shard)")
    nproc: int = _opt(1, "processes for data-parallel training (a shortcut for torchrun --nproc_per_node N)")
    progress: bool = _opt(True, "show a progress bar")
    # experiment tracking (docs/tracking.md)
    report_to: tuple[str, ...] = _opt((), "also log the run to these tools, comma-separated: tensorboard, mlflow, "
                                      "wandb (default: none; they need pip install 'peftkit[track]')",
                                      metavar="NAMES")
    experiment: str = _opt("peftkit", "--report-to: the MLflow experiment and the W&B project", metavar="NAME")
    tracking_dir: str | None = _opt(None, "--report-to: a folder for the MLflow store (mlflow.db, mlartifacts/) and "
                                    "the TensorBoard logs of many runs (default: the MLflow store in the run "
                                    "directory's parent, TensorBoard in <output-dir>/tensorboard)", metavar="DIR")
    # not an option: True when --warmup-steps was chosen (flag, YAML file, `build` or `replace`), so a short run
    # keeps it (and is warned) instead of having the default shortened; set by `build` and `replace`
    warmup_given: bool = field(default=False, metadata={"internal": True})
    # not an option: False when `build` chose `lr` as the default times the method's scale (registry.lr_scale),
    # which `replace(method=...)` then moves to the new method's scale; True for an lr given in any way (a flag,
    # YAML, `replace(lr=...)`, the constructor, options stored before this field existed)
    lr_given: bool = field(default=True, metadata={"internal": True})

    def __post_init__(self) -> None:
        # one form however the names came: a list (YAML, JSON) or "a,b" (Python); unknown names are refused
        object.__setattr__(self, "report_to", tracking.parse_report_to(self.report_to))

    @property
    def builtin(self) -> bool:
        return self.data is None

    def replace(self, **changes: Any) -> TrainOptions:
        if "warmup_steps" in changes:
            changes.setdefault("warmup_given", True)
        if "lr" in changes:
            changes.setdefault("lr_given", True)
        elif "method" in changes and not self.lr_given and not changes.get("lr_given"):
            changes["lr"] = self.lr / registry.lr_scale(self.method) * registry.lr_scale(changes["method"])
        return dataclasses.replace(self, **changes)

    def lr_note(self) -> str | None:
        """A line for the header when --lr is the method's own default rather than LoRA's, else None."""
        scale = registry.lr_scale(self.method)
        if self.lr_given or scale == 1.0:
            return None
        return (f"lr {self.lr:.3g}: {self.method}'s default, {scale:g}x LoRA's {self.lr / scale:.3g} "
                f"(--lr to choose)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The built-in ticket task's preset: a short, high-rate run that reaches >= 90% exact match on 2 CPU cores
# (measured: 98% after 40 steps of 8 tickets; see the README).
BUILTIN_PRESET = {"lr": 2e-3, "warmup_steps": 4, "max_steps": 36, "batch_size": 8, "max_length": 256,
                  "save_every": 18}

FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions) if not f.metadata.get("internal")}
WARMUP_SHARE = 0.1  # the longest default warm-up, as a share of the run's steps


def effective_warmup(o: TrainOptions, total_steps: int) -> tuple[int, str | None]:
    """(the warm-up steps a run of `total_steps` uses, a line to print about it or None). A warm-up that was
    not chosen is shortened to 10% of a short run (at least 1 step): with the default 10 steps, a run of 8 never
    reached --lr. A chosen one is kept, with a warning when the run ends inside it."""
    cap = max(1, round(WARMUP_SHARE * total_steps))
    if o.warmup_steps <= cap:
        return o.warmup_steps, None
    if not o.warmup_given:
        return cap, (f"warm-up shortened from {o.warmup_steps} to {cap} steps (10% of this run's {total_steps}); "
                     f"pass --warmup-steps to choose it")
    if o.warmup_steps >= total_steps:
        peak = o.lr * total_steps / (o.warmup_steps + 1)
        return o.warmup_steps, (f"WARNING: the run ends inside its warm-up (--warmup-steps {o.warmup_steps}, "
                                f"{total_steps} steps), so the learning rate never reaches --lr {o.lr:.3g} "
                                f"(it peaks at {peak:.3g}); lower --warmup-steps or train for more steps")
    return o.warmup_steps, None
# the options a resumed run must keep (declared on the fields above with same_run=True)
SAME_RUN = tuple(name for name, f in FIELDS.items() if f.metadata["same_run"])


def _coerce(name: str, value: Any) -> Any:
    """A YAML or command-line value as the field's type, with an error naming the option."""
    f = FIELDS[name]
    kind = str(f.type)
    try:
        if kind.startswith("tuple"):
            return tracking.parse_report_to(value)
        if value is None:
            if "None" not in kind:
                raise ValueError("it cannot be empty")
            return None
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError("expected true or false")
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected a whole number")
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"option {name}: {value!r} is not valid ({e})") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The options in a YAML file (keys may use - or _), checked against the known option names."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, not {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"{path}: unknown option {key!r}; known options: {', '.join(sorted(FIELDS))}")
        out[name] = _coerce(name, value)
    return out


def build(overrides: dict[str, Any] | None = None, config_file: str | None = None) -> TrainOptions:
    """Options from defaults < built-in preset < YAML file < explicit overrides, validated."""
    overrides = {k: _coerce(k, v) for k, v in (overrides or {}).items()}
    from_file = load_yaml(config_file) if config_file else {}
    merged: dict[str, Any] = {}
    if overrides.get("data", from_file.get("data")) is None:
        merged.update(BUILTIN_PRESET)
    merged.update(from_file)
    merged.update(overrides)
    merged["warmup_given"] = "warmup_steps" in from_file or "warmup_steps" in overrides
    merged["lr_given"] = "lr" in from_file or "lr" in overrides
    if not merged["lr_given"]:
        merged["lr"] = merged.get("lr", FIELDS["lr"].default) * registry.lr_scale(merged.get("method", "lora"))
    options = TrainOptions(**merged)
    validate(options)
    return options


def validate(o: TrainOptions) -> None:
    problems = []
    if o.method not in AVAILABLE_METHODS:
        problems.append(f"method {o.method!r} is unknown (available: {', '.join(AVAILABLE_METHODS)})")
    if o.method == "full" and o.fsdp:
        problems.append("--method full with --fsdp is not supported yet (the saved model would need its shards "
                        "gathered); use --nproc N without --fsdp, or an adapter method with --fsdp")
    if o.method == "prefix" and o.gradient_checkpointing:
        problems.append("prefix tuning cannot use --gradient-checkpointing (transformers drops the prefix's cache "
                        "under it); leave it off")
    for name in ("r", "reduction_factor", "num_virtual_tokens", "batch_size", "grad_accum", "max_length", "nproc",
                 "loss_chunk"):
        if getattr(o, name) < 1:
            problems.append(f"{name} must be at least 1 (got {getattr(o, name)})")
    if o.max_steps is not None and o.max_steps < 1:
        problems.append(f"max_steps must be at least 1 (got {o.max_steps})")
    if o.epochs <= 0:
        problems.append(f"epochs must be positive (got {o.epochs})")
    if not 0 <= o.val_fraction < 1:
        problems.append(f"val_fraction must be in [0, 1) (got {o.val_fraction})")
    if o.lr <= 0:
        problems.append(f"lr must be positive (got {o.lr})")
    if not 0 <= o.lora_dropout < 1:
        problems.append(f"lora_dropout must be in [0, 1) (got {o.lora_dropout})")
    if not 0 <= o.eval_examples <= 1000:
        problems.append(f"eval_examples must be in [0, 1000] (got {o.eval_examples})")
    for name in ("schedule", "overflow", "dtype", "variant", "non_linearity"):
        choices = FIELDS[name].metadata["choices"]
        if getattr(o, name) not in choices:
            problems.append(f"{name} must be one of {', '.join(choices)} (got {getattr(o, name)!r})")
    bad = [c for c in "/\\#?%:" if c in o.experiment]
    if not o.experiment.strip() or len(o.experiment) > 128 or bad:
        problems.append(f"experiment {o.experiment!r} must be 1 to 128 characters without / \\ # ? % : "
                        f"(W&B project names cannot hold them)")
    if problems:
        raise ValueError("invalid training options:\n  " + "\n  ".join(problems))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (--snake-case), defaulting to None so that only explicit flags override."""
    parser.add_argument("--config", metavar="FILE.yaml", help="a YAML file of options (keys as below, - or _); "
                        "flags given on the command line override it")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = f.default
        preset = BUILTIN_PRESET.get(name)
        if "(default" in f.metadata["help"]:  # the help states its default itself
            shown = f" ({preset} for the built-in task)" if preset is not None else ""
        else:
            shown = f" (default {default}" + (f"; {preset} for the built-in task)" if preset is not None else ")")
        help_text = f.metadata["help"] + shown
        if str(f.type).startswith("bool"):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            flags = [flag, "--lora-r"] if name == "r" else [flag]  # torchrun's parser mistakes a bare --r
            metavar = f.metadata["metavar"] or (None if f.metadata["choices"] else name.upper())
            parser.add_argument(*flags, dest=name, default=None, choices=f.metadata["choices"], metavar=metavar,
                                help=help_text)


def from_args(args: argparse.Namespace) -> TrainOptions:
    explicit = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    return build(explicit, getattr(args, "config", None))
