"""AdaLoRA's training-time parts: the orthogonality regularizer and the rank allocator (HF PEFT's
RankAllocator and AdaLoraModel.update_and_allocate, the same arithmetic in the same order).

Per optimizer step, after `optimizer.step()` and before the gradients are cleared:

    ipt = |w * grad|                                   every entry of A, E and B
    S   = beta1 * S + (1 - beta1) * ipt                smoothed sensitivity
    U   = beta2 * U + (1 - beta2) * |ipt - S|          uncertainty
    score(triplet i) = (S U)[E_i] + mean_j (S U)[A_ij] + mean_j (S U)[B_ji]

and on the budget schedule (cubic from the sum of the initial ranks down to target_r per layer, between step
tinit and total_step - tfinal, every deltaT steps) the E entries of every triplet scoring at or below the
budget's threshold are zeroed; the kept triplets are the adapter's rank_pattern. At total_step - tfinal the
final pattern is fixed (the scores are dropped) and re-applied after every later step.

The running scores live in the layers (`AdaLoraLayer.scores`) and the pattern in the model's record, so a
checkpoint of `scores_state` plus the trained parameters resumes the schedule exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import AdaLoraConfig
from .layer import AdaLoraLayer, adalora_layers

FACTORS = ("A", "E", "B")


def layers_of(model: nn.Module, name: str) -> list[tuple[str, AdaLoraLayer]]:
    return [(path, layer) for path, layer in adalora_layers(model) if name in layer.lora_A]


def _factor(layer: AdaLoraLayer, name: str, factor: str) -> nn.Parameter:
    return getattr(layer, f"lora_{factor}")[name]


# --- the regularizer ------------------------------------------------------------------------------------------
def orth_regularizer(model: nn.Module, name: str) -> Tensor | None:
    """Mean over every A and B of adapter `name` of ||A A^T - I||_F and ||B^T B - I||_F (None without layers)."""
    terms = []
    for _, layer in layers_of(model, name):
        for cov in (layer.lora_A[name] @ layer.lora_A[name].T, layer.lora_B[name].T @ layer.lora_B[name]):  # (r, r)
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            terms.append(torch.norm(cov - eye, p="fro"))
    return torch.stack(terms).sum() / len(terms) if terms else None


# --- scores and the schedule ----------------------------------------------------------------------------------
@torch.no_grad()
def update_scores(model: nn.Module, name: str, beta1: float, beta2: float) -> None:
    """One step of the sensitivity and uncertainty averages of every entry, from the gradients now present."""
    for _, layer in layers_of(model, name):
        state = layer.scores.setdefault(name, {})
        for factor in FACTORS:
            p = _factor(layer, name, factor)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            ipt = (p * grad).abs().detach()
            ema_ipt, ema_unc = state.get(factor, (torch.zeros_like(p), torch.zeros_like(p)))
            ema_ipt = beta1 * ema_ipt + (1 - beta1) * ipt
            ema_unc = beta2 * ema_unc + (1 - beta2) * (ipt - ema_ipt).abs()
            state[factor] = (ema_ipt, ema_unc)


def budgets(model: nn.Module, name: str, config: AdaLoraConfig) -> tuple[int, int]:
    """(the initial budget: the sum of the layers' ranks, the final one: target_r per layer)."""
    layers = layers_of(model, name)
    return sum(layer.lora_A[name].shape[0] for _, layer in layers), config.target_r * len(layers)


def budget_schedule(config: AdaLoraConfig, init_bgt: int, target_bgt: int, step: int) -> tuple[int, bool]:
    """(the budget at `step`, whether this step masks): flat until tinit, cubic down to the target until
    total_step - tfinal, every deltaT steps; the target after."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    left = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (left ** 3) + target_bgt), step % config.deltaT == 0


@torch.no_grad()
def mask_to_budget(model: nn.Module, name: str, init_bgt: int, budget: int) -> dict[str, list[bool]] | None:
    """Zero the E entries of the (init_bgt - budget) least important triplets (ties at the threshold too);
    the kept triplets per layer, keyed as PEFT's rank_pattern. None when the budget drops nothing."""
    if init_bgt - budget <= 0:
        return None
    scores = {}
    for path, layer in layers_of(model, name):
        state = layer.scores.get(name, {})
        if len(state) < len(FACTORS):
            return None  # no scores yet (nothing trained): nothing to rank by
        s_a, s_e, s_b = (state[f][0] * state[f][1] for f in FACTORS)
        vectors = torch.cat([s_a.mean(dim=1, keepdim=True), s_b.mean(dim=0).view(-1, 1)], dim=1)  # (r, 2)
        scores[path] = s_e.view(-1) + vectors.sum(dim=1)  # (r,)
    threshold = torch.kthvalue(torch.cat(list(scores.values())), k=init_bgt - budget)[0].item()
    pattern = {}
    for path, layer in layers_of(model, name):
        drop = scores[path] <= threshold  # (r,)
        layer.lora_E[name].masked_fill_(drop.view(-1, 1), 0.0)
        pattern[f"{path}.lora_E"] = (~drop).tolist()
    return pattern


@torch.no_grad()
def apply_pattern(model: nn.Module, name: str, pattern: dict[str, list[bool]] | None) -> None:
    """Zero the E entries that `pattern` drops (a layer it does not name keeps every triplet)."""
    for path, layer in layers_of(model, name):
        kept = (pattern or {}).get(f"{path}.lora_E")
        if kept is not None:
            E = layer.lora_E[name]
            E.masked_fill_(~torch.tensor(kept, dtype=torch.bool, device=E.device).view(-1, 1), 0.0)


def update_and_allocate(model: nn.Module, name: str, config: AdaLoraConfig, step: int) -> AdaLoraConfig:
    """One step of the allocator after the optimizer's step `step` (0-based, PEFT's global_step); returns the
    config with the rank_pattern it now holds. `config.total_step` must be set."""
    _check_full_rank(model, name, config)
    end = config.total_step - config.tfinal
    if step < end:
        update_scores(model, name, config.beta1, config.beta2)
        init_bgt, target_bgt = budgets(model, name, config)
        budget, due = budget_schedule(config, init_bgt, target_bgt, step)
        pattern = mask_to_budget(model, name, init_bgt, budget) if due else None
        return config.replace(rank_pattern=pattern) if pattern else config
    if step == end:
        init_bgt, target_bgt = budgets(model, name, config)
        pattern = mask_to_budget(model, name, init_bgt, target_bgt)
        for _, layer in layers_of(model, name):
            layer.scores.pop(name, None)
        return config.replace(rank_pattern=pattern)
    apply_pattern(model, name, config.rank_pattern)
    return config


def _check_full_rank(model: nn.Module, name: str, config: AdaLoraConfig) -> None:
    short = [path for path, layer in layers_of(model, name) if layer.lora_A[name].shape[0] != config.init_r]
    if short:
        raise ValueError(f"adapter {name!r} was loaded with pruned ranks (its rank_pattern) in {short[:4]}; the rank "
                         f"allocator needs every layer at init_r={config.init_r}: train a fresh AdaLoRA adapter, or "
                         "continue training this one as it is without the allocator")


# --- the allocator's state, for checkpoints --------------------------------------------------------------------
def scores_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The running averages of adapter `name` as flat tensors: '<path>.<factor>.ipt' and '.unc'."""
    out = {}
    for path, layer in layers_of(model, name):
        for factor, (ipt, unc) in layer.scores.get(name, {}).items():
            out[f"{path}.{factor}.ipt"], out[f"{path}.{factor}.unc"] = ipt.detach().cpu(), unc.detach().cpu()
    return out


def load_scores_state(model: nn.Module, name: str, state: dict[str, Tensor]) -> None:
    """Put `scores_state`'s tensors back (the layers' scores of adapter `name` become exactly those)."""
    for path, layer in layers_of(model, name):
        device = layer.lora_A[name].device
        found = {f: (state[f"{path}.{f}.ipt"].to(device), state[f"{path}.{f}.unc"].to(device))
                 for f in FACTORS if f"{path}.{f}.ipt" in state}
        if found:
            layer.scores[name] = found
        else:
            layer.scores.pop(name, None)
