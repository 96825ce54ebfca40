"""Matrix-factorisation collaborative filtering over the shared item table."""

from __future__ import annotations

import torch
from torch import nn

from flm_dist.models.sequence import check_item_embedding


class MatrixFactorization(nn.Module):
    """A learned vector per user; its score for item i is the dot product with item row i.

    `item_embedding` is the model's shared table (the same object, not a copy), so CF training
    moves the item vectors the sequence encoder reads and scores against.
    """

    def __init__(self, num_users: int, hidden: int, item_embedding: nn.Embedding):
        super().__init__()
        check_item_embedding(item_embedding, item_embedding.num_embeddings - 1, hidden)
        self.item_embedding = item_embedding
        self.user_embedding = nn.Embedding(num_users, hidden)
        nn.init.normal_(self.user_embedding.weight, std=hidden ** -0.5)

    def user_vectors(self, user: torch.Tensor) -> torch.Tensor:
        """Long[B] user ids in 0..num_users-1 -> Float[B, H]."""
        return self.user_embedding(user)
