"""Ranking losses over a shared item table whose row 0 is padding.

Conventions shared by every function here: `item_table` has `num_items + 1` rows, row 0 is the
padding item and never receives probability; a target of 0 means "no target" and is ignored;
means are taken over the non-ignored targets only, and a batch with none of them gives 0 rather
than NaN. All functions avoid boolean indexing (which would sync with the host and give dynamic
shapes under torch.compile): ignored rows are computed and then weighted by zero.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True; 0 (not NaN) when nothing is selected."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


BLOCK_ELEMENTS = 1 << 18
"""Logits a row block of `_BlockedLinearCrossEntropy` holds in fp32 (1 MB: within a core's L2 cache)."""


class _BlockedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits `hidden` [M, H] @ `item_table` [1 + N, H].T over items
    1..N (row 0, the padding item, is no class) against `targets` [M] (0: no target), with the
    matmuls in `dtype` and the softmax a block of rows at a time in fp32.

    `F.cross_entropy(logits.float())` streams the [M, N] logits through memory about ten times (the
    fp32 copy, the log-softmax it keeps for backward, the zero-filled gradient of the loss, the
    log-softmax gradient and its cast back to bf16); on a CPU that traffic, not arithmetic, is
    what a full softmax costs. Here each block's fp32 values stay in cache, and forward, while
    they are there, also writes the loss's gradient with respect to the logits (softmax minus
    one-hot, in `dtype`, over the logits themselves): backward is then just its two matmuls,
    scaled by the incoming gradient on their [M, H] side. A softmax recomputed in backward would
    cost another pass of exponentials and two casts over the [M, N] block, and scaling the
    product another pass over the [1 + N, H] gradient of the table.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            features, table = hidden.to(dtype), item_table.to(dtype)
            logits = features @ table.T
        rows = logits.shape[0]
        block = max(1, BLOCK_ELEMENTS // logits.shape[1])
        present = targets != 0
        keep = present.float()[:, None]
        columns = (targets - 1).clamp_min(0)  # a row without a target is weighted by 0
        target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()
        log_sum_exp = torch.empty(rows, dtype=torch.float32, device=logits.device)
        gradient = any(ctx.needs_input_grad[:2])
        if gradient:  # written over the logits, which nothing else reads
            grad_logits = logits
            grad_logits[:, 0] = 0
        within = torch.arange(min(block, rows), device=logits.device)
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            scores = logits[start:stop, 1:].float()
            peak = scores.amax(dim=1, keepdim=True)
            total = scores.sub_(peak).exp_().sum(dim=1, keepdim=True)
            log_sum_exp[start:stop] = (peak + total.log()).squeeze(1)
            if gradient:
                scores.mul_(keep[start:stop] / total)
                scores[within[:stop - start], columns[start:stop]] -= keep[start:stop, 0]
                grad_logits[start:stop, 1:] = scores
        if gradient:
            ctx.save_for_backward(features, table, grad_logits)
            ctx.hidden_dtype, ctx.table_dtype = hidden.dtype, item_table.dtype
        return torch.where(present, log_sum_exp - target_logits, 0.0).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        features, table, grad_logits = ctx.saved_tensors
        grad_hidden = grad_table = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_logits @ table).to(ctx.hidden_dtype).mul_(grad)
            if ctx.needs_input_grad[1]:
                # Scaling the [M, H] operand, not the [1 + N, H] product, spares a pass over the table.
                grad_table = (grad_logits.T @ (features * grad).to(features.dtype)).to(ctx.table_dtype)
        return grad_hidden, grad_table, None, None


def _ce_sum(hidden: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
            label_smoothing: float) -> torch.Tensor:
    if hidden.device.type == "cpu" and not label_smoothing:
        dtype = (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                 else torch.promote_types(hidden.dtype, item_table.dtype))
        return _BlockedLinearCrossEntropy.apply(hidden, item_table, targets, dtype)
    # Column j of the logits is item j + 1, so target 0 (no target) maps to ignore_index -1.
    logits = hidden @ item_table[1:].T
    return F.cross_entropy(logits.float(), targets - 1, ignore_index=-1, reduction="sum",
                           label_smoothing=label_smoothing)


