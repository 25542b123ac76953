"""Per-architecture knowledge, by `config.model_type` or module class: target tables, MLP kinds, what is verified.

Everything here is data that a new architecture extends in one place; the functions only look it up.
"""

from __future__ import annotations

from torch import nn

# --- what tests verify, per model_type (tiny models built from configs; see the package docstring) ----------
FEATURES = ("lora", "dora", "qlora", "fused_linear", "fused_mlp", "head_loss", "prefix", "bottleneck", "ia3",
            "serve")
# The training fast paths (the chunked head loss around model.forward, the fused LoRA linear and SwiGLU nodes
# with padding-free rows) run only on these model types: tests/test_arch_parity.py trains a tiny random model
# of each with every fast path allowed and checks loss and LoRA gradients against model(..., labels=...) with
# left and right padding and answer-only labels. Any other model uses its own forward (exact, slower).
TRAINING_FAST_PATHS = frozenset({"lora", "head_loss", "fused_linear", "fused_mlp"})
PARITY_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
                "phi", "phi3", "olmo2", "cohere", "stablelm", "starcoder2", "smollm3", "glm", "gpt2", "gpt_neox",
                "gptj", "opt", "bloom", "falcon", "granite", "granitemoe")
# Their heads scale the logits (Cohere's logit_scale, Granite's logits_scaling) in a way the head-loss
# shortcut does not reproduce: the loss goes through the model's own forward (the fused nodes still run).
SCALED_HEAD_TYPES = ("cohere", "granite", "granitemoe")
# Serving (the batching engine's slot layers, left-padded prefill and shared KV cache) is verified on the parity
# types by tests/serve/test_serve_arch_parity.py, except these, which `peftkit serve` refuses:
SERVE_UNVERIFIED = {
    "opt": "its decoder flattens (batch, tokens) into one dimension before the MLP, so rows cannot be routed "
           "to their adapters",
    "bloom": "its ALiBi positions come from the attention mask, which the engine's left-padded rows change",
    "gemma2": "batched greedy tokens differ from the same request served alone",
    "granitemoe": "its experts flatten (batch, tokens) into one dimension in some transformers releases (5.4), so "
                  "rows cannot be routed to their adapters",
}
# --- prefix tuning: architectures whose cache PEFT builds specially (hybrid/sliding caches, shared-KV layers,
# fused KV) or that have no per-layer attention cache at all: a plain DynamicCache prefix would be wrong or ignored.
PREFIX_UNSUPPORTED_TYPES = frozenset({
    "gemma3", "gemma4", "gemma4_text", "bloom", "gpt_bigcode", "mamba", "mamba2",
    "falcon_mamba", "rwkv", "recurrent_gemma", "jamba", "zamba", "zamba2", "qwen3_next", "lfm2", "cohere2", "t5",
    "bart"})

# Prefix tuning (the cache hooks) is verified on the parity types by tests/test_prefix_arch.py (forward equal to HF
# PEFT's, a left-padded batch's generate() equal to each row's alone, equal to greedy full forwards), except
# these and PREFIX_UNSUPPORTED_TYPES, which it refuses:
PREFIX_UNVERIFIED = {
    "gptj": "its generate() with a prefix cache differs from full forwards",
    "falcon": "its attention cannot take a prefix cache (the shapes do not match)",
}


def _parity_features(model_type: str) -> frozenset[str]:
    found = set(TRAINING_FAST_PATHS)
    if model_type in SCALED_HEAD_TYPES:
        found.discard("head_loss")
    if model_type not in SERVE_UNVERIFIED:
        found.add("serve")
    if model_type not in PREFIX_UNVERIFIED and model_type not in PREFIX_UNSUPPORTED_TYPES:
        found.add("prefix")
    return frozenset(found)


VERIFIED: dict[str, frozenset[str]] = {
    **{t: _parity_features(t) for t in PARITY_TYPES},
    "llama": frozenset(FEATURES),
    "gpt2": _parity_features("gpt2") | {"dora", "bottleneck", "ia3"},
}

