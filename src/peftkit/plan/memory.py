"""The planner's memory model: what one training process holds at its peak, term by term.

Counted from what the code keeps, not fitted: weights (NF4 codes and statistics for QLoRA), gradients and
optimizer states of the trainable parameters, the activations autograd saves for backward (per layer and
token, as transformers' Llama-family blocks with SDPA attention and peftkit's adapters save them), the
largest temporary of a step (one chunk of the output head's logits, a layer's gradients, a dequantized
4-bit weight), and the runtime itself (CUDA context, or Python + torch on a CPU).
Assumptions worth knowing: SDPA attention (no T x T scores kept), the loss head run only on the tokens
that carry a label, `loss_chunk` rows at a time (peftkit's loss; a plain `model(labels=...)` holds the
logits of every position), Adam moments in fp32, and no allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import registry
from .presets import ModelShape

FULL = "full"  # full fine-tuning: every weight trains; the other methods come from the registry
METHODS = (FULL, *registry.train_names())
OPTIMIZERS = {"adamw": 8.0, "adamw8bit": 2.0, "sgd": 4.0, "sgd-nomomentum": 0.0}  # state bytes per parameter
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_BYTES = {"cuda": 0.5 * 2**30, "cpu": 330 * 2**20}  # CUDA context + kernels; Python + torch + transformers
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
NF4_BYTES = 0.5  # two 4-bit codes a byte


@dataclass(frozen=True)
class Settings:
    """One training setup. `targets`: 'all-linear', 'attention' (q, k, v, o) or module names (q_proj, ...).
    `answer_fraction`: share of the tokens that carry a loss (instruction data: the answer part)."""

    method: str = "lora"
    r: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    dtype: str = "bfloat16"
    adapter_dtype: str = "float32"
    num_gpus: int = 1
    device: str = "cuda"
    reduction_factor: int = 16
    variant: str = "houlsby"
    num_virtual_tokens: int = 20
    blocksize: int = 64
    double_quant: bool = True
    answer_fraction: float = 1.0
    loss_chunk: int = 1024

    def check(self, shape: ModelShape) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is unknown (known: {', '.join(METHODS)})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is unknown (known: {', '.join(OPTIMIZERS)})")
        for name in ("dtype", "adapter_dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name} {getattr(self, name)!r} is unknown (known: {', '.join(DTYPES)})")
        if self.device not in RUNTIME_BYTES:
            problems.append(f"device {self.device!r} is unknown (cuda or cpu)")
        for name in ("batch_size", "seq_len", "num_gpus", "r", "reduction_factor", "loss_chunk", "blocksize"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.answer_fraction <= 1.0:
            problems.append(f"answer_fraction must be in (0, 1], got {self.answer_fraction}")
        if self.method != FULL and self.method in METHODS:
            problems += registry.by_train_name(self.method).plan.problems(shape, self)
        if problems:
            raise ValueError("; ".join(problems))

    def target_names(self, shape: ModelShape) -> tuple[str, ...]:
        if self.targets == "all-linear":
            return tuple(shape.linears())
        if self.targets == "attention":
            return tuple(n for n in shape.linears() if n in ATTENTION)
        names = (self.targets,) if isinstance(self.targets, str) else self.targets
        return tuple(n.strip() for n in names if n.strip())


@dataclass
class Estimate:
    """Bytes per term at the peak of one process (one GPU), plus the counts behind them. Terms are what is
    alive at that moment: for full fine-tuning, gradients and activations peak at different times."""

    shape: ModelShape
    settings: Settings
    parts: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0
    output_bytes: float = 0.0  # adapter file (or the whole model for full fine-tuning)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def to_dict(self) -> dict:
        gib, s = 2**30, self.settings
        targets = list(s.target_names(self.shape)) if ranked(s.method) else None
        return {"model": self.shape.name, "settings": s.__dict__ | {"targets": targets},
                "parts_gib": {k: round(v / gib, 4) for k, v in self.parts.items()},
                "total_gib": round(self.total / gib, 4), "trainable_params": self.trainable_params,
                "total_params": self.total_params, "trainable_share": self.trainable_share,
                "output_file_bytes": int(self.output_bytes)}


def ranked(method: str) -> bool:
    """Whether a --method name has a rank and target layers."""
    return method != FULL and registry.by_train_name(method).ranked


def quantized_base(method: str) -> bool:
    """Whether a --method name keeps its frozen base in NF4."""
    return method in registry.nf4_train_names()


def adapter_params(shape: ModelShape, s: Settings) -> int:
    """Trainable parameters the method adds (all parameters for full fine-tuning)."""
    if s.method == FULL:
        return shape.total_params()
    return registry.by_train_name(s.method).plan.trainable(shape, s)


def _weights(shape: ModelShape, s: Settings) -> tuple[float, float]:
    """(weights, quantization statistics) in bytes: the base plus the adapter's own parameters."""
    act = DTYPES[s.dtype]
    extra = 0 if s.method == FULL else adapter_params(shape, s) * DTYPES[s.adapter_dtype]
    if not quantized_base(s.method):
        return shape.total_params() * act + extra, 0.0
    linear = shape.num_layers * shape.block_linear_params()
    blocks = linear / s.blocksize
    stats = blocks * (1 + 4 / 256) + 4 if s.double_quant else blocks * 4  # 8-bit absmax + fp32 scale per 256
    return linear * NF4_BYTES + (shape.total_params() - linear) * act + extra, stats


