"""An adapter that some other training loop trains (transformers' Trainer, TRL): which one it is, whether
exactly its weights train, and putting a saved copy back into it in place (resuming).

Nothing here imports transformers: a Trainer's hooks (`integrations/transformers.py`) call these.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..adapters import active_adapters
from ..checkpoint import adapter_state_dict, nonfinite, read_adapter
from ..record import configs

# Fields of adapter_config.json that say where a file came from, not what the adapter is.
_PROVENANCE = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping", "task_type"}


def training_adapter(model: nn.Module, adapter: str | None = None) -> str:
    """The adapter a trainer trains: `adapter` when given (it must exist), else the model's one active adapter."""
    names = list(configs(model))
    if not names:
        raise ValueError(f"{type(model).__name__} has no peftkit adapter: inject one first "
                         "(peftkit.inject(model, config)) or load one with peftkit.load_adapter(..., trainable=True)")
    if adapter is not None:
        if adapter not in names:
            raise ValueError(f"the model has no adapter {adapter!r}; its adapters are {names}")
        return adapter
    active = active_adapters(model)
    if len(active) != 1:
        raise ValueError(f"the model has {len(active)} active adapters ({active}); name the one to train and save "
                         f"(adapter=...), one of {names}")
    return active[0]


def check_trains_adapter(model: nn.Module, adapter: str) -> None:
    """Raise unless adapter `adapter`'s weights train and nothing else does: a parameter that trained outside
    the adapter would be missing from every adapter-only checkpoint, and a frozen adapter would not change."""
    ptrs = {t.data_ptr() for t in adapter_state_dict(model, adapter).values()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and p.data_ptr() not in ptrs]
    if outside:
        raise ValueError(f"{len(outside)} parameter(s) outside adapter {adapter!r} would train but are not part of "
                         f"the adapter checkpoints: {', '.join(outside[:8])}{' ...' if len(outside) > 8 else ''}. "
                         f"Freeze them (peftkit.set_trainable(model, {adapter!r})), or add the modules to the "
                         "adapter's modules_to_save")
    if not any(p.requires_grad for p in model.parameters() if p.data_ptr() in ptrs):
        raise ValueError(f"adapter {adapter!r} is frozen, so training would not change it: call "
                         f"peftkit.set_trainable(model, {adapter!r}) (or load it with trainable=True)")


def _config_differences(model: nn.Module, adapter: str, saved: dict) -> list[str]:
    ours = configs(model)[adapter].to_peft_dict()
    keys = sorted((set(ours) | set(saved)) - _PROVENANCE)
    return [f"{k}: model {ours.get(k)!r}, file {saved.get(k)!r}" for k in keys if ours.get(k) != saved.get(k)]


def restore_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = "default") -> None:
    """Copy the adapter saved in `directory` (PEFT format) into the model's existing adapter `adapter`, in place.

    The parameters stay the same objects, so an optimizer that already holds them keeps working (unlike
    deleting and loading the adapter again). The file must hold exactly the adapter's keys and shapes and the
    same config (rank, targets, ...); otherwise nothing changes and the error lists every difference."""
    config, tensors = read_adapter(directory, adapter)
    where = f"adapter checkpoint {str(directory)!r}"
    problems = _config_differences(model, adapter, config.to_peft_dict())
    live = adapter_state_dict(model, adapter)
    problems += [f"missing key {k}" for k in sorted(live.keys() - tensors.keys())]
    problems += [f"unexpected key {k}" for k in sorted(tensors.keys() - live.keys())]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} in the file, {tuple(v.shape)} in the model"
                 for k, v in live.items() if k in tensors and tensors[k].shape != v.shape]
    problems += [f"{k}: NaN or infinite values" for k in nonfinite(config, tensors)]
    if problems:
        raise ValueError(f"{where} does not fit adapter {adapter!r} of this model ({len(problems)} problem(s); "
                         f"nothing was changed): {'; '.join(problems[:12])}{' ...' if len(problems) > 12 else ''}. "
                         "Resume with the model and adapter config the checkpoint was trained with")
    with torch.no_grad():
        for key, value in live.items():
            value.copy_(tensors[key])
    after = adapter_state_dict(model, adapter)
    stale = [k for k, v in after.items() if not torch.equal(v, tensors[k].to(v.dtype))]
    if stale:  # a method whose state_dict holds copies, not views of its parameters
        raise RuntimeError(f"{where}: the adapter's tensors {stale[:5]} could not be restored in place; load the "
                           "checkpoint into a fresh model with peftkit.load_adapter(model, dir, trainable=True)")
