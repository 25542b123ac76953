"""A memory-lean causal-LM loss: the output head runs only on answer tokens, a chunk at a time.

A plain `model(input_ids, labels=...)` builds the logits of every position of the batch, (B, T, V):
for SmolLM2 (V = 49,152) a batch of 8 x 512 tokens is 800 MB of fp32 logits, and as much again for
their gradient. Here the decoder's hidden states are computed once, the positions that carry a label
are gathered (N, d), and the head + cross-entropy run on `chunk` rows at a time under activation
checkpointing, so at most one chunk's logits exist at any moment, in forward and in backward. The head
also does no work for prompt tokens, which is most of the tokens in instruction data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _head_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None] | None:
    """(decoder, output head, logit softcap) for a transformers causal LM, or None if it has no such split."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    config = getattr(model, "config", None)
    if getattr(config, "logit_scale", None) is not None:  # heads with extra scaling: use the model's own forward
        return None
    return decoder, head, getattr(config, "final_logit_softcapping", None)


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


def sum_token_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                   chunk: int = 1024) -> tuple[Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of those positions).

    The caller divides by the token count of the whole global batch, so that gradient accumulation and
    data-parallel ranks give exactly the gradient of one big batch."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    n_tokens = int(mask.sum())
    if _is_fsdp_root(model) or getattr(model, "peftkit_prefix", None) is not None:
        # FSDP's hooks and a prefix's hooks sit on the root module's forward: going around it to the decoder
        # would meet sharded parameters or miss the prefix. The model's own forward then computes logits
        # only at the positions some row needs.
        keep = mask.any(dim=0).nonzero().flatten()  # (K,)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=keep).logits  # (B, K, V)
        kept = targets[:, keep]
        return F.cross_entropy(logits[kept != IGNORE_INDEX].float(), kept[kept != IGNORE_INDEX],
                               reduction="sum"), n_tokens
    parts = _head_parts(model)
    if parts is None:  # fall back to the model's full logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
        loss = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
        return loss, n_tokens
    decoder, head, softcap = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    picked = hidden[:, :-1][mask]  # (N, d): only positions whose next token is an answer token
    wanted = targets[mask]  # (N,)
    total = picked.new_zeros((), dtype=torch.float32)
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
