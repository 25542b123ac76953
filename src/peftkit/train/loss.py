"""A memory-lean causal-LM loss: the output head runs only on answer tokens, a chunk at a time.

A plain `model(input_ids, labels=...)` builds the logits of every position of the batch, (B, T, V):
for SmolLM2 (V = 49,152) a batch of 8 x 512 tokens is 800 MB of fp32 logits, and as much again for
their gradient. Here the decoder's hidden states are computed once, the positions that carry a label
are gathered (N, d), and the head + cross-entropy run on `chunk` rows at a time, each chunk's gradient
worked out during the forward pass (`_FusedHeadLoss`), so at most one chunk's logits exist at any moment
and none is computed twice. The head also does no work for prompt tokens, which is most of the tokens in
instruction data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import hf
from ..registry import methods

IGNORE_INDEX = -100


def _is_fsdp_root(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _chunk_loss(head: nn.Module, softcap: float | None, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden).float()  # (n, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


class _FusedHeadLoss(torch.autograd.Function):
    """Sum of cross-entropy of `head(hidden)` against `targets`, with the gradients worked out chunk by chunk
    during the forward pass (softmax minus one-hot, times the head's weight) and kept: backward only scales
    them. No chunk is ever recomputed, and at most one chunk's logits exist at a time. For a plain
    nn.Linear head; its weight's (and bias's) gradient is built only when they train (full fine-tuning)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, head: nn.Module,
                softcap: float | None, chunk: int) -> Tensor:
        grad_hidden = torch.empty_like(hidden)  # (N, d)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            logits = head(h).float()  # (n, V)
            tanh = None
            if softcap:
                tanh = torch.tanh(logits / softcap)
                logits = tanh * softcap
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, written over the logits
            grad[torch.arange(len(y), device=y.device), y] -= 1.0
            if tanh is not None:  # d/dz of tanh(z / c) * c = 1 - tanh(z / c)^2
                grad.mul_(1.0 - tanh.square_())
            g = grad.to(weight.dtype)  # (n, V)
            torch.mm(g, weight, out=grad_hidden[start:start + chunk])  # (n, d)
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h.float())
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden)
        ctx.param_grads = (grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        (grad_hidden,) = ctx.saved_tensors
        (grad_weight, grad_bias), (weight_dtype, bias_dtype) = ctx.param_grads, ctx.dtypes
        return (grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype), None, None, None, None)


@contextmanager
def _training_kernels(model: nn.Module, attention_mask: Tensor | None, mask: Tensor) -> Iterator[None]:
    """The decoder's forward with each registered method's fused training nodes (LoRA's: linears that skip the padding positions
    (exact: their gradients are zero; kept are the real positions and those whose next token carries a label,
    as a left-padded row's last padding position can) and fused LoRA SwiGLU MLPs. Neither under gradient
    checkpointing, whose recomputation in backward runs outside this block and must see the same graph."""
    if (not torch.is_grad_enabled() or hf.uses_gradient_checkpointing(model)
            or "fused_linear" not in hf.verified_features(model)):  # an allowlist (tests/test_arch_parity.py)
        yield
        return
    keep = None
    if attention_mask is not None:
        keep = attention_mask != 0  # (B, T)
        keep[:, :-1] |= mask
    with ExitStack() as stack:
        for method in methods():
            stack.enter_context(method.training_kernels(model, keep))
        yield


def _positions_in_front(model: nn.Module) -> int | None:
    """Positions that a registered method's hooks on the model's own forward put before the input (virtual
    tokens; the optional `Method.positions_in_front(model)`), or None when no method does: the loss then must
    go through that forward, and the labels move by that many positions."""
    found = [n for m in methods() if (n := getattr(m, "positions_in_front", _none)(model)) is not None]
    return sum(found) if found else None


def _none(model: nn.Module) -> None:
    return None


def sum_token_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                   chunk: int = 1024) -> tuple[Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions).

    The caller divides by the token count of the whole global batch, so that gradient accumulation and
    data-parallel ranks give exactly the gradient of one big batch."""
    if hf.is_encoder_decoder(model):
        raise ValueError(
            f"peftkit's training loss is for causal (decoder-only) language models; {hf.model_type(model)!r} is "
            "an encoder-decoder model. Adapters inject, merge, save and load on it (HF PEFT's files), but train it "
            "in a loop of your own with model(input_ids=..., labels=...).loss, or with transformers' Seq2SeqTrainer")
    front = _positions_in_front(model)
    if front:  # the model's logits cover positions put before the input; they carry no label
        labels = torch.cat([labels.new_full((labels.shape[0], front), IGNORE_INDEX), labels], dim=1)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    n_tokens = int(mask.sum())
    if _is_fsdp_root(model) or getattr(model, "peftkit_prefix", None) is not None or front is not None:
        # FSDP's hooks and a prefix's (or virtual tokens') hooks sit on the root module's forward: going around
        # it to the decoder would meet sharded parameters or miss the adapter. The model's own forward then
        # computes logits only at the positions some row needs.
        keep = mask.any(dim=0).nonzero().flatten()  # (K,)
        logits = hf.logits_at(model, keep, input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False)  # (B, K, V)
        kept = targets[:, keep]
        return F.cross_entropy(logits[kept != IGNORE_INDEX].float(), kept[kept != IGNORE_INDEX],
                               reduction="sum"), n_tokens
    parts = hf.decoder_and_head(model)
    if parts is None:  # fall back to the model's full logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
        loss = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
        return loss, n_tokens
    decoder, head, softcap = parts
    with _training_kernels(model, attention_mask, mask):
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    picked = hidden[:, :-1][mask]  # (N, d): only positions whose next token is an answer token
    wanted = targets[mask]  # (N,)
    total = picked.new_zeros((), dtype=torch.float32)
    if torch.is_grad_enabled() and picked.requires_grad and type(head) is nn.Linear:
        return _FusedHeadLoss.apply(picked, head.weight, head.bias, wanted, head, softcap, chunk), n_tokens
    for start in range(0, picked.shape[0], chunk):
        h, y = picked[start:start + chunk], wanted[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, head, softcap, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, softcap, h, y)
    return total, n_tokens


def reference_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
    """transformers' own mean loss over labelled tokens, for tests and benchmarks."""
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss


def token_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
               chunk: int = 1024) -> tuple[Tensor, int]:
    """The loss `peftkit train` uses, for your own training loop: (sum of next-token cross-entropy over the
    positions whose label is not -100, their count). Labels are aligned with input_ids, as for
    `model(input_ids, labels=labels)`; `loss / count` equals that call's loss (within float rounding, tested
    per architecture in tests/test_arch_parity.py), but on a verified architecture the (B, T, V) logits are
    never built: only labelled positions go through the output head, `chunk` at a time, and LoRA's fused
    nodes skip the padding. Divide by the token count of the whole batch when accumulating gradients over
    micro-batches, so that they add up to the gradient of one batch.

        loss, n = token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        (loss / n).backward()
    """
    return sum_token_loss(model, input_ids, attention_mask, labels, chunk)

