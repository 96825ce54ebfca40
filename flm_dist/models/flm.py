"""The joint FLM model: CF user vectors + sequence encoder, fused, with a flow over the result.

All item scoring uses dot products against ONE item table (`item_embedding`, row 0 = padding)
that the CF and sequence parts share by reference. Training batches are dicts of tensors:
`user` Long[B], `input` Long[B, L] left-padded (0 = pad), `target` Long[B, L] (next item for each
position, 0 = no target).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from flm_dist.models.attributes import AttributeEncoder, FusedItemEmbedding, ItemFeatureFusion, attribute_loss
from flm_dist.models.cf import CFUserKind, cf_encoder
from flm_dist.models.flow import FlowKind, NormalizingFlow
from flm_dist.models.frequency import MixerKind
from flm_dist.models.losses import (
    ItemDistribution,
    bpr_loss,
    full_softmax_ce,
    intent_info_nce,
    item_rows,
    masked_mean,
    sample_items,
    sampled_softmax_ce,
    two_view_info_nce,
)
from flm_dist.models.sequence import (
    EncoderKind,
    NormPlacement,
    PositionOrigin,
    SequenceEncoder,
    item_embedding_table,
)

FusionKind = Literal["concat", "sum", "gate"]
UserHeadKind = Literal["none", "linear"]
RepresentationSource = Literal["fused", "sequence", "cf"]
LOSS_TERMS = ("seq", "cf", "fused", "flow", "contrast", "attributes", "intent")


class Fusion(nn.Module):
    """Combine the CF user vector and the latest sequence state into one user vector.

    concat: Linear([cf; seq]); sum: cf + seq; gate: g * cf + (1 - g) * seq with a per-dimension
    gate g = sigmoid(Linear([cf; seq])), letting the model lean on CF for users with short
    histories and on the sequence otherwise.
    """

    def __init__(self, kind: FusionKind, hidden: int):
        super().__init__()
        if kind not in ("concat", "sum", "gate"):
            raise ValueError(f"unknown fusion {kind!r}; expected 'concat', 'sum' or 'gate'")
        self.kind = kind
        if kind != "sum":
            self.projection = nn.Linear(2 * hidden, hidden)

    def forward(self, cf_vector: torch.Tensor, sequence_vector: torch.Tensor) -> torch.Tensor:
        if self.kind == "sum":
            return cf_vector + sequence_vector
        projected = self.projection(torch.cat([cf_vector, sequence_vector], dim=-1))
        if self.kind == "concat":
            return projected
        gate = torch.sigmoid(projected)
        return gate * cf_vector + (1 - gate) * sequence_vector


def sequence_head(kind: UserHeadKind, hidden: int) -> nn.Module:
    """The map from the sequence encoder's state to the vector scored against the items.

    none: the state itself (SASRec). linear: W h + b, starting at W = I, b = 0; W decouples the
    query space from the tied item table, and b gives every item the score b . e_i whatever the
    history (a popularity term).
    """
    if kind == "none":
        return nn.Identity()
    if kind != "linear":
        raise ValueError(f"unknown user_head {kind!r}; expected 'none' or 'linear'")
    head = nn.Linear(hidden, hidden)
    with torch.no_grad():
        head.weight.copy_(torch.eye(hidden))
        head.bias.zero_()
    return head


class FLMModel(nn.Module):
    """Pretraining-FLM: CF + sequence encoder over a shared item table, fused user vectors, and a
    normalising flow giving an exact density of the fused user representation.

    With `flow_stop_gradient` (default) the flow is fitted to detached representations: the flow
    NLL can be made arbitrarily low by shrinking the representation (log-det grows without bound
    as the data collapses), so letting it reach the encoders would reward collapse.

    With `item_features` other than "none" (and `item_attributes` [N + 1 + C, K], `num_attributes`)
    every item row the CF encoder, the sequence encoder and scoring see is the fusion of its id
    row and its pooled attributes (models/attributes.py), and C known cold items can be scored
    from their attributes alone (`catalog_table`). With "none" the model is exactly the id-only one.
    """

    def __init__(self, num_users: int, num_items: int, hidden: int, max_len: int, layers: int,
                 heads: int, dropout: float, encoder: EncoderKind = "sasrec",
                 fusion: FusionKind = "concat", flow_layers: int = 4, flow_hidden: int = 128,
                 flow_kind: FlowKind = "affine", flow_stop_gradient: bool = True,
                 positions: PositionOrigin = "last", norm: NormPlacement = "pre",
                 cf_user: CFUserKind = "table", user_head: UserHeadKind = "none",
                 item_features: ItemFeatureFusion = "none", item_attributes: torch.Tensor | None = None,
                 num_attributes: int = 0, mixer: MixerKind = "attention", filter_alpha: float = 0.7,
                 filter_cutoff: int = 5):
        super().__init__()
        self.num_items = num_items
        self.hidden = hidden
        self.flow_stop_gradient = flow_stop_gradient
        self.item_embedding = item_embedding_table(num_items, hidden)
        items = self.item_embedding
        self.item_features = None  # FusedItemEmbedding with side information; no module without
        if item_features != "none":
            if item_attributes is None:
                raise ValueError(f"item_features={item_features!r} needs item_attributes")
            attributes = AttributeEncoder(item_attributes, num_attributes, hidden)
            self.item_features = items = FusedItemEmbedding(self.item_embedding, attributes, item_features)
        self.cf = cf_encoder(cf_user, num_users, hidden, items)
        self.sequence = SequenceEncoder(num_items, hidden, max_len, layers, heads, dropout,
                                        kind=encoder, item_embedding=items,
                                        positions=positions, norm=norm, mixer=mixer,
                                        filter_alpha=filter_alpha, filter_cutoff=filter_cutoff)
        self.sequence_head = sequence_head(user_head, hidden)
        self.fusion = Fusion(fusion, hidden)
        self.flow = NormalizingFlow(hidden, flow_layers, flow_hidden, flow_kind)

    @property
    def left_padding_free(self) -> bool:
        """Whether a user's vector is the same with fewer padding columns before the history
        (the CF encoders never see padding), so an input may be cut to its longest row."""
        return self.sequence.left_padding_free

    def initialize_normal(self, std: float) -> None:
        """RecBole's SASRec initialisation: N(0, std) for the item, position and attribute tables
        (padding rows kept at 0) and the sequence encoder's linear layers, zero biases. The CF
        encoder, the item-feature fusion, the user head and the flow keep theirs (identity starts,
        ActNorm's data-dependent one)."""
        for name, module in self.sequence.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("item_embedding"):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
        tables = [self.item_embedding, getattr(self.sequence, "position_embedding", None)]
        if self.item_features is not None:
            tables.append(self.item_features.attributes.attribute_embedding)
        for table in filter(None, tables):
            nn.init.normal_(table.weight, std=std)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()

    def item_table(self) -> torch.Tensor:
        """[num_items + 1, H]; row 0 is padding and must never be ranked."""
        if self.item_features is not None:
            return self.item_features.table()
        return self.item_embedding.weight

    def catalog_table(self) -> torch.Tensor:
        """[num_items + 1 + C, H]: `item_table` followed by the rows of the C known cold items
        (scored from their attributes; none without item features). Row 0 is padding."""
        if self.item_features is not None:
            return self.item_features.table(cold=True)
        return self.item_table()

    def sequence_states(self, input: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Long[B, L] left-padded -> [B, L, H] state per position (after the user head); causal
        unless the encoder has a frequency-filter mixer. `last_only`: [B, 1, H], the last
        position's state alone, computed with less work (SequenceEncoder.forward)."""
        return self.sequence_head(self.sequence(input, last_only))

    def user_representation(self, user: torch.Tensor, input: torch.Tensor,
                            source: RepresentationSource = "fused") -> torch.Tensor:
        """[B, H] user vector: CF vector, last-position sequence state, or their fusion."""
        if source == "cf":
            return self.cf.user_vectors(user, input)
        if source == "sequence":
            return self.sequence_states(input, last_only=True)[:, -1]
        if source == "fused":
            states = self.sequence_states(input, last_only=True)[:, -1]
            return self.fusion(self.cf.user_vectors(user, input), states)
        raise ValueError(f"unknown source {source!r}; expected 'fused', 'sequence' or 'cf'")

    def score_all(self, user: torch.Tensor, input: torch.Tensor,
                  source: RepresentationSource = "fused") -> torch.Tensor:
        """[B, num_items + 1] dot-product scores; column 0 (padding) is -inf."""
        representation = self.user_representation(user, input, source)
        scores = representation @ self.item_table()[1:].T
        return F.pad(scores, (1, 0), value=-math.inf)

    def flow_latent(self, user: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """[B, H] flow latent (approximately standard normal) of the fused representation."""
        return self.flow(self.user_representation(user, input, "fused"))[0]

    def flow_log_density(self, user: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """[B] exact log-density (nats, summed over H dims) of the fused representation."""
        return self.flow.log_prob(self.user_representation(user, input, "fused"))

    @torch.no_grad()
    def initialize_flow(self, batch: dict[str, torch.Tensor]) -> None:
        """Run the flow's ActNorm data-dependent init on this batch's fused representations.

        Call it on one process before replicating the model (e.g. before DDP, which broadcasts
        rank 0's parameters once at wrap time): left to the first training step, each rank would
        initialise from its own batch and the flow parameters would differ across ranks.
        """
        self.flow(self.user_representation(batch["user"], batch["input"], "fused"))

    def forward(self, batch: dict[str, torch.Tensor], weights: dict[str, float],
                **loss_options: object) -> dict[str, torch.Tensor]:
        """Same as `losses`; exists so wrappers that hook `forward` (DDP, FSDP) see the step."""
        with self.item_rows_shared():
            return self.losses(batch, weights, **loss_options)

    def item_rows_shared(self) -> AbstractContextManager[None]:
        """Within, the fused item rows (with item features) are computed once and shared by
        every use: see FusedItemEmbedding.rows_shared. Without item features, nothing to share."""
        return self.item_features.rows_shared() if self.item_features is not None else nullcontext()

    def losses(self, batch: dict[str, torch.Tensor], weights: dict[str, float],
               cf_loss: Literal["ce", "bpr"] = "ce",
               softmax: Literal["full", "sampled"] = "full", num_negatives: int = 100,
               popularity: ItemDistribution | None = None,
               chunk_size: int | None = None,
               seq_positions: Literal["all", "last"] = "all",
               max_in_batch_negatives: int = 0,
               contrast_temperature: float = 1.0,
               label_smoothing: float = 0.0,
               intent_temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Each loss term with a nonzero weight, plus `total` = sum of weight * term.

        seq: next-item CE at every position with a target (`seq_positions="last"`: at the last
        position only, for windows whose only target is there). cf: CF loss ("ce": softmax CE,
        "bpr": BPR with `num_negatives` uniform negatives per user) of the MF user vector against
        all of the user's targets, or (history CF) of the vector after each position against the
        next item, at the positions `seq_positions` picks. fused: CE of the fused vector for the
        last target. flow: NLL per dimension of the fused vector under the flow. contrast:
        InfoNCE between the last sequence state and that of a second encoder pass with other
        dropout masks (see two_view_info_nce), at `contrast_temperature`, over
        `batch["contrast_input"]` when the batch has it (windows with the same targets: a tensor,
        or a tuple of tensors of consecutive rows, each cut to its own width) and over `input`
        again otherwise. attributes (item
        features only): the attribute objective of models/attributes.py, the mean of its item part
        (each target's id row) and its context part (the states predicting those targets, at the
        positions `seq_positions` picks). intent: InfoNCE between the last sequence state and the
        nearest of `batch["intent_centroids"]` [K, H] (see intent_info_nce), at
        `intent_temperature`. `softmax` picks
        full or sampled softmax (in-batch + `num_negatives` sampled from `popularity` or uniform,
        logQ-corrected) for the CE terms; `chunk_size` bounds the full-softmax logit block (see
        full_softmax_ce), `max_in_batch_negatives` the sampled one (see sampled_softmax_ce);
        `label_smoothing` smooths every full-softmax CE term (seq, fused, CF "ce").
        Terms with weight 0 are not computed.
        """
        unknown = set(weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; expected {LOSS_TERMS}")
        active = {term for term in LOSS_TERMS if weights.get(term, 0.0) != 0.0}
        if not active:
            raise ValueError("every loss weight is zero; nothing to train")

        user, input, target = batch["user"], batch["input"], batch["target"]
        table = self.item_table()

        if softmax not in ("full", "sampled"):
            raise ValueError(f"unknown softmax {softmax!r}; expected 'full' or 'sampled'")

        def softmax_ce(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            if softmax == "full":
                return full_softmax_ce(hidden, table, targets, chunk_size, label_smoothing)
            return sampled_softmax_ce(hidden, table, targets, num_negatives, popularity,
                                      sparse_gradient=self.item_embedding.sparse,
                                      max_in_batch=max_in_batch_negatives)

        terms: dict[str, torch.Tensor] = {}
        # Every term but an all-positions `seq` or `attributes` reads the last state only.
        states = (self.sequence_states(input, last_only=seq_positions == "last")
                  if active & {"seq", "fused", "flow", "contrast", "attributes", "intent"} else None)
        cf_vectors = None  # [B, H] per user (table) or [B, L, H] per position (history)
        if active & {"cf", "fused", "flow"}:
            cf_vectors = (self.cf.prefix_vectors(user, input) if self.cf.causal
                          else self.cf.user_vectors(user, input))

        if "seq" in active:
            if seq_positions == "last":
                terms["seq"] = softmax_ce(states[:, -1], target[:, -1])
            else:
                terms["seq"] = softmax_ce(states.reshape(-1, self.hidden), target.reshape(-1))
        if "cf" in active:
            terms["cf"] = self._cf_loss(cf_vectors, target, cf_loss, softmax, softmax_ce,
                                        num_negatives, seq_positions, label_smoothing)
        if active & {"fused", "flow"}:
            fused = self.fusion(cf_vectors[:, -1] if self.cf.causal else cf_vectors, states[:, -1])
            if "fused" in active:
                terms["fused"] = softmax_ce(fused, target[:, -1])
            if "flow" in active:
                flow_input = fused.detach() if self.flow_stop_gradient else fused
                terms["flow"] = -self.flow.log_prob(flow_input).mean() / self.hidden

        if "contrast" in active:
            # The positives' windows: the batch's own (a second dropout pass) or other windows, in
            # consecutive runs of rows that may each be cut to fewer positions.
            runs = batch.get("contrast_input", input)
            runs = runs if isinstance(runs, tuple) else (runs,)
            positive = torch.cat([self.sequence_states(run, last_only=True)[:, -1] for run in runs])
            terms["contrast"] = two_view_info_nce(states[:, -1], positive, target[:, -1], contrast_temperature)

        if "attributes" in active:
            terms["attributes"] = self.attribute_loss(states, target, seq_positions)

        if "intent" in active:
            terms["intent"] = intent_info_nce(states[:, -1], batch["intent_centroids"], target[:, -1],
                                              intent_temperature)

        terms["total"] = sum(weights[name] * value for name, value in terms.items())
        return terms

    def attribute_loss(self, states: torch.Tensor, target: torch.Tensor,
                       seq_positions: Literal["all", "last"] = "all") -> torch.Tensor:
        """The attribute objective for sequence states [B, L, H] and their next items [B, L]."""
        if self.item_features is None:
            raise ValueError("the attributes loss needs item features (model.item_features add, gate or concat)")
        if seq_positions == "last":
            states, target = states[:, -1:], target[:, -1:]
        targets = target.reshape(-1)
        encoder = self.item_features.attributes
        from_item = attribute_loss(encoder, self.item_embedding(targets), targets)
        from_context = attribute_loss(encoder, states.reshape(-1, self.hidden), targets)
        return (from_item + from_context) / 2

    def _cf_loss(self, cf_vectors: torch.Tensor, target: torch.Tensor, kind: Literal["ce", "bpr"],
                 softmax: Literal["full", "sampled"], softmax_ce, num_negatives: int,
                 seq_positions: Literal["all", "last"], label_smoothing: float = 0.0) -> torch.Tensor:
        """cf_vectors: [B, H], one per user (table), or [B, L, H], one per position (history)."""
        if kind not in ("ce", "bpr"):
            raise ValueError(f"unknown cf_loss {kind!r}; expected 'ce' or 'bpr'")
        per_user = cf_vectors.dim() == 2
        if not per_user and seq_positions == "last":
            cf_vectors, target = cf_vectors[:, -1:], target[:, -1:]
        has_target = target != 0
        table = self.item_table()
        if kind == "ce" and softmax == "full" and per_user:
            # The MF vector is the same at every position, so the log-partition is computed once
            # per user ([B, N]) and reused for all of that user's targets instead of a [B*L, N]
            # softmax.
            logits = (cf_vectors @ table[1:].T).float()
            log_partition = torch.logsumexp(logits, dim=-1, keepdim=True)
            target_logits = logits.gather(1, (target - 1).clamp_min(0))
            if label_smoothing:  # as F.cross_entropy smooths: eps of the mass spread over all items
                target_logits = ((1 - label_smoothing) * target_logits
                                 + label_smoothing * logits.mean(-1, keepdim=True))
            return masked_mean(log_partition - target_logits, has_target)
        per_position = cf_vectors[:, None, :].expand(-1, target.shape[1], -1) if per_user else cf_vectors
        if kind == "ce":
            return softmax_ce(per_position.reshape(-1, self.hidden), target.reshape(-1))
        # One uniform negative set per user, shared by all of that user's positives.
        sparse = self.item_embedding.sparse
        negatives = sample_items(cf_vectors.shape[0] * num_negatives, self.num_items,
                                 device=target.device).view(-1, num_negatives)
        negative_rows = item_rows(table, negatives, sparse)
        positive_scores = torch.einsum("blh,blh->bl", per_position, item_rows(table, target, sparse))
        if per_user:
            negative_scores = torch.einsum("bh,bkh->bk", cf_vectors, negative_rows)
            negative_scores = negative_scores[:, None, :].expand(-1, target.shape[1], -1)
        else:
            negative_scores = torch.einsum("blh,bkh->blk", per_position, negative_rows)
        return bpr_loss(positive_scores, negative_scores, has_target)
