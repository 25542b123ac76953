"""Prefix tuning: trainable key/value vectors prepended in every attention layer (HF PEFT's PREFIX_TUNING).

The user's model stays the user's model: `inject_prefix` registers `model.peftkit_prefix` (the prefixes'
weights) and two forward hooks. Before forward, an empty or absent KV cache is filled per layer with the
active prefix, a 2D attention mask gets P ones in front and given position_ids shift by P (the real tokens
then sit at P, P+1, ...), exactly as PEFT's PeftModelForCausalLM does, so generate() runs through its own
cache. After forward, every layer's cache must have grown by the input length, else the model ignored the
prefix and that is an error. Layout (PEFT's): `prompt_embeddings` [P, num_layers * 2 * token_dim], a row
viewed as (num_layers * 2, kv_heads, head_dim), layer i's key at 2i and value at 2i + 1 (with GQA token_dim
= num_key_value_heads * head_dim). The optional projection MLP trains, and is folded away on save.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PEFT_TYPE = "PREFIX_TUNING"
KEY = "prompt_embeddings"
# Architectures whose cache PEFT builds specially (hybrid/sliding caches, shared-KV layers, fused KV) or that
# have no per-layer attention cache at all: a plain DynamicCache prefix would be wrong or ignored there.
UNSUPPORTED_TYPES = {"gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text", "bloom", "gpt_bigcode",
                     "mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "jamba", "zamba", "zamba2",
                     "qwen3_next", "lfm2", "cohere2", "t5", "bart"}


@dataclass(frozen=True)
class PrefixConfig:
    """num_virtual_tokens (P) key/value vectors per layer. projection_dim=None trains them directly; an
    int trains an embedding [P, token_dim] through Linear(token_dim, projection_dim) -> Tanh ->
    Linear(projection_dim, num_layers * 2 * token_dim) instead (PEFT's prefix_projection with
    encoder_hidden_size), which is folded into plain prompt_embeddings when saved."""

    num_virtual_tokens: int = 20
    projection_dim: int | None = None
    peft_type: str = PEFT_TYPE
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            problems.append(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int) or self.projection_dim <= 0):
            problems.append(f"projection_dim must be None or a positive integer, got {self.projection_dim!r}")
        if (self.peft_type, self.task_type) != (PEFT_TYPE, "CAUSAL_LM"):
            problems.append(f"peft_type/task_type must be {PEFT_TYPE!r}/'CAUSAL_LM' (decoder-only models), "
                            f"got {self.peft_type!r}/{self.task_type!r}")
        if problems:
            raise ValueError("invalid PrefixConfig: " + "; ".join(problems))

    def to_peft_dict(self, geometry: PrefixGeometry | None = None) -> dict[str, Any]:
        """PEFT's PrefixTuningConfig as adapter_config.json; the model's geometry fills token_dim etc."""
        g = geometry
        token_dim = g.token_dim if g else None
        return {
            "peft_type": PEFT_TYPE, "task_type": self.task_type, "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": token_dim, "num_attention_heads": g.num_heads if g else None,
            "num_layers": g.num_layers if g else None, "num_transformer_submodules": 1,
            "prefix_projection": self.projection_dim is not None,
            "encoder_hidden_size": self.projection_dim if self.projection_dim is not None else token_dim,
            "inference_mode": True, "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None, "modules_to_save": None, "auto_mapping": None,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> PrefixConfig:
        """Read adapter_config.json. Unknown keys are ignored; options peftkit cannot honour raise. The
        geometry keys (token_dim, num_layers, num_attention_heads) are checked by load_prefix."""
        if data.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise ValueError(f"adapter_config.json has peft_type {data.get('peft_type')!r}; this reads {PEFT_TYPE!r}")
        bad = []
        if data.get("task_type") not in (None, "CAUSAL_LM"):
            bad.append(f"task_type={data['task_type']!r} (only CAUSAL_LM)")
        if data.get("num_transformer_submodules") not in (None, 1):
            bad.append(f"num_transformer_submodules={data['num_transformer_submodules']!r} (encoder-decoder)")
        if data.get("modules_to_save"):
            bad.append(f"modules_to_save={data['modules_to_save']!r}")
        if bad:
            raise ValueError("adapter_config.json uses options peftkit's prefix tuning does not support: "
                             + ", ".join(bad))
        projection = None
        if data.get("prefix_projection"):
            projection = data.get("encoder_hidden_size") or data.get("token_dim")
        return cls(num_virtual_tokens=data.get("num_virtual_tokens", 20), projection_dim=projection,
                   base_model_name_or_path=data.get("base_model_name_or_path"))

    def replace(self, **changes: Any) -> PrefixConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class PrefixGeometry:
    """What the prefix must fill: num_layers caches of (num_heads, P, head_dim) keys and values, where
    num_heads is the number of key/value heads (PEFT's num_attention_heads after its GQA adjustment)."""

    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def width(self) -> int:
        return self.num_layers * 2 * self.token_dim


def _unsupported(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"prefix tuning cannot be applied to {type(model).__name__}: {what}. peftkit's prefix "
                      "works with decoder-only transformers causal LMs whose attention layers read a per-layer "
                      "KV cache (verified: Llama family, GPT-2).")


def prefix_geometry(model: nn.Module) -> PrefixGeometry:
    """The model's (num_layers, kv heads, head_dim), derived as PEFT's _prepare_prompt_learning_config does;
    raises a ValueError naming the model class when it cannot take a prefix."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise _unsupported(model, "it has no transformers config (num layers / heads are unknown)")
    if getattr(cfg, "is_encoder_decoder", False):
        raise _unsupported(model, "encoder-decoder models are not supported")
    model_type = getattr(cfg, "model_type", "")
    if model_type in UNSUPPORTED_TYPES:
        raise _unsupported(model, f"model_type {model_type!r} needs a special cache (hybrid, sliding, shared "
                                  "or recurrent layers) that a plain prefix cache does not fit")
    if _cache_arg(model) is None:
        raise _unsupported(model, "its forward() takes neither `cache` nor `past_key_values`")
    d = cfg.to_dict()
    d = d.get("text_config") or d

    def first(*keys: str) -> Any:
        return next((d[k] for k in keys if d.get(k) is not None), None)

    num_layers = getattr(cfg, "num_hidden_layers", None) or first("num_hidden_layers", "num_layers", "n_layer")
    token_dim = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    if not (num_layers and token_dim and heads):
        raise _unsupported(model, f"its config lacks layers/hidden size/heads (got {num_layers}, {token_dim}, {heads})")
    head_dim = token_dim // heads
    if d.get("num_key_value_heads") is not None:  # grouped-query attention: the cache holds the KV heads
        head_dim = d.get("head_dim") or head_dim
        heads = d["num_key_value_heads"]
    return PrefixGeometry(num_layers=int(num_layers), num_heads=int(heads), head_dim=int(head_dim))


def _refuse_checkpointing(model: nn.Module) -> None:
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError("prefix tuning does not work with gradient checkpointing (transformers drops the cache, "
                         "and with it the prefix); call model.gradient_checkpointing_disable()")


def _cache_arg(model: nn.Module) -> str | None:
    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


class PrefixEncoder(nn.Module):
    """One prefix's weights; forward() gives the flat prefix [P, num_layers * 2 * token_dim]."""

    def __init__(self, config: PrefixConfig, geometry: PrefixGeometry, init: bool = True) -> None:
        super().__init__()
        self.config, self.geometry = config, geometry
        p = config.num_virtual_tokens
        if config.projection_dim is None:
            self.prompt_embeddings = nn.Parameter(torch.zeros(p, geometry.width))
            if init:
                nn.init.normal_(self.prompt_embeddings)  # PEFT's nn.Embedding init
        else:  # same creation order as PEFT's PrefixEncoder, so one seed gives the same start
            self.embedding = nn.Parameter(torch.zeros(p, geometry.token_dim))
            if init:
                nn.init.normal_(self.embedding)
            self.transform = nn.Sequential(nn.Linear(geometry.token_dim, config.projection_dim), nn.Tanh(),
                                           nn.Linear(config.projection_dim, geometry.width))

    def forward(self) -> Tensor:
        if self.config.projection_dim is None:
            return self.prompt_embeddings  # (P, L*2*token_dim)
        return self.transform(self.embedding)  # (P, token_dim) -> (P, L*2*token_dim)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the projection by its output: the prefix then trains (if at all) as plain embeddings."""
        if self.config.projection_dim is None:
            return
        flat = self().detach().clone()
        trainable = self.embedding.requires_grad
        del self.embedding, self.transform
        self.prompt_embeddings = nn.Parameter(flat, requires_grad=trainable)
        self.config = self.config.replace(projection_dim=None)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"num_virtual_tokens={self.config.num_virtual_tokens}, layers={g.num_layers}, "
                f"kv_heads={g.num_heads}, head_dim={g.head_dim}, projection_dim={self.config.projection_dim}")


