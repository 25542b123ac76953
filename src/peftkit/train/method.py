"""What `--method` means to a training run, through the method registry: the adapter put into the model, how
the run describes it, and how the frozen base is loaded. Full fine-tuning (`--method full`) is the one mode
that is no PEFT method: every weight trains and the run saves the whole model.

The recipe names no method; each method's own folder says how its options become a config
(`Method.config_from_options`) and how it reads in one line (`Method.describe_options`).
"""

from __future__ import annotations

from .. import registry
from ..inject import inject
from .options import TrainOptions

FULL = "full"


def inject_method(model, o: TrainOptions) -> None:
    """Put the adapter that --method names into the model (trainable, everything else frozen)."""
    if o.method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        return
    method = registry.by_train_name(o.method)
    inject(model, method.config_from_options(o))


def describe_method(o: TrainOptions) -> str:
    """The method in a few words, for the start-up line and the loss plot's title."""
    if o.method == FULL:
        return "full fine-tuning"
    return registry.by_train_name(o.method).describe_options(o)


def base_quantization(o: TrainOptions) -> str | None:
    """How the frozen base is loaded: "nf4" for QLoRA, else None (the --dtype weights as they are)."""
    return "nf4" if o.method in registry.nf4_train_names() else None


def trains_whole_model(o: TrainOptions) -> bool:
    """True for --method full: no adapter; the run saves the whole model (a transformers directory)."""
    return o.method == FULL
