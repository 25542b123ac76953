"""The seam to transformers: every read of a model's internals goes through a named function here.

Decoder and output head, the KV cache classes and their layout in each release, MLP kinds, per-architecture
target tables, config fields that families spell differently, and the keywords that changed between versions
all live in this package; nothing else in peftkit imports `transformers.models.*` or reads private attributes
of transformers objects. transformers itself is imported lazily (inside functions), so `import peftkit` and
the core (inject, merge, checkpoint) stay free of it.

Supported architectures (by `config.model_type`). "verified" means a test runs that feature on a tiny model
of that type; "table" means peftkit has an entry (defaults, fused class) that is not covered by a test.

    model_type  LoRA/DoRA  QLoRA     fused LoRA nodes  chunked   prefix       bottleneck  IA3       serving
                                     (linear, SwiGLU)  head loss              defaults    defaults  (batching engine)
    llama       verified   verified  verified          verified  verified     verified    verified  verified
    gpt2        verified   -         verified          verified  verified     verified    verified  verified
    gemma2      verified   -         verified          verified  verified     -           -         refused
                                                      (soft-cap)  (also gemma3_text: sliding-window layers)
    mistral, mixtral, qwen2, qwen3, qwen3_moe, gemma, gemma3_text, phi, phi3, olmo2, stablelm, starcoder2,
    smollm3, glm, gpt_neox, gptj, opt, bloom, falcon: LoRA training with every fast path (parity matrix);
    serving verified (tests/serve/test_serve_arch_parity.py) except opt, bloom (refused: arch.SERVE_UNVERIFIED);
    prefix tuning verified (tests/test_prefix_arch.py) except gptj, falcon, bloom (refused: arch.PREFIX_UNVERIFIED)
    cohere, granite, granitemoe: the fused nodes; the loss through the model's own forward (their heads
    scale the logits: logit_scale, logits_scaling); serving verified
    IA3 default targets for 27 model types (PEFT's table, compared with it by a test)

The training fast paths are an ALLOWLIST: arch.VERIFIED (tests/test_arch_parity.py proves each entry: loss
and every LoRA gradient equal model(..., labels=...) with left and right padding); any other model trains
through its own forward, exactly (`verified_features(model)`). Other features run on any model where its
structure allows (explicit target_modules, a forward that takes a cache, ...).

Modules: arch (per-architecture tables and module kinds), configs (config fields), cache (KV caches and
forward() argument names), model (decoder/head, decoder blocks, logits, loading keywords).
"""

from __future__ import annotations

from .arch import (BOTTLENECK_DEFAULT_TARGETS, DECODER_LAYER_PATHS, FEATURES, LORA_DEFAULT_TARGETS,
                   PLAIN_KV_LAYER_TYPES, PREFIX_UNSUPPORTED_TYPES, PREFIX_UNVERIFIED, SERVE_UNVERIFIED,
                   SWIGLU_MLP_CLASSES, VERIFIED,
                   bottleneck_default_targets, is_conv1d, lora_default_targets, mlp_kind, model_type,
                   swiglu_projections, verified_features)
from .cache import (cache_arg, cache_length, dynamic_cache, forward_accepts, is_dynamic_cache, kv_tensors,
                    new_cache)
from .configs import (context_length, drop_quantization_config, head_scaling, hidden_size, is_encoder_decoder,
                      kv_geometry, layer_types, mark_dequantized, model_config, name_or_path,
                      record_untied_embeddings, save_config, set_name_or_path, text_config, text_context_length,
                      text_vocab_size, tie_embeddings_if_configured, uses_gradient_checkpointing, vocab_size)
from .model import (decoder_and_head, decoder_layers, dtype_kwargs, input_embeddings, local_tokenizer, logits_at,
                    output_head, prefix_unsupported,
                    rebuild_nonpersistent_buffers, transformers_version)

__all__ = [
    "BOTTLENECK_DEFAULT_TARGETS", "DECODER_LAYER_PATHS", "FEATURES", "LORA_DEFAULT_TARGETS", "PLAIN_KV_LAYER_TYPES",
    "PREFIX_UNSUPPORTED_TYPES", "PREFIX_UNVERIFIED", "SERVE_UNVERIFIED", "SWIGLU_MLP_CLASSES", "VERIFIED",
    "bottleneck_default_targets", "cache_arg",
    "cache_length", "context_length", "decoder_and_head", "decoder_layers", "drop_quantization_config",
    "dtype_kwargs", "dynamic_cache", "forward_accepts", "head_scaling", "hidden_size", "input_embeddings",
    "is_conv1d", "local_tokenizer",
    "is_dynamic_cache", "is_encoder_decoder", "kv_geometry", "kv_tensors", "layer_types", "logits_at",
    "lora_default_targets", "mark_dequantized", "mlp_kind", "model_config", "model_type", "name_or_path",
    "new_cache", "output_head", "prefix_unsupported", "rebuild_nonpersistent_buffers", "record_untied_embeddings",
    "save_config", "set_name_or_path", "swiglu_projections", "text_config", "text_context_length",
    "text_vocab_size", "tie_embeddings_if_configured", "transformers_version", "uses_gradient_checkpointing",
    "verified_features", "vocab_size",
]