def full_softmax_ce(hidden: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                    chunk_size: int | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `hidden` [M, H] against every real item of `item_table` [N+1, H].

    With `chunk_size`, rows are processed `chunk_size` at a time under activation checkpointing,
    so at most a [chunk_size, N] logit block is alive in forward *and* backward (it is recomputed
    in backward) instead of the full [M, N] matrix; the result is identical to the unchunked one.
    `label_smoothing` eps moves eps of each target's probability mass evenly onto the N real
    items (torch's definition; padding gets none, ignored rows stay ignored).
    """
    num_targets = (targets != 0).sum().clamp_min(1)
    if chunk_size is None or chunk_size >= hidden.shape[0]:
        return _ce_sum(hidden, item_table, targets, label_smoothing) / num_targets
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        stop = start + chunk_size
        total = total + checkpoint(_ce_sum, hidden[start:stop], item_table,
                                   targets[start:stop], label_smoothing, use_reentrant=False)
    return total / num_targets


def normalized_item_log_prob(item_log_weights: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the real items (index 0 = padding, set to -inf) summing to one."""
    real = item_log_weights[1:].float()
    real = real - torch.logsumexp(real, dim=0)
    return torch.cat([real.new_full((1,), -math.inf), real])


def item_rows(item_table: torch.Tensor, ids: torch.Tensor, sparse_gradient: bool = False) -> torch.Tensor:
    """Rows `ids` of `item_table`; with `sparse_gradient` their gradient is a sparse tensor of
    just those rows (as `nn.Embedding(sparse=True)` gives) instead of a dense table."""
    return F.embedding(ids, item_table, sparse=sparse_gradient)


@dataclasses.dataclass(frozen=True)
class ItemDistribution:
    """A popularity distribution over items 1..N for sampled negatives, normalised once per run.

    Normalising and the CDF cost O(N) each (logsumexp, exp, cumsum); done per call, they took
    most of a training step at 10M items.
    """

    log_prob: torch.Tensor
    """[N+1] log-probabilities; index 0 (padding) is -inf, the rest sum to one."""
    cdf: torch.Tensor
    """[N] cumulative probabilities of items 1..N, for inverse-CDF sampling."""

    @classmethod
    def from_log_weights(cls, item_log_weights: torch.Tensor) -> ItemDistribution:
        """From unnormalised log-weights [N+1] (index 0 ignored), finite for every real item."""
        log_prob = normalized_item_log_prob(item_log_weights)
        return cls(log_prob=log_prob, cdf=log_prob[1:].exp().cumsum(0))


def sample_items(num_samples: int, num_items: int, popularity: ItemDistribution | None = None,
                 device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw item ids in 1..num_items with replacement: uniformly, or from `popularity`.

    Popularity sampling inverts the CDF with searchsorted, which (unlike multinomial) is cheap for
    millions of items and keeps a static output shape.
    """
    if popularity is None:
        return torch.randint(1, num_items + 1, (num_samples,), device=device, generator=generator)
    cdf = popularity.cdf
    uniform = torch.rand(num_samples, device=cdf.device, generator=generator) * cdf[-1]
    return torch.searchsorted(cdf, uniform, right=True).clamp_max(num_items - 1) + 1


def sampled_softmax_ce(hidden: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                       num_negatives: int, popularity: ItemDistribution | None = None,
                       generator: torch.Generator | None = None,
                       sparse_gradient: bool = False, max_in_batch: int = 0) -> torch.Tensor:
    """Sampled-softmax cross-entropy with in-batch plus sampled negatives and logQ correction.

    Negatives for row i are the other rows' targets (in-batch) and `num_negatives` items shared by
    all rows, drawn from `popularity` or uniformly when it is None. In-batch targets are treated as
    draws from the same distribution, which holds when `popularity` is the training-target
    popularity; with None the in-batch negatives stay popularity-biased (plain in-batch softmax).

    logQ correction: each negative logit s_j becomes s_j - log(C * q_j) where C is the number of
    negatives drawn per row, so sum_j exp(.) is an importance-sampling estimate of the full
    partition function over the non-target items and the loss tends to the full-softmax loss as
    C grows. Accidental hits (a negative equal to the row's target, including the row's own
    in-batch copy) and padding targets of ignored rows are masked out of the denominator.
    With `max_in_batch` > 0, only a random subset of that many targets serves as in-batch
    negatives, so the cost is O(M * (max_in_batch + num_negatives)) instead of O(M * (M +
    num_negatives)) for M rows; the subset's targets are still draws from the same
    distribution, so the correction is unchanged. It pays off when M << num_items; with
    `sparse_gradient` the item table's gradient holds only the rows looked up (see `item_rows`).
    """
    num_items = item_table.shape[0] - 1
    valid = targets != 0
    negatives = sample_items(num_negatives, num_items, popularity, hidden.device, generator)
    in_batch, own_copy = targets, 1  # every row's own target is among the in-batch candidates
    if 0 < max_in_batch < targets.shape[0]:
        chosen = torch.randperm(targets.shape[0], device=targets.device, generator=generator)[:max_in_batch]
        in_batch, own_copy = targets[chosen], 0
    candidates = torch.cat([in_batch, negatives])

    positive_logits = (hidden * item_rows(item_table, targets, sparse_gradient)).sum(-1).float()
    candidate_logits = (hidden @ item_rows(item_table, candidates, sparse_gradient).T).float()

    if popularity is None:
        candidate_log_q = candidate_logits.new_full(candidates.shape, -math.log(num_items))
    else:
        candidate_log_q = popularity.log_prob[candidates]
    draws_per_row = ((in_batch != 0).sum() - own_copy + num_negatives).clamp_min(1)
    candidate_logits = candidate_logits - (candidate_log_q + draws_per_row.float().log())

    excluded = (candidates[None, :] == targets[:, None]) | (candidates[None, :] == 0)
    candidate_logits = candidate_logits.masked_fill(excluded, -math.inf)
    log_partition = torch.logsumexp(
        torch.cat([positive_logits[:, None], candidate_logits], dim=1), dim=1)
    return masked_mean(log_partition - positive_logits, valid)


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bayesian personalised ranking: mean of -log sigmoid(pos - neg).

    `pos_scores` has shape [...], `neg_scores` [..., K] (K negatives per positive); `mask` [...]
    (True = keep) drops positives that are padding.
    """
    per_positive = -F.logsigmoid(pos_scores.float()[..., None] - neg_scores.float()).mean(-1)
    if mask is None:
        return per_positive.mean()
    return masked_mean(per_positive, mask)


def two_view_info_nce(first: torch.Tensor, second: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """InfoNCE between two views [B, H] of the same B sequences (DuoRec's model-level
    augmentation: the encoder run twice under different dropout masks).

    Each of the 2B vectors is scored by dot product / `temperature` against the other 2B - 1;
    its own sequence's other view is the positive. Vectors of sequences with the same next item
    (`targets` [B]) are left out as negatives, since they are not different users' tastes but
    the same answer; a target of 0 marks a row without a target, which is ignored.
    """
    count = first.shape[0]
    views = torch.cat([first, second]).float()
    # fp32 even under bf16 autocast: the logits are unscaled dot products (tens of nats), where
    # bf16's 8-bit mantissa would add noise of a fraction of a nat; the block is only [2B, 2B].
    with torch.autocast(device_type=views.device.type, enabled=False):
        logits = views @ views.T / temperature
    labels = targets.repeat(2)
    positive = torch.arange(2 * count, device=views.device).roll(count)
    same_answer = (labels[:, None] == labels[None, :]) | (labels[None, :] == 0)
    is_positive = F.one_hot(positive, 2 * count).bool()
    logits = logits.masked_fill(same_answer & ~is_positive, -math.inf)
    per_view = F.cross_entropy(logits, positive, reduction="none")
    return masked_mean(per_view, labels != 0)


def intent_info_nce(states: torch.Tensor, centroids: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """ICSRec's fine-grained intent term: each state [B, H] is paired with the nearest of the
    intent `centroids` [K, H] (squared distance, no gradient through the choice or the
    centroids), and two_view_info_nce contrasts the states with their centroids, so that windows
    of the same intent are not each other's negatives. Rows whose `targets` [B] is 0 are ignored.
    """
    with torch.no_grad():
        intent = nearest_centroid(states.detach().float(), centroids.float())
    labels = torch.where(targets != 0, intent + 1, 0)
    return two_view_info_nce(states, centroids[intent].to(states.dtype), labels, temperature)


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index [N] of the nearest of `centroids` [K, H] to each of `points` [N, H] (squared L2)."""
    # ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2; ||p||^2 is the same for every centroid.
    return (centroids.square().sum(1) - 2 * points @ centroids.T).argmin(1)
