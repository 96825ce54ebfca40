"""Dropout whose masks can come from random bits instead of per-element Bernoulli draws.

On a CPU, `torch.bernoulli_` draws each element on its own and took about a third of the SASRec
training step (`flm bench train --profile`, docs/benchmarks.md). With `masks = "bits"` a mask
element is one 16-bit slice of 64-bit random words, compared with a threshold: the drop
probability is `p` rounded to a multiple of 1/65536 (exact for 0.5, 0.25, ...), kept elements
are scaled by the inverse of the rounded keep probability, and the stream still comes from
torch's seeded generator. The two kinds draw different masks, so a run with one does not
repeat a run with the other step for step. On a GPU, where torch's masks are cheap and fused into
its attention kernel, `bits` leaves them to torch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

DropoutMasks = Literal["bernoulli", "bits"]
LEVELS = 1 << 16


def bit_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """`x` with each element zeroed with probability round(p * 2**16) / 2**16, the rest rescaled."""
    threshold = round(p * LEVELS)
    if threshold == 0:
        return x
    if threshold == LEVELS:  # p within 2**-17 of 1: nothing is kept
        return x * 0
    count = x.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((count + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform = words.view(torch.int16)[:count].view(x.shape)  # uniform over [-2**15, 2**15)
    keep = uniform >= threshold - LEVELS // 2
    return x * (keep * (LEVELS / (LEVELS - threshold))).to(x.dtype)


class Dropout(nn.Dropout):
    """`nn.Dropout` with a choice of mask source (`masks`, set by `set_dropout_masks`)."""

    masks: DropoutMasks = "bernoulli"

    def draws_bits(self, x: torch.Tensor) -> bool:
        return self.masks == "bits" and self.training and self.p > 0 and x.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bit_dropout(x, self.p) if self.draws_bits(x) else super().forward(x)


def set_dropout_masks(module: nn.Module, masks: DropoutMasks) -> None:
    """Draw every `Dropout` of `module` from `masks` ("bernoulli": torch's own; "bits": `bit_dropout`)."""
    if masks not in ("bernoulli", "bits"):
        raise ValueError(f"unknown dropout masks {masks!r}; expected 'bernoulli' or 'bits'")
    for child in module.modules():
        if isinstance(child, Dropout):
            child.masks = masks


def dropout_rate(module: nn.Module) -> float:
    """The drop probability of the first `Dropout` of `module` (0 if it has none)."""
    return next((child.p for child in module.modules() if isinstance(child, Dropout)), 0.0)


def set_dropout_rate(module: nn.Module, p: float) -> None:
    """Set the drop probability of every `Dropout` of `module`, and of multi-layer GRU/LSTM
    inter-layer dropout, to `p` (for a dropout schedule over epochs)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    for child in module.modules():
        if isinstance(child, Dropout):
            child.p = p
        elif isinstance(child, nn.RNNBase) and child.num_layers > 1:
            child.dropout = p


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
              dropout: Dropout) -> torch.Tensor:
    """Scaled dot-product attention with `dropout` on the attention probabilities (`allowed`:
    True where a query may attend). Uses torch's fused kernel unless the masks are `bits` in
    training on a CPU, where the probabilities are formed here so that `dropout` can draw their mask."""
    if not dropout.draws_bits(query):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed,
                                              dropout_p=dropout.p if dropout.training else 0.0)
    scores = (query @ key.transpose(-2, -1)) * query.shape[-1] ** -0.5
    probabilities = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return dropout(probabilities).to(value.dtype) @ value
