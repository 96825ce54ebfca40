"""The fine-tuned recommender: a pretrained FLMModel plus a head that turns its user
representation (and, optionally, the flow's view of it) into the vector scored against the items.

    user vector = head(representation)                              flow = "none"
                = head([representation ; flow latent z])            flow = "latent"
                = head([representation ; log p(repr.) / H])         flow = "density"
                = head([representation ; W (representation - mu)])  flow = "whiten"

`representation` is the backbone's fused, sequence or CF user vector (`source`). The latent z is
the pretrained flow's Gaussianised image of the fused representation; "whiten" replaces it with a
fixed ZCA whitening fitted once on training representations, the linear baseline for the flow.
With "none" the flow is never evaluated, so it cannot influence a score.

Every head starts as "user vector = representation" (the extra features enter through
zero-initialised weights), so fine-tuning starts exactly at the pretrained model's ranking and the
extra features only count as far as training finds them useful. Items are scored against the
backbone's item table (row 0 = padding). Plain PyTorch: no Ray, no torch.distributed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from flm_dist.models.flm import LOSS_TERMS, FLMModel
from flm_dist.models.losses import ItemDistribution, full_softmax_ce, sampled_softmax_ce

FlowUse = Literal["none", "latent", "density", "whiten"]
HeadKind = Literal["linear", "mlp", "identity"]
Source = Literal["fused", "sequence", "cf"]


class Whitening(nn.Module):
    """Fixed ZCA whitening x -> (x - mean) W with W = Cov^(-1/2), fitted once from data.

    Held in buffers (no gradients): it is the linear alternative to the flow's latent.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Fit on rows x [n, dim]; the covariance is shrunk towards its mean variance.

        Shrinkage weight dim / (n + dim): with a few hundred rows in 64 dims the smallest sample
        eigenvalues are far too small and their inverse square roots would amplify noise.
        """
        x = x.double()
        n, dim = x.shape
        mean = x.mean(0)
        centred = x - mean
        covariance = centred.T @ centred / n
        shrink = dim / (n + dim)
        covariance = (1 - shrink) * covariance + shrink * covariance.diagonal().mean() * torch.eye(
            dim, dtype=x.dtype, device=x.device)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        inverse_sqrt = eigenvalues.clamp_min(1e-12).rsqrt()
        self.mean.copy_(mean)
        self.matrix.copy_((eigenvectors * inverse_sqrt) @ eigenvectors.T)
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) @ self.matrix.to(x.dtype)


class Head(nn.Module):
    """[representation ; extra features] -> user vector [.., H], starting as the identity on the
    representation.

    linear: W [repr ; extra] + b with W = [I | 0], b = 0 at start. mlp: repr + MLP([repr ; extra])
    whose output layer starts at zero. identity: the representation itself (no extra features).
    """

    def __init__(self, kind: HeadKind, hidden: int, extra: int):
        super().__init__()
        self.kind = kind
        features = hidden + extra
        if kind == "identity":
            if extra:
                raise ValueError("the identity head takes no extra features (use flow='none')")
        elif kind == "linear":
            self.linear = nn.Linear(features, hidden)
            with torch.no_grad():
                self.linear.weight.zero_()
                self.linear.weight[:, :hidden].copy_(torch.eye(hidden))
                self.linear.bias.zero_()
        elif kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        else:
            raise ValueError(f"unknown head {kind!r}; expected 'linear', 'mlp' or 'identity'")

    def forward(self, representation: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "identity":
            return representation
        features = representation if extra is None else torch.cat([representation, extra], dim=-1)
        if self.kind == "linear":
            return self.linear(features)
        return representation + self.mlp(features)


class Recommender(nn.Module):
    """Next-item recommender on a pretrained FLMModel (see the module docstring).

    `frozen` fixes the whole backbone (encoders, fusion, item table, flow: requires_grad False,
    and eval mode, so a frozen encoder is a deterministic feature extractor); only the head trains.
    Same interface as FLMModel where the training loop, evaluation and export use it:
    `forward(batch, weights, **options)` -> losses, `score_all`, `user_representation`,
    `flow_latent`, `flow_log_density`, `initialize_flow`.
    """

    def __init__(self, backbone: FLMModel, head: HeadKind = "linear", flow: FlowUse = "none",
                 source: Source = "fused", frozen: bool = False):
        super().__init__()
        if flow not in ("none", "latent", "density", "whiten"):
            raise ValueError(f"unknown flow use {flow!r}; expected 'none', 'latent', 'density' or 'whiten'")
        if source not in ("fused", "sequence", "cf"):
            raise ValueError(f"unknown source {source!r}; expected 'fused', 'sequence' or 'cf'")
        if flow != "none" and source != "fused":
            raise ValueError("the flow models the fused representation: flow features need source='fused'")
        self.backbone = backbone
        self.hidden = backbone.hidden
        self.num_items = backbone.num_items
        self.flow_use = flow
        self.source = source
        self.frozen = frozen
        extra = {"none": 0, "latent": self.hidden, "whiten": self.hidden, "density": 1}[flow]
        self.head = Head(head, self.hidden, extra)
        self.whitening = Whitening(self.hidden) if flow == "whiten" else None
        if frozen:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "Recommender":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def item_table(self) -> torch.Tensor:
        return self.backbone.item_table()

    def catalog_table(self) -> torch.Tensor:
        """The item table followed by the known cold items' rows (see FLMModel.catalog_table)."""
        return self.backbone.catalog_table()

    # ---- representations -------------------------------------------------------------------

    def _representations(self, user: torch.Tensor, input: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, L, H]: the `source` representation after each position of `input` ([B, 1, H], after
        the last, with `last_only`)."""
        if self.source != "sequence":
            cf = self.backbone.cf.prefix_vectors(user, input)
            cf = cf[:, -1:] if last_only else cf
            if self.source == "cf":
                return cf
        states = self.backbone.sequence_states(input, last_only)
        if self.source == "sequence":
            return states
        return self.backbone.fusion(cf, states)

    def _extra_features(self, representation: torch.Tensor) -> torch.Tensor | None:
        """The flow's (or the whitening's) features of representation [..., H], or None."""
        if self.flow_use == "none":
            return None
        if self.flow_use == "whiten":
            return self.whitening(representation)
        rows = representation.reshape(-1, self.hidden)
        if self.flow_use == "latent":
            return self.backbone.flow(rows)[0].view(representation.shape)
        # Detached like the pretraining flow loss: the encoders must not be able to raise the
        # density feature by collapsing the representation.
        if self.backbone.flow_stop_gradient:
            rows = rows.detach()
        log_density = self.backbone.flow.log_prob(rows) / self.hidden
        return log_density.view(*representation.shape[:-1], 1)

    def _user_vectors(self, representation: torch.Tensor) -> torch.Tensor:
        return self.head(representation, self._extra_features(representation))

    def _check_source(self, source: str | None) -> None:
        if source is not None and source != self.source:
            raise ValueError(f"this recommender's head was trained on the {self.source!r} "
                             f"representation; it cannot score with source {source!r}")

    @property
    def left_padding_free(self) -> bool:
        return self.backbone.left_padding_free

    def user_representation(self, user: torch.Tensor, input: torch.Tensor,
                            source: Source | None = None) -> torch.Tensor:
        """[B, H] user vector scored against the item table (after the last item of `input`)."""
        self._check_source(source)
        return self._user_vectors(self._representations(user, input, last_only=True)[:, -1])

    def score_all(self, user: torch.Tensor, input: torch.Tensor,
                  source: Source | None = None) -> torch.Tensor:
        """[B, num_items + 1] dot-product scores; column 0 (padding) is -inf."""
        scores = self.user_representation(user, input, source) @ self.item_table()[1:].T
        return F.pad(scores, (1, 0), value=-math.inf)

    def flow_latent(self, user: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """[B, H] the pretrained flow's latent of the fused representation."""
        return self.backbone.flow_latent(user, input)

    def flow_log_density(self, user: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """[B] log-density (nats) of the fused representation under the flow."""
        return self.backbone.flow_log_density(user, input)

    @torch.no_grad()
    def initialize_flow(self, batch: dict[str, torch.Tensor]) -> None:
        """Data-dependent init, once, before DDP replicates rank 0's parameters and buffers.

        The backbone's ActNorm init is a no-op for a pretrained (already initialised) flow. The
        whitening is fitted on the representations at every real position of the batch, in eval
        mode: it must match the representations it whitens at evaluation.
        """
        self.backbone.initialize_flow(batch)
        if self.whitening is None or bool(self.whitening.fitted):
            return
        was_training = self.training
        self.eval()
        representations = self._representations(batch["user"], batch["input"])
        self.whitening.fit(representations[batch["input"] != 0].float())
        self.train(was_training)

    # ---- training ---------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], weights: dict[str, float],
                **loss_options: object) -> dict[str, torch.Tensor]:
        """Same as `losses`, with the fused item rows computed once for the step."""
        with self.backbone.item_rows_shared():
            return self.losses(batch, weights, **loss_options)

    def losses(self, batch: dict[str, torch.Tensor], weights: dict[str, float],
               cf_loss: Literal["ce", "bpr"] = "ce", softmax: Literal["full", "sampled"] = "full",
               num_negatives: int = 100, popularity: ItemDistribution | None = None,
               chunk_size: int | None = None,
               seq_positions: Literal["all", "last"] = "all",
               max_in_batch_negatives: int = 0,
               contrast_temperature: float = 1.0,
               label_smoothing: float = 0.0,
               intent_temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Each loss term with a nonzero weight, plus `total` = sum of weight * term.

        seq: next-item CE of the user vector after every position with a target (after the last
        position only with `seq_positions="last"`). fused: CE of
        the user vector after the last position (the one `score_all` ranks with). cf: the
        backbone's MF loss (an auxiliary term). flow: the flow's NLL per dimension of the fused
        representation, which keeps the flow a density model while it is fine-tuned. attributes:
        the backbone's attribute objective (item features only), an auxiliary term.
        `label_smoothing` smooths the full-softmax CE terms (see full_softmax_ce).
        """
        unknown = set(weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; expected {LOSS_TERMS}")
        active = {term for term in LOSS_TERMS if weights.get(term, 0.0) != 0.0}
        if not active & {"seq", "fused"}:
            raise ValueError("the recommender needs a nonzero 'seq' or 'fused' loss weight")
        if active & {"contrast", "intent"}:
            raise ValueError("the contrastive terms are pretraining terms; the recommender has none")
        if softmax not in ("full", "sampled"):
            raise ValueError(f"unknown softmax {softmax!r}; expected 'full' or 'sampled'")
        user, input, target = batch["user"], batch["input"], batch["target"]
        table = self.item_table()

        def softmax_ce(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            if softmax == "full":
                return full_softmax_ce(hidden, table, targets, chunk_size, label_smoothing)
            return sampled_softmax_ce(hidden, table, targets, num_negatives, popularity,
                                      sparse_gradient=self.backbone.item_embedding.sparse,
                                      max_in_batch=max_in_batch_negatives)

        terms: dict[str, torch.Tensor] = {}
        every_position = "seq" in active and seq_positions == "all"
        representations = self._representations(user, input, last_only=not every_position)
        if every_position:
            vectors = self._user_vectors(representations)
            terms["seq"] = softmax_ce(vectors.reshape(-1, self.hidden), target.reshape(-1))
            last = vectors[:, -1]
        else:
            last = self._user_vectors(representations[:, -1])
        if "seq" in active and seq_positions == "last":
            terms["seq"] = softmax_ce(last, target[:, -1])
        if "fused" in active:
            terms["fused"] = softmax_ce(last, target[:, -1])
        if "cf" in active:
            terms["cf"] = self.backbone.losses(batch, {"cf": 1.0}, cf_loss=cf_loss, softmax=softmax,
                                               num_negatives=num_negatives, popularity=popularity,
                                               chunk_size=chunk_size,
                                               max_in_batch_negatives=max_in_batch_negatives,
                                               label_smoothing=label_smoothing)["cf"]
        if "attributes" in active:
            terms["attributes"] = self.backbone.attribute_loss(self.backbone.sequence_states(input), target,
                                                               seq_positions)
        if "flow" in active:
            fused = (representations[:, -1] if self.source == "fused"
                     else self.backbone.user_representation(user, input, "fused"))
            flow_input = fused.detach() if self.backbone.flow_stop_gradient else fused
            terms["flow"] = -self.backbone.flow.log_prob(flow_input).mean() / self.hidden
        terms["total"] = sum(weights[name] * value for name, value in terms.items())
        return terms

    def example_losses(self, batch: dict[str, torch.Tensor], weights: dict[str, float],
                       seq_positions: Literal["all", "last"] = "all",
                       scorer: nn.Module | None = None) -> torch.Tensor:
        """[B] the loss of each row on its own: `seq` (the mean next-item CE over the row's
        targets) and `fused` (the CE of its last target), weighted, full softmax.

        Unlike `forward`, no row's loss depends on another row (no mean over the batch's targets,
        no shared negatives), which per-example clipping in DP-SGD needs (train/private.py).
        `scorer` (vectors -> logits over the whole item table, padding column first) replaces the
        product with the item table: DP-SGD passes a linear layer tied to the table, so that
        per-layer hooks see the table's use as the output layer.
        """
        user, input, target = batch["user"], batch["input"], batch["target"]
        real_items = self.item_table()[1:]
        vectors = self._user_vectors(self._representations(user, input, last_only=seq_positions == "last"))
        targets = target if seq_positions == "all" else target[:, -1:]

        def cross_entropy(hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
            logits = (hidden @ real_items.T if scorer is None else scorer(hidden)[..., 1:]).float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), items.reshape(-1) - 1,
                                   ignore_index=-1, reduction="none").view(items.shape)

        losses = vectors.new_zeros(user.shape[0], dtype=torch.float32)
        if weights.get("seq", 0.0):
            present = (targets != 0).float()
            per_position = cross_entropy(vectors, targets)
            losses = losses + weights["seq"] * (per_position * present).sum(1) / present.sum(1).clamp_min(1.0)
        if weights.get("fused", 0.0):
            losses = losses + weights["fused"] * cross_entropy(vectors[:, -1], target[:, -1])
        return losses
