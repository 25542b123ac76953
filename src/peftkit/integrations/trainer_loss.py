"""peftkit's lean answer-only loss as a transformers `Trainer.compute_loss` (TRL's SFTTrainer included).

`Trainer(compute_loss_func=...)` cannot be lean: Trainer calls the model first and hands the function the
outputs, so the (B, T, V) logits already exist. `lean_compute_loss` replaces `compute_loss` itself and calls
`peftkit.train.token_loss`, which runs the output head only on labelled positions, a chunk at a time.
It normalizes as Trainer does: by `num_items_in_batch` (the labelled tokens of the whole accumulated batch,
every process counted) when Trainer passes it, which it does for models that take loss kwargs (then the loss
is already scaled for gradient accumulation), else by the batch's own labelled tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from ..train.loss import token_loss

# Keys a (TRL) collator may add that the loss does not need: use_cache (SFTTrainer sets it to False).
_IGNORED = {"use_cache"}


def _lean_inputs(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels from a batch; a batch the lean loss cannot compute exactly is refused."""
    missing = [k for k in ("input_ids", "attention_mask", "labels") if inputs.get(k) is None]
    if missing:
        raise ValueError(f"peftkit's lean loss needs input_ids, attention_mask and labels; the batch lacks {missing} "
                         f"(it has {sorted(inputs)}). Padding-free or packed batches (padding_free=True, packing=True) "
                         "carry no attention_mask: turn those off, or train without the lean loss")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = sorted(set(inputs) - {"input_ids", "attention_mask", "labels", "position_ids"} - _IGNORED)
    positions = inputs.get("position_ids")
    if positions is not None:
        default = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        if not torch.equal(positions, default):  # packed rows restart positions: not what the decoder computes
            extra.append("position_ids (not 0..T-1 in every row)")
    if extra:
        raise ValueError(f"peftkit's lean loss computes the model on input_ids and attention_mask only; this batch "
                         f"also has {extra}, which it would ignore. Turn off what adds them (packing, padding_free, "
                         "a custom collator), or train without the lean loss")
    if ids.dim() != 2 or mask.shape != ids.shape or inputs["labels"].shape != ids.shape:
        raise ValueError(f"input_ids, attention_mask and labels must be (batch, seq) tensors of one shape; got "
                         f"{tuple(ids.shape)}, {tuple(mask.shape)} and {tuple(inputs['labels'].shape)}")
    return ids, mask, inputs["labels"]


def lean_compute_loss(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                      num_items_in_batch: torch.Tensor | int | None = None):
    """`trainer.compute_loss` with peftkit's answer-only token loss: the same value as Trainer's default loss
    for a causal LM (mean cross-entropy of the next token over labels != -100, normalized by
    `num_items_in_batch` when given), without the batch's full logits.

    `use_peftkit(trainer, lean_loss=True)` installs it; a Trainer subclass can call it from its own
    `compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None)`. With
    return_outputs=True the model's plain outputs (full logits, no gradient) come back too, for metrics."""
    if trainer.accelerator.unwrap_model(model) is not model:
        raise ValueError(f"peftkit's lean loss calls the model's decoder directly, which would go around the "
                         f"{type(model).__name__} wrapper (data-parallel training); train with one process, or "
                         "without the lean loss (use_peftkit(trainer, lean_loss=False))")
    ids, mask, labels = _lean_inputs(inputs)
    with trainer.accelerator.autocast():  # mixed precision (bf16=True), as accelerate's wrapped model.forward has
        total, count = token_loss(model, ids, mask, labels)
    denominator = count if num_items_in_batch is None else num_items_in_batch
    loss = total / torch.as_tensor(denominator, device=total.device, dtype=total.dtype).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        # as Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages the gradients
        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
    if not return_outputs:
        return loss
    with torch.no_grad():
        outputs = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return loss, outputs
