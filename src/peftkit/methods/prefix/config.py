"""Prefix tuning's frozen config (HF PEFT's PREFIX_TUNING fields), the model geometry a prefix fills, and
the checks that a model can take a prefix at all."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ... import hf

PEFT_TYPE = "PREFIX_TUNING"
KEY = "prompt_embeddings"



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
    # (num_layers, token_dim, num_attention_heads) as a file states them, checked against a model on load
    file_geometry: tuple[int | None, int | None, int | None] | None = field(default=None, compare=False, repr=False)

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

    @classmethod
    def from_file(cls, data: dict[str, Any]) -> PrefixConfig:
        """What a file holds: plain prompt_embeddings (PEFT saves a projection's output, so a file with
        prefix_projection=True loads as a plain prefix, as PEFT itself does for inference), and the
        geometry it states."""
        geometry = (data.get("num_layers"), data.get("token_dim"), data.get("num_attention_heads"))
        return cls.from_peft_dict(data).replace(projection_dim=None, file_geometry=geometry)

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


def unsupported(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"prefix tuning cannot be applied to {type(model).__name__}: {what}. peftkit's prefix "
                      "works with decoder-only transformers causal LMs whose attention layers read a per-layer "
                      "KV cache (verified: Llama family, GPT-2).")


def prefix_geometry(model: nn.Module) -> PrefixGeometry:
    """The model's (num_layers, kv heads, head_dim), derived as PEFT's _prepare_prompt_learning_config does;
    raises a ValueError naming the model class when it cannot take a prefix."""
    reason = hf.prefix_unsupported(model)
    if reason:
        raise unsupported(model, reason)
    try:
        num_layers, heads, head_dim = hf.kv_geometry(model)
    except ValueError as err:
        raise unsupported(model, str(err)) from None
    return PrefixGeometry(num_layers=int(num_layers), num_heads=int(heads), head_dim=int(head_dim))


def refuse_checkpointing(model: nn.Module) -> None:
    if hf.uses_gradient_checkpointing(model):
        raise ValueError("prefix tuning does not work with gradient checkpointing (transformers drops the cache, "
                         "and with it the prefix); call model.gradient_checkpointing_disable()")
