"""Collaborative filtering over the shared item table: the user vector of the CF encoder.

Two kinds, picked by `model.cf_user`:
  table    matrix factorisation: a learned row per user (one vector for all of the user's
           positions, fitted to all of the user's training items);
  history  item-based factorisation (FISM-like): the user is a learned linear map of the mean
           of the shared item rows of the items seen so far, so the vector at a position never
           depends on what comes after it.
Both read and score against the model's shared item table (the same object, not a copy), so CF
training moves the item vectors the sequence encoder reads and scores against.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from flm_dist.models.sequence import check_item_embedding

CFUserKind = Literal["table", "history"]


class MatrixFactorization(nn.Module):
    """A learned vector per user; its score for item i is the dot product with item row i."""

    causal = False

    def __init__(self, num_users: int, hidden: int, item_embedding: nn.Embedding):
        super().__init__()
        check_item_embedding(item_embedding, item_embedding.num_embeddings - 1, hidden)
        self.item_embedding = item_embedding
        self.user_embedding = nn.Embedding(num_users, hidden)
        nn.init.normal_(self.user_embedding.weight, std=hidden ** -0.5)

    def user_vectors(self, user: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """Long[B] user ids in 0..num_users-1 (the history `input` is not used) -> Float[B, H]."""
        return self.user_embedding(user)

    def prefix_vectors(self, user: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """[B, L, H]: the user's vector after each position of `input`; the same at every one."""
        return self.user_embedding(user)[:, None, :].expand(-1, input.shape[1], -1)


class HistoryCF(nn.Module):
    """The user after position t is Linear(mean of item rows of input[..t]), padding excluded.

    Leaves no per-user parameter: new users need no row, and a user vector used to predict the
    item at t+1 has seen nothing later (a per-user MF row has seen all of the user's training
    items, which a model fine-tuned on prefixes learns to lean on).
    """

    causal = True

    def __init__(self, hidden: int, item_embedding: nn.Embedding):
        super().__init__()
        check_item_embedding(item_embedding, item_embedding.num_embeddings - 1, hidden)
        self.item_embedding = item_embedding
        self.projection = nn.Linear(hidden, hidden)

    def _item_rows(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, L, H] item rows with padding zeroed, [B, L, 1] 1 where an item is present)."""
        present = (input != 0).unsqueeze(-1)
        return self.item_embedding(input) * present, present

    def prefix_vectors(self, user: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """Long[B, L] left-padded (0 = pad; `user` is not used) -> [B, L, H], causal."""
        rows, present = self._item_rows(input)
        return self.projection(rows.cumsum(dim=1) / present.cumsum(dim=1).clamp_min(1))

    def user_vectors(self, user: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """[B, H]: the vector after the last position of `input`, without the per-position work."""
        rows, present = self._item_rows(input)
        return self.projection(rows.sum(dim=1) / present.sum(dim=1).clamp_min(1))


def cf_encoder(kind: CFUserKind, num_users: int, hidden: int, item_embedding: nn.Embedding) -> nn.Module:
    if kind == "table":
        return MatrixFactorization(num_users, hidden, item_embedding)
    if kind == "history":
        return HistoryCF(hidden, item_embedding)
    raise ValueError(f"unknown cf_user {kind!r}; expected 'table' or 'history'")