class PrefixAdapters(nn.Module):
    """Registered on the model as `peftkit_prefix`: the named prefixes, which one is active, and the hooks."""

    peftkit_container = True  # holds adapter weights: not a module tree for LoRA targeting to descend into

    def __init__(self, model: nn.Module, geometry: PrefixGeometry) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.geometry = geometry
        self.active: str | None = None
        self.enabled = True
        self.cache_arg = _cache_arg(model)
        self.positional = [p.name for p in inspect.signature(model.forward).parameters.values()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                        model.register_forward_hook(self._after_forward, with_kwargs=True)]

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.enabled or self.active is None:
            cache = kwargs.get(self.cache_arg, kwargs.get("past_key_values"))
            if getattr(cache, "peftkit_prefix", None) is not None and cache.get_seq_length():
                raise ValueError(f"this cache holds prefix {cache.peftkit_prefix!r}, which is not active now")
            return None
        if len(args) > len(self.positional):
            raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments")
        kw = dict(zip(self.positional, args))
        kw.update(kwargs)
        if self.cache_arg != "past_key_values" and "past_key_values" in kw:  # transformers' deprecated name
            if kw.get(self.cache_arg) is not None:
                raise ValueError("pass either `cache` or `past_key_values`, not both")
            kw[self.cache_arg] = kw.pop("past_key_values")
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if x is None:
            raise ValueError("the prefix needs input_ids or inputs_embeds to know the batch size")
        batch, p = x.shape[0], self.encoders[self.active].config.num_virtual_tokens

        from transformers import DynamicCache  # only transformers models get here (prefix_geometry checked)

        cache = kw.get(self.cache_arg)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise TypeError(f"prefix tuning needs a DynamicCache (the default); got {type(cache).__name__}")
        if cache is None or cache.get_seq_length() == 0:
            if model.training and torch.is_grad_enabled():
                _refuse_checkpointing(model)
            cache = DynamicCache() if cache is None else cache
            self._fill(model, cache, batch)
            cache.peftkit_prefix = self.active
            cache.peftkit_check = p + x.shape[1]
            kw[self.cache_arg] = cache
        elif getattr(cache, "peftkit_prefix", None) != self.active:
            raise ValueError(f"this cache holds {cache.get_seq_length()} tokens computed without prefix "
                             f"{self.active!r}; start from an empty cache or disable the prefix")
        mask = kw.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise ValueError("with a prefix the attention mask must be a 2D (batch, length) tensor; "
                                 f"got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)  # (B, P + T)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + p  # real tokens follow the P virtual ones
        return (), kw

    def _fill(self, model: nn.Module, cache: Any, batch: int) -> None:
        """Put the active prefix into each layer of an empty cache: keys/values (B, kv_heads, P, head_dim)."""
        g = self.geometry
        flat = self.encoders[self.active]()  # (P, L*2*token_dim)
        dtype = getattr(model, "dtype", None)
        if dtype is not None:
            flat = flat.to(dtype)
        kv = flat.repeat(batch, 1, 1).view(batch, flat.shape[0], g.num_layers * 2, g.num_heads, g.head_dim)
        kv = kv.permute(2, 0, 3, 1, 4)  # (L*2, B, kv_heads, P, head_dim)
        for layer in range(g.num_layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs.get(self.cache_arg)
        expected = getattr(cache, "peftkit_check", None)
        if expected is None:
            return
        cache.peftkit_check = None
        lengths = [cache.get_seq_length(i) for i in range(self.geometry.num_layers)]
        if any(n != expected for n in lengths):
            raise RuntimeError(
                f"{type(model).__name__} did not use the prefix: each of its {self.geometry.num_layers} layer "
                f"caches should hold {expected} tokens after this call, but they hold {lengths}. Its attention "
                "does not read a per-layer KV cache (unsupported architecture, or gradient checkpointing).")


# --- the model-level API -----------------------------------------------------------------------------------
def _adapters(model: nn.Module) -> PrefixAdapters | None:
    found = getattr(model, "peftkit_prefix", None)
    return found if isinstance(found, PrefixAdapters) else None


def _require(model: nn.Module, name: str) -> PrefixAdapters:
    adapters = _adapters(model)
    if adapters is None or name not in adapters.encoders:
        known = ", ".join(adapters.encoders) if adapters else "none"
        raise KeyError(f"no prefix named {name!r} in this model (prefixes: {known})")
    return adapters


def prefix_configs(model: nn.Module) -> dict[str, PrefixConfig]:
    """The configs of the prefixes in this model, by name (empty if none)."""
    adapters = _adapters(model)
    return {n: e.config for n, e in adapters.encoders.items()} if adapters else {}


def inject_prefix(model: nn.Module, config: PrefixConfig, name: str = "default", *, init: bool = True) -> nn.Module:
    """Add prefix `name` to `model` in place and make it the active, only trainable part. Returns the model.

    Raises before changing anything when the model cannot take a prefix (the error names its class)."""
    from ..inject import check_name, configs  # imported here: inject/checkpoint may import this module

    check_name(name)
    if not isinstance(config, PrefixConfig):
        raise TypeError(f"inject_prefix expects a PrefixConfig, got {type(config).__name__}")
    if name in prefix_configs(model) or name in configs(model):
        raise ValueError(f"adapter {name!r} already exists; remove it first or pick another name")
    geometry = prefix_geometry(model)
    _refuse_checkpointing(model)
    adapters = _adapters(model)
    if adapters is None:
        adapters = PrefixAdapters(model, geometry)
        model.add_module("peftkit_prefix", adapters)
    param = next(model.parameters(), None)
    encoder = PrefixEncoder(config, geometry, init=init)
    adapters.encoders[name] = encoder.to(param.device) if param is not None else encoder
    adapters.active, adapters.enabled = name, True
    set_prefix_trainable(model, name)
    return model


def set_prefix_trainable(model: nn.Module, name: str | None) -> None:
    """Freeze every parameter of the model, then unfreeze prefix `name` (None: freeze everything)."""
    if name is not None:
        _require(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    if name is not None:
        for p in model.peftkit_prefix.encoders[name].parameters():
            p.requires_grad_(True)


def set_active_prefix(model: nn.Module, name: str | None) -> None:
    """Make prefix `name` the one the model uses (None: none, the base model)."""
    if name is not None:
        _require(model, name)
    if _adapters(model) is not None:
        model.peftkit_prefix.active = name


def active_prefix(model: nn.Module) -> str | None:
    adapters = _adapters(model)
    return adapters.active if adapters is not None and adapters.enabled else None


def set_prefix_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the active prefix off (the model computes its base output exactly) or on again."""
    adapters = _adapters(model)
    if adapters is not None:
        adapters.enabled = bool(enabled)


def remove_prefix(model: nn.Module, name: str = "default") -> nn.Module:
    """Delete prefix `name`; with the last one gone the hooks and `model.peftkit_prefix` go too."""
    adapters = _require(model, name)
    del adapters.encoders[name]
    if adapters.active == name:
        adapters.active = None
    if not len(adapters.encoders):
        for handle in adapters.handles:
            handle.remove()
        del model.peftkit_prefix
    return model


def fold_prefix(model: nn.Module, name: str = "default") -> None:
    """Replace prefix `name`'s projection MLP by the prompt_embeddings it computes (same outputs)."""
    _require(model, name).encoders[name].fold()


def prefix_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """PEFT's file contents for prefix `name`: {"prompt_embeddings": [P, num_layers * 2 * token_dim]},
    with any projection folded in."""
    encoder = _require(model, name).encoders[name]
    with torch.no_grad():
        return {KEY: encoder().detach()}


def save_prefix(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                tensors: dict[str, Tensor] | None = None) -> Path:
    """Write prefix `name` in PEFT's PREFIX_TUNING format (loadable by PeftModel.from_pretrained):
    adapter_config.json with the model's geometry, and adapter_model.safetensors. A projection is folded
    in, so the file says prefix_projection=false and holds the projected prompt_embeddings. `tensors`
    (prefix_state_dict's form, e.g. gathered from a sharded run) replaces the model's own values."""
    from safetensors.torch import save_file

    from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, _atomic_write

    adapters = _require(model, name)
    config = adapters.encoders[name].config.replace(projection_dim=None)  # folded on disk
    if config.base_model_name_or_path is None:
        config = config.replace(
            base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = (tensors or prefix_state_dict(model, name))[KEY]
    tensors = {KEY: flat.detach().to("cpu").contiguous().clone()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config.to_peft_dict(adapters.geometry), indent=2, sort_keys=True)
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))
    return directory


def read_prefix(directory: str | os.PathLike,
                name: str = "default") -> tuple[PrefixConfig, dict[str, Any], dict[str, Tensor]]:
    """(config, the raw adapter_config.json dict, tensors) of a saved prefix, without touching a model."""
    from safetensors.torch import load_file

    from ..checkpoint import CONFIG_NAME, PREFIX, WEIGHTS_NAME, find_adapter_dir

    folder = find_adapter_dir(directory, name)
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from err
    config = PrefixConfig.from_peft_dict(raw)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME} (a pickled adapter_model.bin is not read here)")
    try:
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{folder / WEIGHTS_NAME} is corrupt or truncated and cannot be read ({err})") from err
    return config, raw, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def load_prefix(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                trainable: bool = False) -> nn.Module:
    """Load a PEFT PREFIX_TUNING adapter into `model` as prefix `name` and make it active.

    The file's tensor and geometry are checked against the model first; on any problem the error lists
    them all and the model is left unchanged. A PEFT file saved with prefix_projection=True holds the
    projected prompt_embeddings, so it loads as a plain prefix (as PEFT itself does for inference)."""
    config, raw, tensors = read_prefix(directory, name)
    config = config.replace(projection_dim=None)
    geometry = prefix_geometry(model)
    problems = []
    for key, ours in (("num_layers", geometry.num_layers), ("token_dim", geometry.token_dim),
                      ("num_attention_heads", geometry.num_heads)):
        if raw.get(key) is not None and raw[key] != ours:
            problems.append(f"{key}: file {raw[key]}, model {ours}")
    expected = (config.num_virtual_tokens, geometry.width)
    if KEY not in tensors:
        problems.append(f"the file has no {KEY!r} tensor (keys: {sorted(tensors)})")
    elif tuple(tensors[KEY].shape) != expected:
        problems.append(f"{KEY}: file {tuple(tensors[KEY].shape)}, model expects {expected} "
                        f"(num_virtual_tokens, num_layers * 2 * token_dim = {geometry.num_layers} * 2 * "
                        f"{geometry.token_dim})")
    if set(tensors) - {KEY}:
        problems.append(f"unexpected keys in the file: {sorted(set(tensors) - {KEY})}")
    if problems:
        raise ValueError(f"prefix in {str(directory)!r} does not fit {type(model).__name__}; nothing was changed.\n  "
                         + "\n  ".join(problems) + "\nIs it for another base model? Its config says "
                         f"base_model_name_or_path={config.base_model_name_or_path!r}.")
    inject_prefix(model, config, name, init=False)
    encoder = model.peftkit_prefix.encoders[name]
    with torch.no_grad():
        encoder.prompt_embeddings.copy_(tensors[KEY])
    set_prefix_trainable(model, name if trainable else None)
    return model