# --- LoRA: target_modules=None picks these, by model_type (HF PEFT's table,
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, compared with it by a test; a str is a regex) ----------
_QV = ("q_proj", "v_proj")
LORA_DEFAULT_TARGETS: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "v"), "mt5": ("q", "v"), "bart": _QV, "gpt2": ("c_attn",), "bloom": ("query_key_value",),
    "blip-2": ("q", "v", "q_proj", "v_proj"), "opt": _QV, "gptj": _QV, "gpt_neox": ("query_key_value",),
    "gpt_neo": _QV, "bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"), "deberta-v2": ("query_proj", "value_proj"), "deberta": ("in_proj",),
    "layoutlm": ("query", "value"), "llama": _QV, "llama4": _QV, "chatglm": ("query_key_value",),
    "gpt_bigcode": ("c_attn",), "mpt": ("Wqkv",), "RefinedWebModel": ("query_key_value",),
    "RefinedWeb": ("query_key_value",), "falcon": ("query_key_value",), "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",), "mistral": _QV, "mixtral": _QV, "stablelm": _QV,
    "phi": ("q_proj", "v_proj", "fc1", "fc2"), "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": _QV, "qwen3": _QV,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"), "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
    "phi3": ("qkv_proj",),  # not in PEFT's table: peftkit's own (Phi-3 fuses q, k, v)
}

# --- bottleneck adapters: the last projection of the attention block and of the feed-forward block -----------
_LLAMA_BLOCK_ENDS = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)}
BOTTLENECK_DEFAULT_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_BLOCK_ENDS, "mistral": _LLAMA_BLOCK_ENDS, "qwen2": _LLAMA_BLOCK_ENDS, "qwen3": _LLAMA_BLOCK_ENDS,
    "gemma": _LLAMA_BLOCK_ENDS, "phi3": _LLAMA_BLOCK_ENDS,
    "gpt2": {"houlsby": ("attn.c_proj", "mlp.c_proj"), "pfeiffer": ("mlp.c_proj",)},
}

# --- IA3: target_modules=None / feedforward_modules=None pick these, by model_type (HF PEFT's two tables,
# TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and ..._FEEDFORWARD_MODULES_MAPPING): (targets, feedforward) --
IA3_DEFAULT_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "llama4": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen3": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gemma3_text": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
    "phi": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_bigcode": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "falcon": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "RefinedWeb": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "RefinedWebModel": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
    "bart": (("q_proj", "v_proj", "fc2"), ("fc2",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "deberta": (("in_proj", "output.dense"), ("output.dense",)),
    "deberta-v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
}


# --- MLP kinds: classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) -----------------
SWIGLU_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Olmo2MLP", "GraniteMLP"})
SWIGLU_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# --- decoder blocks: where the repeated layers sit, tried in order ---------------------------------------------
DECODER_LAYER_PATHS = ("model.layers", "transformer.h", "layers")

# --- the attention layer kinds (config.layer_types) whose cache is a plain key/value tensor pair per layer ------
PLAIN_KV_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def model_type(model: nn.Module) -> str | None:
    """`model.config.model_type`, or None for a model without a transformers config."""
    return getattr(getattr(model, "config", None), "model_type", None)


def verified_features(model: nn.Module) -> frozenset[str]:
    """The features (names in FEATURES) a test verifies for this model's architecture; empty when unknown."""
    return VERIFIED.get(model_type(model), frozenset())


def lora_default_targets(model: nn.Module) -> tuple[str, ...] | str | None:
    """LoRA's target_modules for target_modules=None, by model_type; None when the table has no entry."""
    return LORA_DEFAULT_TARGETS.get(model_type(model))


def bottleneck_default_targets(model: nn.Module, variant: str) -> tuple[str, ...] | None:
    """The modules a bottleneck adapter of `variant` follows by default, by model_type; None without an entry."""
    table = BOTTLENECK_DEFAULT_TARGETS.get(model_type(model))
    return None if table is None else table[variant]


def ia3_defaults(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """IA3's (target_modules, feedforward_modules) for a config that leaves them None, by model_type; None
    when the table has no entry."""
    return IA3_DEFAULT_TARGETS.get(model_type(model))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out). Detected by the shape of
    its API rather than by import, so callers in the core never import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def mlp_kind(module: nn.Module) -> str | None:
    """'swiglu' for a Llama-family gated MLP with SiLU, y = down_proj(silu(gate_proj(x)) * up_proj(x)), whose
    forward is known to be exactly that (a verified class; see SWIGLU_MLP_CLASSES); None for anything else."""
    if type(module).__name__ not in SWIGLU_MLP_CLASSES:
        return None
    act = getattr(module, "act_fn", None)
    return "swiglu" if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" else None


def swiglu_projections(mlp: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(gate, up, down) of an MLP for which mlp_kind() is 'swiglu'."""
    gate, up, down = (getattr(mlp, name) for name in SWIGLU_PROJECTIONS)
    return gate, up, down
