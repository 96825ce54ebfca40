"""Causal sequence encoders (SASRec transformer, GRU, LSTM) over left-padded item sequences.

Input is Long[B, L], right-aligned: the most recent item sits at position L-1 and item 0 is
padding. The output is one hidden state per position; position t has seen items 0..t only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

EncoderKind = Literal["sasrec", "gru", "lstm"]

FEEDFORWARD_MULTIPLIER = 4


def item_embedding_table(num_items: int, hidden: int) -> nn.Embedding:
    """The shared item table: row 0 is padding (zero, never updated), rows 1..num_items items.

    Rows start with norm ~1 (std 1/sqrt(H)) so initial dot-product logits are O(1).
    """
    table = nn.Embedding(num_items + 1, hidden, padding_idx=0)
    nn.init.normal_(table.weight, std=hidden ** -0.5)
    with torch.no_grad():
        table.weight[0].zero_()
    return table


def check_item_embedding(item_embedding: nn.Embedding, num_items: int, hidden: int) -> None:
    if (item_embedding.num_embeddings != num_items + 1 or item_embedding.embedding_dim != hidden
            or item_embedding.padding_idx != 0):
        raise ValueError(
            f"item_embedding must be nn.Embedding({num_items + 1}, {hidden}, padding_idx=0), got "
            f"nn.Embedding({item_embedding.num_embeddings}, {item_embedding.embedding_dim}, "
            f"padding_idx={item_embedding.padding_idx})")


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attention_dropout = dropout
        self.attention_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.feedforward_norm = nn.LayerNorm(hidden)
        self.feedforward = nn.Sequential(
            nn.Linear(hidden, FEEDFORWARD_MULTIPLIER * hidden),
            nn.GELU(),
            nn.Linear(FEEDFORWARD_MULTIPLIER * hidden, hidden),
        )
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = self.qkv(self.attention_norm(x))
        qkv = qkv.view(batch, length, 3, self.heads, hidden // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask,
            dropout_p=self.attention_dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)
        x = x + self.residual_dropout(self.attention_output(attended))
        return x + self.residual_dropout(self.feedforward(self.feedforward_norm(x)))


class SequenceEncoder(nn.Module):
    """Hidden state per position of a left-padded item sequence: Long[B, L] -> Float[B, L, H].

    SASRec: item embeddings scaled by sqrt(H) plus learned position embeddings, pre-LN causal
    transformer blocks, final LayerNorm. Position ids are right-aligned (the most recent item is
    always position max_len-1, also when L < max_len), so a position id means "k steps before the
    latest item" independently of how much padding the row has. Attention combines the causal
    mask with a key-padding mask; every query may also attend to itself, so fully padded rows (and
    padded queries) never see an all-masked row and never produce NaN.

    GRU/LSTM: a causal RNN over the embeddings, then the same final LayerNorm. Padded steps come
    first and feed a zero input, so real positions never depend on padding-row contents.

    `item_embedding` is shared with the rest of the model; when None a fresh table is created.
    """

    def __init__(self, num_items: int, hidden: int, max_len: int, layers: int, heads: int,
                 dropout: float, kind: EncoderKind = "sasrec",
                 item_embedding: nn.Embedding | None = None):
        super().__init__()
        if item_embedding is None:
            item_embedding = item_embedding_table(num_items, hidden)
        check_item_embedding(item_embedding, num_items, hidden)
        self.kind = kind
        self.max_len = max_len
        self.item_embedding = item_embedding
        self.embedding_dropout = nn.Dropout(dropout)
        self.output_norm = nn.LayerNorm(hidden)
        if kind == "sasrec":
            if hidden % heads != 0:
                raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
            self.embedding_scale = math.sqrt(hidden)
            self.position_embedding = nn.Embedding(max_len, hidden)
            nn.init.normal_(self.position_embedding.weight, std=hidden ** -0.5)
            self.blocks = nn.ModuleList(
                CausalSelfAttentionBlock(hidden, heads, dropout) for _ in range(layers))
        elif kind in ("gru", "lstm"):
            recurrent = nn.GRU if kind == "gru" else nn.LSTM
            self.recurrent = recurrent(hidden, hidden, num_layers=layers, batch_first=True,
                                       dropout=dropout if layers > 1 else 0.0)
        else:
            raise ValueError(f"unknown encoder kind {kind!r}; expected 'sasrec', 'gru' or 'lstm'")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        length = input.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        is_item = input != 0
        if self.kind == "sasrec":
            return self._transformer(input, is_item)
        embedded = self.item_embedding(input) * is_item.unsqueeze(-1)
        states, _ = self.recurrent(self.embedding_dropout(embedded))
        return self.output_norm(states)

    def _transformer(self, input: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
        length = input.shape[1]
        positions = torch.arange(self.max_len - length, self.max_len, device=input.device)
        x = self.item_embedding(input) * self.embedding_scale + self.position_embedding(positions)
        x = self.embedding_dropout(x)

        causal = torch.ones(length, length, dtype=torch.bool, device=input.device).tril()
        itself = torch.eye(length, dtype=torch.bool, device=input.device)
        # [B, 1, L, L], broadcast over heads; True = may attend.
        attention_mask = ((causal & is_item[:, None, :]) | itself).unsqueeze(1)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.output_norm(x)