def _layer_activations(shape: ModelShape, s: Settings) -> float:
    """Bytes autograd keeps per token for one decoder block (no checkpointing). Counted from what
    transformers' Llama block saves (checked tensor by tensor with saved-tensor hooks): the two residual
    inputs of the RMSNorms, SDPA's query, keys and values (repeated to every query head when a padding mask
    is present) and output, SwiGLU's gate, up and silu(gate); then whatever the trainable parts add."""
    act, adt = DTYPES[s.dtype], DTYPES[s.adapter_dtype]
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.num_heads * shape.dim_per_head
    fp32 = 4
    total = 2 * h * act + 2 * fp32 + 4 * d * act + shape.num_heads * fp32
    total += (3 if shape.gated_mlp else 1) * i * act
    width = {"ln1": h, "attn": 0, "ln2": h, "mid": i}  # o_proj's input is a view of SDPA's output
    if s.method == FULL:  # every linear input, and the normalised states the norm weights multiply
        return total + sum(width.values()) * act + 2 * h * act
    return total + registry.by_train_name(s.method).plan.activations(shape, s, width, act, adt)


def _head_temporary(shape: ModelShape, s: Settings, tokens: int) -> float:
    """One loss chunk: its fp32 logits (turned into their gradient in place) and the log-sum-exp work
    buffer, (rows, V) each, plus the 16-bit head output and gradient cast when computing in 16 bits."""
    rows = min(s.loss_chunk, max(1, round(tokens * s.answer_fraction)))
    act = DTYPES[s.dtype]
    return rows * shape.vocab_size * (2 * 4 + (2 * act if act < 4 else 0))


def estimate(shape: ModelShape, s: Settings) -> Estimate:
    s.check(shape)
    parts: dict[str, float] = {}
    weights, stats = _weights(shape, s)
    trainable = adapter_params(shape, s)
    tbytes = DTYPES[s.dtype] if s.method == FULL else DTYPES[s.adapter_dtype]
    grads = trainable * tbytes
    optim = trainable * OPTIMIZERS[s.optimizer]
    if s.num_gpus > 1 and s.method == FULL:  # FSDP / ZeRO-3: each GPU holds 1/n of the states
        weights, grads, optim = weights / s.num_gpus, grads / s.num_gpus, optim / s.num_gpus

    tokens = s.batch_size * s.seq_len
    act = DTYPES[s.dtype]
    h = shape.hidden_size
    per_layer = _layer_activations(shape, s) * tokens
    outside = (2 * h * tokens + h * round(tokens * s.answer_fraction)) * act  # final norm in/out, picked rows
    if s.gradient_checkpointing:  # each block keeps its input; one block is recomputed at a time in backward
        saved = shape.num_layers * h * tokens * act + per_layer + outside
    else:
        saved = shape.num_layers * per_layer + outside
    layer_grads = tokens * (3 * h + 3 * shape.intermediate_size) * act
    dequant = 0.0
    if quantized_base(s.method):  # one dense copy of the largest 4-bit weight (fp32 scratch, then the compute dtype)
        biggest = max(a * b for a, b in shape.linears().values())
        dequant = biggest * (4 + (act if act < 4 else 0))
    temporary = max(_head_temporary(shape, s, tokens), layer_grads + dequant)
    if s.method == FULL:
        # Backward writes the gradients as it frees the activations, output head first. The peak is either
        # early (all activations, the head's gradient) or late (all gradients, little else).
        head_grad = shape.vocab_size * shape.hidden_size * tbytes / (s.num_gpus if s.num_gpus > 1 else 1)
        if saved + temporary + head_grad >= grads + layer_grads:
            grads = head_grad
        else:
            saved, temporary = 0.0, layer_grads

    parts["weights"] = weights
    parts["quantization statistics"] = stats
    parts["gradients"] = grads
    parts["optimizer states"] = optim
    parts["activations"] = saved
    parts["temporary buffers"] = temporary
    parts["runtime"] = RUNTIME_BYTES[s.device]
    output = shape.total_params() * act if s.method == FULL else trainable * DTYPES[s.adapter_dtype] + 1024
    return Estimate(shape, s, parts, trainable, shape.total_params() + (0 if s.method == FULL else trainable),
                    output)
