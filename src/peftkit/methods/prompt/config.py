"""The frozen configs of prompt tuning (HF PEFT's PROMPT_TUNING) and P-tuning (P_TUNING), the model geometry
their virtual tokens live in, and the checks that a model can take them.

Both methods put `num_virtual_tokens` trained vectors of the input-embedding width in front of the input's
embeddings. Prompt tuning trains the vectors themselves; P-tuning trains them through an encoder (an MLP, or a
bidirectional LSTM and an MLP) whose output is what the model sees, and what a file holds (PEFT folds it on
save). A file therefore always loads as plain vectors: `inference_mode=True` marks a P-tuning config whose
encoder is folded away (PEFT's meaning of the field, whose prompt encoder has no heads in inference mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ... import hf

PROMPT_TUNING = "PROMPT_TUNING"
P_TUNING = "P_TUNING"
KEY = "prompt_embeddings"
INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
ENCODERS = ("MLP", "LSTM")
GEOMETRY_FIELDS = ("token_dim", "num_layers", "num_attention_heads")


def _shared_problems(config: Any, peft_type: str) -> list[str]:
    """What both configs check: the token count, the types, and the geometry fields a file may state."""
    problems = []
    n = config.num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        problems.append(f"num_virtual_tokens must be a positive integer, got {n!r}")
    if (config.peft_type, config.task_type) != (peft_type, "CAUSAL_LM"):
        problems.append(f"peft_type/task_type must be {peft_type!r}/'CAUSAL_LM' (decoder-only models), "
                        f"got {config.peft_type!r}/{config.task_type!r}")
    if config.num_transformer_submodules not in (None, 1):
        problems.append(f"num_transformer_submodules={config.num_transformer_submodules!r} (encoder-decoder "
                        "models) is not supported: use 1")
    for name in GEOMETRY_FIELDS:
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            problems.append(f"{name} must be None or a positive integer, got {value!r}")
    return problems


def _read_shared(data: dict[str, Any], peft_type: str, what: str) -> dict[str, Any]:
    """The shared fields of adapter_config.json (unknown keys ignored; options peftkit cannot honour raise)."""
    if data.get("peft_type", peft_type) != peft_type:
        raise ValueError(f"adapter_config.json has peft_type {data.get('peft_type')!r}; this reads {peft_type!r}")
    bad = []
    if data.get("task_type") not in (None, "CAUSAL_LM"):
        bad.append(f"task_type={data['task_type']!r} (only CAUSAL_LM)")
    if data.get("num_transformer_submodules") not in (None, 1):
        bad.append(f"num_transformer_submodules={data['num_transformer_submodules']!r} (encoder-decoder)")
    if data.get("modules_to_save"):
        bad.append(f"modules_to_save={data['modules_to_save']!r}")
    if bad:
        raise ValueError(f"adapter_config.json uses options peftkit's {what} does not support: " + ", ".join(bad))
    shared = {name: data.get(name) for name in GEOMETRY_FIELDS}
    shared.update(num_virtual_tokens=data.get("num_virtual_tokens"), task_type=data.get("task_type") or "CAUSAL_LM",
                  base_model_name_or_path=data.get("base_model_name_or_path"),
                  inference_mode=bool(data.get("inference_mode", False)))
    return shared


def _write_shared(config: Any, geometry: PromptGeometry | None) -> dict[str, Any]:
    g = geometry
    return {
        "peft_type": config.peft_type, "task_type": config.task_type,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": g.token_dim if g else config.token_dim,
        "num_layers": g.num_layers if g else config.num_layers,
        "num_attention_heads": g.num_heads if g else config.num_attention_heads,
        "num_transformer_submodules": 1, "inference_mode": config.inference_mode,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": None, "modules_to_save": None, "auto_mapping": None,
    }


@dataclass(frozen=True)
class PromptTuningConfig:
    """num_virtual_tokens (P) trained input embeddings put before every input (Lester et al. 2021; PEFT's
    PromptTuningConfig). prompt_tuning_init: "RANDOM" (standard normal, as PEFT's nn.Embedding), "TEXT" (the
    embeddings of `prompt_tuning_init_text`'s tokens, repeated or cut to P; needs `tokenizer`, or
    `tokenizer_name_or_path` naming a LOCAL directory, since peftkit never downloads) or "SAMPLE_VOCAB"
    (embeddings of P random vocabulary tokens). token_dim, num_layers and num_attention_heads describe the
    base and are filled from the model when saving; a file's token_dim is checked against the model."""

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = field(default=None, hash=False)
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = 1
    peft_type: str = PROMPT_TUNING
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    # a tokenizer object for TEXT init (never saved)
    tokenizer: Any = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        problems = _shared_problems(self, PROMPT_TUNING)
        if self.prompt_tuning_init not in INITS:
            problems.append(f"prompt_tuning_init must be one of {', '.join(INITS)}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            problems.append("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            problems.append("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'")
        if problems:
            raise ValueError("invalid PromptTuningConfig: " + "; ".join(problems))

    def to_peft_dict(self, geometry: PromptGeometry | None = None) -> dict[str, Any]:
        """PEFT's PromptTuningConfig as adapter_config.json; the model's geometry fills token_dim etc."""
        return {**_write_shared(self, geometry), "prompt_tuning_init": self.prompt_tuning_init,
                "prompt_tuning_init_text": self.prompt_tuning_init_text,
                "tokenizer_name_or_path": self.tokenizer_name_or_path, "tokenizer_kwargs": self.tokenizer_kwargs}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> PromptTuningConfig:
        shared = _read_shared(data, PROMPT_TUNING, "prompt tuning")
        return cls(**shared, prompt_tuning_init=data.get("prompt_tuning_init") or "RANDOM",
                   prompt_tuning_init_text=data.get("prompt_tuning_init_text"),
                   tokenizer_name_or_path=data.get("tokenizer_name_or_path"),
                   tokenizer_kwargs=data.get("tokenizer_kwargs"))

    def replace(self, **changes: Any) -> PromptTuningConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class PromptEncoderConfig:
    """P-tuning (Liu et al. 2021; PEFT's PromptEncoderConfig): P trained embeddings passed through an encoder,
    whose output is put before every input. encoder_reparameterization_type "MLP": Linear(d, h) -> ReLU ->
    Linear(h, h) -> ReLU -> Linear(h, d) (encoder_num_layers is ignored, as in PEFT); "LSTM": a bidirectional
    LSTM of encoder_num_layers layers (hidden h, dropout encoder_dropout between layers), then Linear(2h, 2h)
    -> ReLU -> Linear(2h, d). h = encoder_hidden_size, default token_dim. inference_mode=True: the encoder is
    folded into plain prompt embeddings (what a file holds)."""

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = 1
    peft_type: str = P_TUNING
    task_type: str = "CAUSAL_LM"
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        problems = _shared_problems(self, P_TUNING)
        if self.encoder_reparameterization_type not in ENCODERS:
            problems.append(f"encoder_reparameterization_type must be MLP or LSTM, got "
                            f"{self.encoder_reparameterization_type!r}")
        h = self.encoder_hidden_size
        if h is not None and (not isinstance(h, int) or isinstance(h, bool) or h <= 0):
            problems.append(f"encoder_hidden_size must be None or a positive integer, got {h!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            problems.append(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0.0 <= self.encoder_dropout < 1.0:
            problems.append(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if problems:
            raise ValueError("invalid PromptEncoderConfig: " + "; ".join(problems))

    def to_peft_dict(self, geometry: PromptGeometry | None = None) -> dict[str, Any]:
        """PEFT's PromptEncoderConfig as adapter_config.json; the model's geometry fills token_dim etc."""
        hidden = self.encoder_hidden_size
        if hidden is None and geometry is not None:
            hidden = geometry.token_dim
        return {**_write_shared(self, geometry),
                "encoder_reparameterization_type": self.encoder_reparameterization_type,
                "encoder_hidden_size": hidden, "encoder_num_layers": self.encoder_num_layers,
                "encoder_dropout": self.encoder_dropout}

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> PromptEncoderConfig:
        shared = _read_shared(data, P_TUNING, "P-tuning")
        encoder = {k: data[k] for k in ("encoder_reparameterization_type", "encoder_hidden_size",
                                        "encoder_num_layers", "encoder_dropout") if data.get(k) is not None}
        return cls(**shared, **encoder)

    def replace(self, **changes: Any) -> PromptEncoderConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class PromptGeometry:
    """The base model as the config file describes it: the input-embedding width the virtual tokens have,
    and (for PEFT's file) the number of layers and attention heads."""

    token_dim: int
    num_layers: int | None
    num_heads: int | None


def unsupported(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"prompt tuning / P-tuning cannot be applied to {type(model).__name__}: {what}. They work "
                      "with decoder-only transformers causal LMs whose forward() takes inputs_embeds (verified: "
                      "Llama family, GPT-2).")


def prompt_geometry(model: nn.Module) -> PromptGeometry:
    """The width of the model's input embeddings (PEFT's token_dim), its layers and heads; raises a ValueError
    naming the model class when it cannot take virtual tokens."""
    if hf.model_config(model) is None:
        raise unsupported(model, "it has no transformers config")
    if hf.is_encoder_decoder(model):
        raise unsupported(model, "encoder-decoder models are not supported")
    embeddings = hf.input_embeddings(model)
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.dim() != 2:
        raise unsupported(model, "it has no input embedding table (get_input_embeddings)")
    if not hf.forward_accepts(model, "inputs_embeds"):
        raise unsupported(model, "its forward() takes no inputs_embeds")
    text = hf.text_config(model)
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    return PromptGeometry(token_dim=int(weight.shape[1]), num_layers=layers, num_heads=heads)
