"""What `--method` means to a training run, through the method registry: the adapter put into the model, how
the run describes it, and how the frozen base is loaded. Full fine-tuning (`--method full`) is the one mode
that is no PEFT method: every weight trains and the run saves the whole model.

The recipe names no method; each method's own folder says how its options become a config
(`Method.config_from_options`) and how it reads in one line (`Method.describe_options`).
"""

from __future__ import annotations

from .. import record, registry
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


# --- the method's optional training hooks (Method.training_loss_extra, ...; a no-op for methods without them) ---
def _hook(o: TrainOptions, hook: str):
    return None if o.method == FULL else getattr(registry.by_train_name(o.method), hook, None)


def loss_extra(model, o: TrainOptions):
    """The method's extra loss term for this step (a Tensor), or None."""
    hook = _hook(o, "training_loss_extra")
    return None if hook is None else hook(model, record.active_adapters(model))


def after_optimizer_step(model, o: TrainOptions, step: int, total_steps: int) -> None:
    """Let the method act after the optimizer's step (gradients still present)."""
    hook = _hook(o, "after_optimizer_step")
    if hook is not None:
        hook(model, record.active_adapters(model), step, total_steps)


def method_state(model, o: TrainOptions) -> dict:
    """The method's own training state for a checkpoint ({} for most methods)."""
    hook = _hook(o, "trainer_state")
    return {} if hook is None else hook(model, record.active_adapters(model))


def restore_method_state(model, o: TrainOptions, saved: dict) -> None:
    hook = _hook(o, "load_trainer_state")
    if hook is not None:
        hook(model, record.active_adapters(model), saved)
