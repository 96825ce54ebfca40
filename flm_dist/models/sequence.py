"""Causal sequence encoders (SASRec transformer, GRU, LSTM) over left-padded item sequences.

Input is Long[B, L], right-aligned: the most recent item sits at position L-1 and item 0 is
padding. The output is one hidden state per position; position t has seen items 0..t only,
except with a frequency-filter mixer (BSARec, FMLP-Rec), which sees the whole row.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from flm_dist.models.dropout import Dropout, attention
from flm_dist.models.frequency import FrequencyFilter, MixerKind

EncoderKind = Literal["sasrec", "gru", "lstm"]
PositionOrigin = Literal["first", "last"]
NormPlacement = Literal["pre", "post"]

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
    """Transformer block. Pre-LN: x + Attn(LN(x)), then x + FFN(LN(x)). Post-LN (the original
    transformer, BERT, RecBole's SASRec): LN(x + Attn(x)), then LN(x + FFN(x)).

    `mixer` other than "attention" swaps the token mixer for a frequency filter (models/frequency.py):
    "bsarec" mixes it with attention by `filter_alpha`, "fmlp" replaces attention (no qkv weights).
    The filter is not causal; `is_item` [B, L] marks the positions it may read.
    """

    def __init__(self, hidden: int, heads: int, dropout: float, norm: NormPlacement = "pre",
                 mixer: MixerKind = "attention", max_len: int = 0, filter_alpha: float = 0.7,
                 filter_cutoff: int = 5):
        super().__init__()
        self.post_norm = norm == "post"
        self.heads = heads
        self.attention_dropout = Dropout(dropout)
        self.attention_norm = nn.LayerNorm(hidden)
        if mixer != "fmlp":
            self.qkv = nn.Linear(hidden, 3 * hidden)
            self.attention_output = nn.Linear(hidden, hidden)
        self.mixer = mixer
        self.filter_alpha = filter_alpha
        if mixer != "attention":
            self.filter = FrequencyFilter(mixer, hidden, max_len, filter_cutoff)
            # Post-LN BSARec normalises the filter branch on its own before mixing it with the
            # (normalised) attention branch; FMLP-Rec's only branch uses attention_norm.
            self.filter_norm = nn.LayerNorm(hidden) if self.post_norm and mixer == "bsarec" else None
        self.feedforward_norm = nn.LayerNorm(hidden)
        self.feedforward = nn.Sequential(
            nn.Linear(hidden, FEEDFORWARD_MULTIPLIER * hidden),
            nn.GELU(),
            nn.Linear(FEEDFORWARD_MULTIPLIER * hidden, hidden),
        )
        self.residual_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, is_item: torch.Tensor,
                last_only: bool = False) -> torch.Tensor:
        """[B, L, H] -> [B, L, H], or [B, 1, H] with `last_only`: the last position's output alone,
        which reads every position's keys and values but needs no other query, output projection or
        feed-forward."""
        if self.mixer != "attention":
            x = self._filter_mix(x, attention_mask, is_item)
            x = x[:, -1:] if last_only else x
        elif self.post_norm:
            attended = self._attention(x, attention_mask, last_only)
            x = self.attention_norm((x[:, -1:] if last_only else x) + self.residual_dropout(attended))
        else:
            attended = self._attention(self.attention_norm(x), attention_mask, last_only)
            x = (x[:, -1:] if last_only else x) + self.residual_dropout(attended)
        if self.post_norm:
            return self.feedforward_norm(x + self.residual_dropout(self.feedforward(x)))
        return x + self.residual_dropout(self.feedforward(self.feedforward_norm(x)))

    def _filter_mix(self, x: torch.Tensor, attention_mask: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
        """BSARec: alpha * filter branch + (1 - alpha) * attention branch, each with its own
        dropout and residual (post-LN: each normalised, as BSARecLayer mixes FrequencyLayer and
        MultiHeadAttention outputs); FMLP-Rec: the filter branch alone."""
        if self.mixer == "fmlp":
            if self.post_norm:
                return self.attention_norm(x + self.residual_dropout(self.filter(x, is_item)))
            return x + self.residual_dropout(self.filter(self.attention_norm(x), is_item))
        alpha = self.filter_alpha
        if self.post_norm:
            filtered = self.filter_norm(x + self.residual_dropout(self.filter(x, is_item)))
            attended = self.attention_norm(x + self.residual_dropout(self._attention(x, attention_mask)))
            return alpha * filtered + (1 - alpha) * attended
        normed = self.attention_norm(x)
        return (x + alpha * self.residual_dropout(self.filter(normed, is_item))
                + (1 - alpha) * self.residual_dropout(self._attention(normed, attention_mask)))

    def _attention(self, x: torch.Tensor, attention_mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if last_only:  # the projection stays whole: Opacus's per-example hooks must see the layer
            query, attention_mask = query[:, :, -1:], attention_mask[:, :, -1:]
        attended = attention(query, key, value, attention_mask, self.attention_dropout)
        return self.attention_output(attended.transpose(1, 2).reshape(batch, query.shape[2], hidden))


class SequenceEncoder(nn.Module):
    """Hidden state per position of a left-padded item sequence: Long[B, L] -> Float[B, L, H].

    SASRec: item embeddings scaled by sqrt(H) plus learned position embeddings, pre-LN causal
    transformer blocks, final LayerNorm; with `norm="post"`, unscaled embeddings plus positions
    through a LayerNorm, then post-LN blocks (RecBole's layout).

    `positions="first"` counts position ids from the row's first real item, so the state at
    position t is the same function of items 0..t whether it is trained as an inner position of
    a longer row or ranked as the last one (RecBole's SASRec trains on every prefix for that
    reason). `positions="last"` counts back from the most recent item (the original SASRec): a
    training position t < L-1 then sees other position ids than the same prefix does at ranking
    time. Either way the ids do not depend on how much left padding a batch has.

    Attention combines the causal mask with a key-padding mask; every query may also attend to
    itself, so fully padded rows (and padded queries) never see an all-masked row and never
    produce NaN.

    `mixer` "bsarec" or "fmlp" (SASRec only) adds or substitutes a frequency filter in every block
    (see CausalSelfAttentionBlock); the encoder is then NOT causal: position t also sees the items
    after it in the row, so only the last position may be trained on (`train.windows=prefixes`).

    GRU/LSTM: a causal RNN over the embeddings, then the same final LayerNorm. Padded steps come
    first and feed a zero input, so real positions never depend on padding-row contents.

    `item_embedding` is shared with the rest of the model; when None a fresh table is created.
    """

    def __init__(self, num_items: int, hidden: int, max_len: int, layers: int, heads: int,
                 dropout: float, kind: EncoderKind = "sasrec",
                 item_embedding: nn.Embedding | None = None, positions: PositionOrigin = "last",
                 norm: NormPlacement = "pre", mixer: MixerKind = "attention", filter_alpha: float = 0.7,
                 filter_cutoff: int = 5):
        super().__init__()
        if item_embedding is None:
            item_embedding = item_embedding_table(num_items, hidden)
        check_item_embedding(item_embedding, num_items, hidden)
        if positions not in ("first", "last"):
            raise ValueError(f"unknown positions {positions!r}; expected 'first' or 'last'")
        if mixer not in ("attention", "bsarec", "fmlp"):
            raise ValueError(f"unknown mixer {mixer!r}; expected 'attention', 'bsarec' or 'fmlp'")
        if mixer != "attention" and kind != "sasrec":
            raise ValueError(f"mixer {mixer!r} needs the sasrec encoder, got {kind!r}")
        self.kind = kind
        self.max_len = max_len
        self.positions = positions
        # The transformer masks padding keys and keeps position ids put, so the padding columns
        # before a row's first item change none of its states; a recurrent state drifts over them.
        self.left_padding_free = kind == "sasrec"
        self.item_embedding = item_embedding
        self.embedding_dropout = Dropout(dropout)
        # Post-LN blocks end in a LayerNorm already.
        self.output_norm = nn.Identity() if kind == "sasrec" and norm == "post" else nn.LayerNorm(hidden)
        if kind == "sasrec":
            if hidden % heads != 0:
                raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
            if norm not in ("pre", "post"):
                raise ValueError(f"unknown norm {norm!r}; expected 'pre' or 'post'")
            # Post-LN normalises the embedding sum itself (as RecBole does), so nothing is scaled.
            self.embedding_scale = math.sqrt(hidden) if norm == "pre" else 1.0
            self.input_norm = nn.LayerNorm(hidden) if norm == "post" else nn.Identity()
            self.position_embedding = nn.Embedding(max_len, hidden)
            nn.init.normal_(self.position_embedding.weight, std=hidden ** -0.5)
            self.blocks = nn.ModuleList(
                CausalSelfAttentionBlock(hidden, heads, dropout, norm, mixer, max_len, filter_alpha, filter_cutoff)
                for _ in range(layers))
        elif kind in ("gru", "lstm"):
            recurrent = nn.GRU if kind == "gru" else nn.LSTM
            self.recurrent = recurrent(hidden, hidden, num_layers=layers, batch_first=True,
                                       dropout=dropout if layers > 1 else 0.0)
        else:
            raise ValueError(f"unknown encoder kind {kind!r}; expected 'sasrec', 'gru' or 'lstm'")

    def forward(self, input: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Long[B, L] -> [B, L, H]; with `last_only`, [B, 1, H]: the last position's state, the
        same values, without the last transformer block's work for the other positions."""
        length = input.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        is_item = input != 0
        if self.kind == "sasrec":
            return self._transformer(input, is_item, last_only)
        embedded = self.item_embedding(input) * is_item.unsqueeze(-1)
        states, _ = self.recurrent(self.embedding_dropout(embedded))
        return self.output_norm(states[:, -1:] if last_only else states)

    def _transformer(self, input: torch.Tensor, is_item: torch.Tensor, last_only: bool) -> torch.Tensor:
        length = input.shape[1]
        if self.positions == "first":
            # Padding rows get id 0 too; they are masked as keys and never ranked.
            positions = (is_item.cumsum(1) - 1).clamp(min=0)
        else:
            positions = torch.arange(self.max_len - length, self.max_len, device=input.device)
        x = self.item_embedding(input) * self.embedding_scale + self.position_embedding(positions)
        x = self.embedding_dropout(self.input_norm(x))

        causal = torch.ones(length, length, dtype=torch.bool, device=input.device).tril()
        itself = torch.eye(length, dtype=torch.bool, device=input.device)
        # [B, 1, L, L], broadcast over heads; True = may attend.
        attention_mask = ((causal & is_item[:, None, :]) | itself).unsqueeze(1)
        for index, block in enumerate(self.blocks):
            x = block(x, attention_mask, is_item, last_only=last_only and index == len(self.blocks) - 1)
        return self.output_norm(x[:, -1:] if last_only else x)
