"""Item side information in the model: an attribute encoder fused into the shared item table, and
the attribute-prediction objective.

Every item has a bag of attribute indices (`item_attributes`, [R, K], 0 = none; rows 1..N are the
items with interactions, rows N+1..R-1 known cold items, row 0 padding; see
flm_dist/data/item_features.py). The attribute encoder pools the bag: the mean of the item's
attribute embeddings (zero for an item without features). `FusedItemEmbedding` then gives every
consumer of the shared item table (the CF encoder, the sequence encoder and scoring) the fusion
of the item's id row e and its pooled attributes a:

    add      e + a
    gate     g * e + (1 - g) * a, g = sigmoid(W [e ; a] + b) per dimension (starts at 1/2)
    concat   W [e ; a] + b, starting at W = [I | I], b = 0 (that is, at `add`)

A cold item has no id row: its e is zero and it is scored from a alone. So is an item held out as
cold (`without_id_rows`): its id row exists but no positive ever trains it, and in a full softmax
every step would push it down as a negative, teaching the model only that the item is never
chosen. Row 0 (padding) stays zero whatever the fusion.

The attribute objective (`attribute_loss`) is a multi-label binary cross-entropy over every
attribute, with logits = vector . attribute embedding (no extra parameters, so a zero weight
leaves nothing unused under DDP): from the item's id row (S3-Rec's associated-attribute
objective: the id rows must learn what the attributes say) and from the sequence state that
predicts the item (the context must know the next item's attributes).

Plain PyTorch: no Ray, no torch.distributed.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from flm_dist.models.losses import masked_mean

ItemFeatureFusion = Literal["none", "add", "gate", "concat"]
FUSIONS = ("add", "gate", "concat")


class AttributeEncoder(nn.Module):
    """Mean of an item's attribute embeddings; the attribute table is also the output layer of
    the attribute objective. `item_attributes` is data, not a weight: a non-persistent buffer
    rebuilt from the prepared data (the vocabulary hash ties a checkpoint to it)."""

    def __init__(self, item_attributes: torch.Tensor, num_attributes: int, hidden: int):
        super().__init__()
        if item_attributes.dim() != 2 or item_attributes.dtype != torch.long:
            raise ValueError("item_attributes must be a LongTensor [items + 1 (+ cold items), attributes per item]")
        if num_attributes <= 0:
            raise ValueError("num_attributes must be positive")
        if int(item_attributes.max()) > num_attributes or int(item_attributes.min()) < 0:
            raise ValueError(f"item_attributes holds indices outside 0..{num_attributes}")
        self.num_attributes = num_attributes
        self.attribute_embedding = nn.Embedding(num_attributes + 1, hidden, padding_idx=0)
        nn.init.normal_(self.attribute_embedding.weight, std=hidden ** -0.5)
        with torch.no_grad():
            self.attribute_embedding.weight[0].zero_()
        self.register_buffer("item_attributes", item_attributes.clone(), persistent=False)
        self._pooling: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_rows(self) -> int:
        """Items the encoder knows: padding, the N items with interactions and the cold items."""
        return self.item_attributes.shape[0]

    def pooled(self) -> torch.Tensor:
        """[R, H] every row's mean attribute embedding (0 for a row without attributes)."""
        pooling, transposed = self._pooling_matrices()
        return _SparsePooling.apply(self.attribute_embedding.weight, pooling, transposed)

    def pooled_onto(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` [R, H] + `pooled()`, with row 0 (padding) zero, in one pass; the gradient reaches
        `rows` without a copy (see `_AddPooled`)."""
        pooling, transposed = self._pooling_matrices()
        return _AddPooled.apply(rows, self.attribute_embedding.weight, pooling, transposed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Long[...] item ids -> [..., H] the mean of their attribute embeddings (0 without any):
        pools just these ids' bags, for lookups of a few items (a request, an evaluation batch)
        where pooling the whole catalogue would cost more."""
        bags = self.item_attributes[ids]
        pooled = F.embedding_bag(bags.reshape(-1, bags.shape[-1]), self.attribute_embedding.weight,
                                 mode="mean", padding_idx=0)
        return pooled.reshape(*ids.shape, -1)

    def _pooling_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sparse [R, A + 1] matrix of 1 / bag size weights, and its transpose, on the bags'
        device: derived from `item_attributes`, so kept out of the state dict and of the buffers
        DDP broadcasts every step."""
        bags = self.item_attributes
        if self._pooling is None or self._pooling[0].device != bags.device:
            present = bags != 0
            sizes = present.sum(1)
            rows = torch.arange(bags.shape[0], device=bags.device).repeat_interleave(sizes)
            columns = bags[present]  # row-major, like `rows`
            weights = (1.0 / sizes.clamp(min=1)).repeat_interleave(sizes)
            shape = (bags.shape[0], self.num_attributes + 1)
            self._pooling = (_csr(rows, columns, weights, shape), _csr(columns, rows, weights, shape[::-1]))
        return self._pooling

    def logits(self, vectors: torch.Tensor) -> torch.Tensor:
        """[M, H] -> [M, A] attribute logits (dot products with the attribute table)."""
        return vectors @ self.attribute_embedding.weight[1:].T

    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        """Long[M] -> [M, A] multi-hot attributes of each item."""
        hot = torch.zeros(ids.shape[0], self.num_attributes + 1, device=ids.device)
        hot.scatter_(1, self.item_attributes[ids], 1.0)
        return hot[:, 1:]

    def has_attributes(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.item_attributes[ids] != 0).any(-1)


def _csr(rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Sparse CSR matrix of the (row, column, value) entries; repeated entries add up."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, columns]), values, shape, check_invariants=True).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()


class _SparsePooling(torch.autograd.Function):
    """pooling @ table, with the gradient transposed @ grad. Pooling every item's bag as one
    sparse matmul, forward and backward, is 4x faster on a CPU than `F.embedding_bag` and its
    dense backward (Sports: 18,358 bags of up to 16 of 2,277 attributes), and each output row is
    a sum in a fixed order, so both directions are deterministic. Kept in fp32 under autocast."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, pooling: torch.Tensor, transposed: torch.Tensor) -> torch.Tensor:
        ctx.transposed = transposed
        with torch.autocast(table.device.type, enabled=False):
            return pooling @ table.float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        with torch.autocast(grad.device.type, enabled=False):
            return ctx.transposed @ grad.float(), None, None


class _AddPooled(torch.autograd.Function):
    """rows + pooling @ table with row 0 (padding) zero: one sparse addmm forward; backward passes
    the incoming gradient on to `rows` as it is (row 0 zeroed, in a copy, only where a consumer
    gave the padding row a gradient). `rows + _SparsePooling` then `rows[0] = 0` in place cost
    two copies of the [R, H] gradient per step: one for the in-place write, one because the
    addition handed the same gradient to both of its inputs. Kept in fp32 under autocast."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, table: torch.Tensor, pooling: torch.Tensor,
                transposed: torch.Tensor) -> torch.Tensor:
        ctx.transposed = transposed
        with torch.autocast(rows.device.type, enabled=False):
            fused = torch.addmm(rows.float(), pooling, table.float())
        fused[0] = 0
        return fused

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to_dense().float()  # sparse when only lookups read the rows
            grad_table = ctx.transposed @ grad if ctx.needs_input_grad[1] else None
        # On a GPU the check would cost a host sync; the copy is cheap there.
        if ctx.needs_input_grad[0] and (grad.device.type != "cpu" or bool(grad[0].any())):
            grad = grad.clone()
            grad[0] = 0
        return grad if ctx.needs_input_grad[0] else None, grad_table, None, None


def attribute_loss(encoder: AttributeEncoder, vectors: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the rows of `ids` [M] that are items with attributes (id 0 = no target) of the
    binary cross-entropy, averaged over every attribute, of `vectors` [M, H] predicting the item's
    attributes. 0 (not NaN) when no row has a target."""
    usable = (ids != 0) & encoder.has_attributes(ids)
    logits = encoder.logits(vectors).float()
    per_row = F.binary_cross_entropy_with_logits(logits, encoder.targets(ids), reduction="none").mean(-1)
    return masked_mean(per_row, usable)


class FusedItemEmbedding(nn.Module):
    """What the encoders see as the shared item table when the model has item features: looked up
    like `nn.Embedding` (`num_embeddings`, `embedding_dim`, `padding_idx`, `module(ids)`), each
    row the fusion of the item's id row and its pooled attributes (module docstring).

    Ids N+1.. (cold items) are accepted: their id part is zero.
    """

    def __init__(self, item_embedding: nn.Embedding, attributes: AttributeEncoder, fusion: ItemFeatureFusion):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown item_features {fusion!r}; expected one of {('none',) + FUSIONS}")
        if attributes.num_rows < item_embedding.num_embeddings:
            raise ValueError(f"item_attributes has {attributes.num_rows} rows; the item table has "
                             f"{item_embedding.num_embeddings}")
        hidden = item_embedding.embedding_dim
        self.fusion = fusion
        self.item_embedding = item_embedding
        self.attributes = attributes
        self.num_embeddings = item_embedding.num_embeddings
        self.embedding_dim = hidden
        self.padding_idx = 0
        self.register_buffer("has_id_row", torch.arange(attributes.num_rows) < self.num_embeddings, persistent=False)
        self._ids_held_out = False  # whether `without_id_rows` cleared any of rows 1..N (saves a device sync)
        self._sharing, self._shared = False, None
        if fusion == "gate":
            self.gate = nn.Linear(2 * hidden, hidden)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        elif fusion == "concat":
            self.projection = nn.Linear(2 * hidden, hidden)
            with torch.no_grad():
                self.projection.weight.copy_(torch.cat([torch.eye(hidden), torch.eye(hidden)], dim=1))
                self.projection.bias.zero_()

    @property
    def sparse(self) -> bool:
        return self.item_embedding.sparse

    @property
    def num_cold(self) -> int:
        return self.attributes.num_rows - self.num_embeddings

    def without_id_rows(self, ids: torch.Tensor) -> None:
        """Score items `ids` (1..N) from their attributes alone, like cold items: the items held
        out as cold by prepare (data/cold_items.py). Data, not a weight: not in the state dict."""
        self.has_id_row[ids] = False
        self._ids_held_out = True

    @contextmanager
    def rows_shared(self) -> Iterator[None]:
        """Within, the fused rows are computed once, on first use, and every lookup and `table()`
        reads them: a training step fuses the catalogue once for its inputs, its scores and its
        CF term instead of once for each. Nested uses share the outermost one's rows."""
        if self._sharing:
            yield
            return
        self._sharing, self._shared = True, None
        try:
            yield
        finally:
            self._sharing, self._shared = False, None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Long[...] item ids (0 = padding, N+1.. cold) -> [..., H] fused rows: read from the
        step's rows inside `rows_shared`, else fused for just these ids."""
        if self._sharing:
            # Row 0 is zero and needs no gradient. On a CPU the lookups' gradient is sparse (just
            # the rows read), added to the scores' dense one: no zero-filled [R, H] table per step.
            sparse = ids.device.type == "cpu" and self.fusion == "add" and not torch.compiler.is_compiling()
            return F.embedding(ids, self._rows(), padding_idx=0, sparse=sparse)
        fused = self._fuse(self._identity(ids), self.attributes(ids))
        return fused * (ids != 0).unsqueeze(-1).to(fused.dtype)

    def table(self, cold: bool = False) -> torch.Tensor:
        """[N + 1, H] fused rows of every item with interactions (row 0 zero); with `cold`, the
        known cold items' rows follow ([N + 1 + C, H])."""
        rows, count = self._rows(), self.attributes.num_rows if cold else self.num_embeddings
        # Slicing all of the rows would still cost a zero-filled [R, H] gradient and a copy into it.
        return rows if count == rows.shape[0] else rows[:count]

    def _rows(self) -> torch.Tensor:
        """[R, H] the fused row of every id the encoder knows, cold items included."""
        if self._shared is not None:
            return self._shared
        if self.fusion == "add":
            rows = self.attributes.pooled_onto(self._catalogue_identity())
        else:
            rows = self._fuse(self._catalogue_identity(), self.attributes.pooled())
            rows[0] = 0  # padding; in place, which leaves its gradient zero as the mask in forward does
        if self._sharing:
            self._shared = rows
        return rows

    def _identity(self, ids: torch.Tensor) -> torch.Tensor:
        """Item ids [...] -> [..., H] their id rows; zero (the padding row's) for an id without one."""
        return self.item_embedding(torch.where(self.has_id_row[ids], ids, torch.zeros_like(ids)))

    def _catalogue_identity(self) -> torch.Tensor:
        """[R, H] every id's row (`_identity` of 0..R-1). A dense table is read whole, not gathered:
        the gather and its scatter-add gradient over the [N + 1, H] table cost about a tenth of a
        training step on a CPU (docs/benchmarks.md). Sparse gradients need the lookup."""
        if self.item_embedding.sparse:
            return self._identity(torch.arange(self.attributes.num_rows, device=self.has_id_row.device))
        weight = self.item_embedding.weight
        # The padding row is zero, so masking an id's row equals looking up the padding row instead.
        identity = (weight * self.has_id_row[:self.num_embeddings].unsqueeze(-1).to(weight.dtype)
                    if self._ids_held_out else weight)
        if self.num_cold:
            identity = torch.cat([identity, identity.new_zeros(self.num_cold, self.embedding_dim)])
        return identity

    def _fuse(self, identity: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        """Id rows [..., H] and their pooled attributes [..., H] -> [..., H] fused rows."""
        if self.fusion == "add":
            return identity + attributes
        if self.fusion == "gate":
            gate = torch.sigmoid(self.gate(torch.cat([identity, attributes], dim=-1)))
            return gate * identity + (1 - gate) * attributes
        return self.projection(torch.cat([identity, attributes], dim=-1))
