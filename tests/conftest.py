"""Tiny seeded models built from configs (never downloaded), and helpers for non-zero adapters."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import peftkit


class LazyImport:
    """A module imported on its first attribute use, so that test files can bind heavy packages (peft,
    bitsandbytes, openai: seconds each) at module level without paying for them while pytest collects.
    optional=True imports with pytest.importorskip: a test that uses a package that is not installed is
    skipped; otherwise a missing package fails the test that uses it."""

    def __init__(self, name: str, optional: bool = False) -> None:
        self._name, self._optional, self._module = name, optional, None

    def __getattr__(self, attr: str):
        if self._module is None:
            if attr.startswith("_") and attr != "__version__":  # pytest probes globals (__test__, _mock_name, ...)
                raise AttributeError(attr)
            if self._optional:
                self._module = pytest.importorskip(self._name)
            else:
                import importlib

                self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy import of {self._name}>"


class TinyMLP(nn.Module):
    """An embedding and two linear layers with biases: the smallest tree with every kind LoRA wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.emb(ids))))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_mlp():
    torch.manual_seed(0)
    return TinyMLP().eval()


# name -> (builder, LoRA targets covering every supported kind in it)
MODELS = {
    "mlp": (tiny_mlp, ["emb", "fc1", "fc2"]),
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "wte"]),
}


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits for any of the tiny models."""
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def inputs(name: str, batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    vocab = 20 if name == "mlp" else 128
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def nonzero_adapter(model: nn.Module, targets, name: str = "default", seed: int = 0, **kw) -> nn.Module:
    """Inject an adapter whose A and B are both random (init_lora_weights=False), so it changes outputs."""
    torch.manual_seed(seed)
    cfg = peftkit.LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), target_modules=targets,
                             init_lora_weights=False, **kw)
    return peftkit.inject(model, cfg, name)


@pytest.fixture(params=list(MODELS))
def model_case(request):
    builder, targets = MODELS[request.param]
    return request.param, builder, targets


# --- training: a tiny Llama + tokenizer saved as a transformers directory, and a small JSONL dataset ---
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["What colour is the sky?", "The sky is blue.", "Name a fruit.", "An apple.", "Count to three.",
          "one two three", "Say hi", "hi there", "user assistant system"]


def make_tokenizer(chat_template: str | None = CHATML, split_words: bool = True, corpus: list[str] | None = None,
                   vocab_size: int = 300):
    """A byte-level BPE tokenizer with ChatML special tokens, trained on `corpus` (default CORPUS);
    split_words=False lets merges cross any boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((corpus or CORPUS) * 20, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    wrapped.chat_template = chat_template
    return wrapped


def save_tiny_model(directory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None, initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def qa_records(n: int) -> list[dict]:
    pairs = [("What colour is the sky?", "The sky is blue."), ("Name a fruit.", "An apple."),
             ("Count to three.", "one two three"), ("Say hi", "hi there")]
    return [{"instruction": pairs[i % 4][0], "output": pairs[i % 4][1]} for i in range(n)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def qa_jsonl(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in qa_records(32)))
    return str(path)
