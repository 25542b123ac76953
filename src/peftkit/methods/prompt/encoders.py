"""One adapter's virtual tokens: plain trained embeddings (prompt tuning, and any folded P-tuning adapter) or
embeddings passed through P-tuning's encoder; and prompt tuning's initialisations from the vocabulary."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ... import hf
from .config import PromptEncoderConfig, PromptTuningConfig

PromptConfig = PromptTuningConfig | PromptEncoderConfig


def has_encoder(config: PromptConfig) -> bool:
    """Whether the adapter trains through P-tuning's encoder (else its vectors are the prompt itself)."""
    return isinstance(config, PromptEncoderConfig) and not config.inference_mode


class VirtualTokens(nn.Module):
    """forward() gives the P virtual tokens' input embeddings, (P, token_dim). Parameters are created in PEFT's
    order (embedding, then LSTM, then MLP), so one seed gives PEFT's starting point."""

    def __init__(self, config: PromptConfig, token_dim: int, init: bool = True) -> None:
        super().__init__()
        self.config, self.token_dim = config, token_dim
        table = torch.zeros(config.num_virtual_tokens, token_dim)
        if init:
            nn.init.normal_(table)  # PEFT's nn.Embedding init
        if not has_encoder(config):
            self.prompt_embeddings = nn.Parameter(table)
            return
        self.embedding = nn.Parameter(table)
        h = config.encoder_hidden_size or token_dim
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=h, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, token_dim))

    def forward(self) -> Tensor:
        if not has_encoder(self.config):
            return self.prompt_embeddings  # (P, d)
        x = self.embedding[None]  # (1, P, d)
        if hasattr(self, "lstm_head"):
            x = self.lstm_head(x)[0]  # (1, P, 2h)
        return self.mlp_head(x)[0]  # (P, d)

    @torch.no_grad()
    def folded(self) -> Tensor:
        """The virtual tokens as a file holds them: the encoder's output in eval mode (no LSTM dropout)."""
        was_training = self.training
        self.eval()
        try:
            return self().detach().clone()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the encoder by its output: the adapter then trains (if at all) as plain embeddings."""
        if not has_encoder(self.config):
            return
        flat = self.folded()
        trainable = self.embedding.requires_grad
        for name in ("embedding", "lstm_head", "mlp_head"):
            if hasattr(self, name):
                delattr(self, name)
        self.prompt_embeddings = nn.Parameter(flat, requires_grad=trainable)
        self.config = self.config.replace(inference_mode=True)

    def extra_repr(self) -> str:
        kind = "P-tuning " + self.config.encoder_reparameterization_type if has_encoder(self.config) else "plain"
        return f"num_virtual_tokens={self.config.num_virtual_tokens}, token_dim={self.token_dim}, {kind}"


def init_token_ids(config: PromptTuningConfig, vocab_size: int) -> list[int] | None:
    """The token ids whose embeddings start prompt tuning's vectors (None for RANDOM): the init text's tokens
    repeated and cut to P (PEFT's rule), or P random vocabulary ids (SAMPLE_VOCAB, torch's global RNG)."""
    p = config.num_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (p,), dtype=torch.long).tolist()
    if config.prompt_tuning_init != "TEXT":
        return None
    ids = list(_tokenizer(config)(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} has no tokens")
    return (ids * math.ceil(p / len(ids)))[:p]


def _tokenizer(config: PromptTuningConfig) -> Any:
    if config.tokenizer is not None:
        return config.tokenizer
    if not config.tokenizer_name_or_path:
        raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer: pass PromptTuningConfig(tokenizer=...) (or "
                         "inject_prompt(..., tokenizer=...)), or tokenizer_name_or_path naming a local directory")
    return hf.local_tokenizer(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))


@torch.no_grad()
def init_from_vocabulary(tokens: VirtualTokens, model: nn.Module) -> None:
    """TEXT / SAMPLE_VOCAB: copy the chosen tokens' input embeddings (as fp32) into the adapter's vectors."""
    config = tokens.config
    if not isinstance(config, PromptTuningConfig) or config.prompt_tuning_init == "RANDOM":
        return
    table = hf.input_embeddings(model)
    ids = init_token_ids(config, table.weight.shape[0])
    bad = [i for i in ids if not 0 <= i < table.weight.shape[0]]
    if bad:
        raise ValueError(f"init text token ids {bad[:5]} are outside the model's vocabulary of "
                         f"{table.weight.shape[0]}: the tokenizer does not belong to this model")
    vectors = table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))  # (P, d)
    tokens.prompt_embeddings.copy_(vectors.float())
