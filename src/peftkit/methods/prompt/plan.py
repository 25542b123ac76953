"""Prompt tuning's and P-tuning's terms in the memory plan (peftkit.plan.memory)."""

from __future__ import annotations

from typing import Any


def mlp_encoder_params(d: int, h: int) -> int:
    """Linear(d, h), Linear(h, h), Linear(h, d), with biases."""
    return d * h + h + h * h + h + h * d + d


def lstm_encoder_params(d: int, h: int, layers: int = 2) -> int:
    """A bidirectional LSTM (4 gates, two bias vectors each, per direction and layer), then Linear(2h, 2h)
    and Linear(2h, d) with biases."""
    lstm = 0
    for layer in range(layers):
        width = d if layer == 0 else 2 * h
        lstm += 2 * (4 * h * width + 4 * h * h + 8 * h)
    return lstm + 2 * h * 2 * h + 2 * h + 2 * h * d + d


class PromptPlan:
    """The plan terms of one train name: `encoder` None (prompt tuning), "MLP" or "LSTM" (P-tuning, with the
    encoder's hidden size equal to the model's hidden size, as `peftkit train --method ptuning` uses)."""

    def __init__(self, encoder: dict[str, str | None]) -> None:
        self.encoder = encoder  # train name -> None, "MLP" or "LSTM"

    def problems(self, shape: Any, s: Any) -> list[str]:
        return []

    def trainable(self, shape: Any, s: Any) -> int:
        d = shape.hidden_size
        kind = self.encoder.get(s.method)
        extra = 0 if kind is None else (lstm_encoder_params(d, d) if kind == "LSTM" else mlp_encoder_params(d, d))
        return s.num_virtual_tokens * d + extra

    def activations(self, shape: Any, s: Any, width: dict[str, int], act: int, adt: int) -> float:
        """Per real token: the P virtual positions of each sequence go through every block as well, saving
        what a block saves per token (the residual inputs of its norms, attention's q, k, v and output, the
        MLP's inner states), spread over the sequence's seq_len tokens."""
        d = shape.num_heads * shape.dim_per_head
        per_position = (width["ln1"] + width["ln2"] + 4 * d + (3 if shape.gated_mlp else 1) * width["mid"]) * act
        return per_position * s.num_virtual_tokens / max(s.seq_len, 1)
