"""Model shapes for the planner: the architecture numbers that decide memory, from a preset name, a
transformers `config.json` or a directory holding one. No weights are read.

Presets are the public configs of each model (hidden size, MLP width, layers, heads, key/value heads,
vocabulary, tied embeddings), as published with the checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer as the memory model sees it. `gated_mlp`: SwiGLU (gate, up, down) as in
    Llama; otherwise a plain two-layer MLP (fc, proj) as in GPT-2."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_embeddings: bool = False
    head_dim: int | None = None
    gated_mlp: bool = True
    qkv_bias: bool = False

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one block, by PEFT's module names."""
        h, i, d = self.hidden_size, self.intermediate_size, self.dim_per_head
        q, kv = self.num_heads * d, self.num_kv_heads * d
        layers = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.gated_mlp:
            layers.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        else:
            layers.update(up_proj=(h, i), down_proj=(i, h))
        return layers

    def block_linear_params(self) -> int:
        extra = (self.num_heads + 2 * self.num_kv_heads) * self.dim_per_head if self.qkv_bias else 0
        return sum(a * b for a, b in self.linears().values()) + extra

    def embedding_params(self) -> int:
        """Input embeddings plus the output head when it is a separate matrix."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    def total_params(self) -> int:
        return self.num_layers * self.block_linear_params() + self.embedding_params() + self.norm_params()


def _llama(name, h, i, layers, heads, kv, vocab, tie=False, **kw) -> ModelShape:
    return ModelShape(name, h, i, layers, heads, kv, vocab, tie, **kw)


PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    _llama("llama-7b", 4096, 11008, 32, 32, 32, 32000),
    _llama("llama-13b", 5120, 13824, 40, 40, 40, 32000),
    _llama("llama-33b", 6656, 17920, 60, 52, 52, 32000),
    _llama("llama-65b", 8192, 22016, 80, 64, 64, 32000),
    _llama("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    _llama("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    _llama("llama-2-70b", 8192, 28672, 80, 64, 8, 32000),
    _llama("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    _llama("llama-3-70b", 8192, 28672, 80, 64, 8, 128256),
    _llama("mistral-7b", 4096, 14336, 32, 32, 8, 32000),
    _llama("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
    _llama("smollm2-135m", 576, 1536, 30, 9, 3, 49152, tie=True),
    _llama("smollm2-360m", 960, 2560, 32, 15, 5, 49152, tie=True),
    _llama("smollm2-1.7b", 2048, 8192, 24, 32, 32, 49152, tie=True),
)}
ALIASES = {"smollm2": "smollm2-135m", "llama-3.1-8b": "llama-3-8b", "llama-3.1-70b": "llama-3-70b",
           "mistral-7b-v0.1": "mistral-7b", "qwen2.5-7b-instruct": "qwen2.5-7b"}

# transformers config field -> ModelShape field, with the alternatives other families use
_FIELDS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head"),
    "vocab_size": ("vocab_size",),
}


def known() -> list[str]:
    return sorted(PRESETS) + sorted(ALIASES)


def resolve(spec: str) -> ModelShape:
    """A preset name (case-insensitive), a config.json path, or a directory with a config.json."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{spec} has no config.json: give a transformers model directory, its config.json, "
                             f"or a preset ({', '.join(known())})")
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return from_config(config, name=path.parent.name or path.stem)
    key = spec.lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown model {spec!r}: not a file, directory or preset. Known presets: "
                         f"{', '.join(known())}")
    return PRESETS[key]


def from_config(config: dict, name: str = "model") -> ModelShape:
    """A shape from a transformers config dict (Llama/Mistral/Qwen2 fields, or GPT-2's n_embd/n_layer/...).
    Fields the memory model cannot do without are named in the error."""
    if not isinstance(config, dict):
        raise ValueError(f"config of {name} must be a JSON object")
    values, missing = {}, []
    for field, keys in _FIELDS.items():
        found = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
        if found is None:
            missing.append(" or ".join(keys))
        values[field] = found
    if missing:
        raise ValueError(f"config of {name} lacks the fields the planner needs: {'; '.join(missing)}")
    h = values["hidden_size"]
    gpt2 = "n_embd" in config and "hidden_size" not in config
    inner = (config.get("intermediate_size") or config.get("n_inner") or config.get("ffn_dim")
             or (4 * h if gpt2 else None))
    if not isinstance(inner, int):
        raise ValueError(f"config of {name} lacks the fields the planner needs: intermediate_size")
    heads = values["num_heads"]
    if h % heads and not config.get("head_dim"):
        raise ValueError(f"config of {name}: hidden_size {h} is not a multiple of num_attention_heads {heads} "
                         "and there is no head_dim")
    shape = ModelShape(name=name, hidden_size=h, intermediate_size=inner, num_layers=values["num_layers"],
                       num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
                       vocab_size=values["vocab_size"], tie_embeddings=bool(config.get("tie_word_embeddings", gpt2)),
                       head_dim=config.get("head_dim"), gated_mlp=not gpt2,
                       qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")))
    return shape if not gpt2 else replace(shape, qkv_bias=True)
