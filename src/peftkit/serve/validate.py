"""What an adapter's files must be for the server to batch it, checked before any slot is touched: LoRA only
(not DoRA, not embeddings, not prefix or bottleneck adapters, no modules_to_save or bias training), every key
a wrapped layer with the right shape (a wrong base gets every offending key named), rank <= max_rank, finite
values that stay finite once the scaling is folded in and cast to the slots' dtype. The config's regexes are
untrusted: they match through a bounded matcher (peftkit.patterns), and one that runs out of time is a 422
naming it, while every other request goes on being served."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from ..files import CONFIG_NAME, PREFIX, WEIGHTS_NAME, raise_if_unfit
from ..patterns import PatternError
from ..registry import config_from_peft_dict
from ..targeting import select_targets
from .batched import SlotBank, SlotLoraLayer


class AdapterError(Exception):
    """An adapter that cannot be served: `status` is the HTTP status the app answers with, `message` says
    what is wrong and what to do (it never names a host path outside adapter_dir)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_adapter(name: str, config_bytes: bytes, weight_bytes: bytes, model: nn.Module, bank: SlotBank,
                  max_rank: int) -> tuple[dict[str, tuple[Tensor, Tensor]], int, int]:
    """Validate an adapter's two files (their bytes) against the model's slot layers and return
    ({module path: (A (r, in), scaled B (out, r)) in the slots' dtype}, max rank, bytes in the slots).
    Raises AdapterError(422) naming what is wrong; nothing is written anywhere."""
    try:
        return _parse(name, config_bytes, weight_bytes, model, bank, max_rank)
    except PatternError as err:  # a regex of the config refused or out of time (target, rank or alpha pattern)
        raise AdapterError(422, f"adapter {name!r}: {CONFIG_NAME} cannot be used: {err}") from None


def _parse(name: str, config_bytes: bytes, weight_bytes: bytes, model: nn.Module, bank: SlotBank,
           max_rank: int) -> tuple[dict[str, tuple[Tensor, Tensor]], int, int]:
    try:
        config = config_from_peft_dict(json.loads(config_bytes))
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise AdapterError(422, f"adapter {name!r}: {CONFIG_NAME} cannot be used: {err}") from None
    peft_type = getattr(config, "peft_type", None)
    if peft_type != "LORA":
        raise AdapterError(422, f"adapter {name!r} is a {peft_type} adapter; the server batches LoRA adapters "
                                "only; other methods are not batched per row (a mergeable one can be merged into "
                                "a base model with `peftkit merge` and that model served)")
    refused = [reason for cond, reason in (
        (config.use_dora, "use_dora=true (DoRA rescales whole weights and cannot share a batch)"),
        (bool(config.modules_to_save), f"modules_to_save={list(config.modules_to_save or [])}"),
        (config.bias != "none", f"bias={config.bias!r} (it changes the base layers' biases)"),
    ) if cond]
    if refused:
        raise AdapterError(422, f"adapter {name!r} uses options the server cannot serve per row: "
                                + "; ".join(refused) + ". Merge it into a base model instead")
    try:
        tensors = load_safetensors(weight_bytes)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise AdapterError(422, f"adapter {name!r}: {WEIGHTS_NAME} is corrupt or truncated ({err}); "
                                "save the adapter again") from None
    tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    try:
        targets = select_targets(model, config)
    except PatternError:
        raise
    except ValueError as err:
        raise AdapterError(422, f"adapter {name!r} does not fit this model: {err}") from None
    foreign = [path for path, module in targets if not isinstance(module, SlotLoraLayer)]
    if foreign:
        raise AdapterError(422, f"adapter {name!r} targets modules the server does not batch (embeddings or "
                                f"the output head): {foreign}; serve adapters of linear layers only")
    required = {}
    for path, layer in targets:
        r = config.rank_for(path)
        required[f"{path}.lora_A.weight"] = (r, layer.in_features)
        required[f"{path}.lora_B.weight"] = (layer.out_features, r)
    missing = sorted(k for k in required if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in required)
    wrong = sorted(f"{k}: file {tuple(v.shape)}, model expects {required[k]}"
                   for k, v in tensors.items() if k in required and tuple(v.shape) != required[k])
    try:
        raise_if_unfit(f"adapter {name!r}", missing, unexpected, wrong, [], config.base_model_name_or_path)
    except ValueError as err:
        raise AdapterError(422, str(err)) from None
    ranks = {path: config.rank_for(path) for path, _ in targets}
    too_big = sorted(f"{p} (r={r})" for p, r in ranks.items() if r > max_rank)
    if too_big:
        raise AdapterError(422, f"adapter {name!r} has rank above the server's --max-rank {max_rank} in: "
                                f"{too_big[:5]}; retrain it with a smaller r or restart with a larger --max-rank")
    bad = sorted(k for k, v in tensors.items() if not v.is_floating_point() or not torch.isfinite(v).all())
    if bad:
        raise AdapterError(422, f"adapter {name!r} has non-float, NaN or infinite values in {bad[:5]}; "
                                "save it again")
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    dtype = bank.dtype()
    for path, _ in targets:
        A = tensors[f"{path}.lora_A.weight"].to(dtype)  # (r, in)
        B = (tensors[f"{path}.lora_B.weight"].double() * config.scaling_for(path)).to(dtype)  # (out, r), scaled
        factors[path] = (A, B)
    overflow = sorted(p for p, (A, B) in factors.items() if not (torch.isfinite(A).all() and torch.isfinite(B).all()))
    if overflow:
        raise AdapterError(422, f"adapter {name!r}: lora_alpha / r scaling or the weights overflow the server's "
                                f"{str(dtype).removeprefix('torch.')} in {overflow[:5]}; check lora_alpha and r")
    nbytes = sum(A.numel() + B.numel() for A, B in factors.values()) * bank.element_size()
    return factors, max(ranks.values()), nbytes
