"""Loss functions over a shared item table whose row 0 is padding."""

import math

import pytest
import torch
import torch.nn.functional as F

from flm_dist.models.losses import (
    ItemDistribution,
    bpr_loss,
    full_softmax_ce,
    intent_info_nce,
    masked_mean,
    nearest_centroid,
    sample_items,
    sampled_softmax_ce,
    two_view_info_nce,
)

NUM_ITEMS = 40
HIDDEN = 8



@pytest.fixture
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, HIDDEN, generator=generator)
    table = torch.randn(NUM_ITEMS + 1, HIDDEN, generator=generator)
    targets = torch.randint(1, NUM_ITEMS + 1, (12,), generator=generator)
    targets[[2, 7]] = 0
    return hidden, table, targets


def test_full_softmax_matches_explicit_cross_entropy(problem):
    hidden, table, targets = problem
    keep = targets != 0
    explicit = F.cross_entropy(hidden[keep] @ table[1:].T, targets[keep] - 1)
    torch.testing.assert_close(full_softmax_ce(hidden, table, targets), explicit)


def test_full_softmax_chunked_equals_unchunked_in_value_and_gradient(problem):
    hidden, table, targets = problem
    results = []
    for chunk_size in (None, 5):
        hidden_leaf = hidden.clone().requires_grad_()
        table_leaf = table.clone().requires_grad_()
        loss = full_softmax_ce(hidden_leaf, table_leaf, targets, chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), hidden_leaf.grad, table_leaf.grad))
    for unchunked, chunked in zip(results[0], results[1]):
        torch.testing.assert_close(chunked, unchunked)


@pytest.mark.parametrize("bf16", [False, True])
def test_blocked_cross_entropy_equals_torchs_in_value_and_gradient(problem, monkeypatch, bf16):
    # On a CPU the full softmax runs a block of rows at a time (here 5 rows: blocks of 5, 5 and 2)
    # over logits that score the padding row too, as no class; forward writes the gradient of
    # the logits, which backward scales by the incoming gradient (here 0.37).
    import flm_dist.models.losses as losses

    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 5 * (NUM_ITEMS + 1))
    hidden, table, targets = problem
    results = []
    for blocked in (True, False):
        hidden_leaf, table_leaf = hidden.clone().requires_grad_(), table.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if blocked:
                loss = losses._BlockedLinearCrossEntropy.apply(
                    hidden_leaf, table_leaf, targets, torch.bfloat16 if bf16 else torch.float32)
            else:
                logits = hidden_leaf @ table_leaf[1:].T
                loss = F.cross_entropy(logits.float(), targets - 1, ignore_index=-1, reduction="sum")
        (0.37 * loss).backward()
        results.append((loss.detach(), hidden_leaf.grad, table_leaf.grad))
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {}  # bf16 gradients: rounded at another point
    for blocked, reference in zip(*results):
        torch.testing.assert_close(blocked, reference, **tolerance)
    assert not results[0][2][0].any()  # the padding row: no gradient
    assert losses._BlockedLinearCrossEntropy.apply(hidden, table, torch.zeros_like(targets), torch.float32).item() == 0.0


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_label_smoothing_matches_torch_and_keeps_ignored_rows_ignored(problem, chunk_size):
    hidden, table, targets = problem
    keep = targets != 0
    explicit = F.cross_entropy(hidden[keep] @ table[1:].T, targets[keep] - 1, label_smoothing=0.1)
    smoothed = full_softmax_ce(hidden, table, targets, chunk_size=chunk_size, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, explicit)
    # By hand: 0.9 x CE of the target + 0.1 x the mean CE over all items, averaged over kept rows.
    log_prob = torch.log_softmax(hidden[keep] @ table[1:].T, dim=-1)
    by_hand = -(0.9 * log_prob.gather(1, targets[keep, None] - 1)[:, 0] + 0.1 * log_prob.mean(-1)).mean()
    torch.testing.assert_close(smoothed, by_hand)
    assert full_softmax_ce(hidden, table, torch.zeros_like(targets), chunk_size, 0.1).item() == 0.0


def test_padding_row_never_gets_probability(problem):
    hidden, table, targets = problem
    table = table.clone().requires_grad_()
    loss = full_softmax_ce(hidden, table, targets)
    loss.backward()
    assert torch.all(table.grad[0] == 0)

    with torch.no_grad():
        huge_padding = table.clone()
        huge_padding[0] = hidden.sum(0) * 1e3
    torch.testing.assert_close(full_softmax_ce(hidden, huge_padding, targets), loss.detach())
    torch.manual_seed(0)
    sampled = sampled_softmax_ce(hidden, table.detach(), targets, 16)
    torch.manual_seed(0)
    sampled_huge = sampled_softmax_ce(hidden, huge_padding, targets, 16)
    torch.testing.assert_close(sampled_huge, sampled)


def test_all_targets_ignored_gives_zero_not_nan(problem):
    hidden, table, _ = problem
    no_targets = torch.zeros(hidden.shape[0], dtype=torch.long)
    assert full_softmax_ce(hidden, table, no_targets).item() == 0.0
    assert full_softmax_ce(hidden, table, no_targets, chunk_size=4).item() == 0.0
    assert sampled_softmax_ce(hidden, table, no_targets, 8).item() == 0.0


def test_sampled_softmax_in_batch_only_matches_hand_computation(problem):
    hidden, table, targets = problem
    loss = sampled_softmax_ce(hidden, table, targets, num_negatives=0)

    draws = (targets != 0).sum().item() - 1
    correction = math.log(draws) - math.log(NUM_ITEMS)  # log(C * q) for uniform q = 1 / N
    per_row = []
    for i in range(len(targets)):
        if targets[i] == 0:
            continue
        positive = hidden[i] @ table[targets[i]]
        negatives = [hidden[i] @ table[t] - correction
                     for t in targets if t != 0 and t != targets[i]]
        per_row.append(torch.logsumexp(torch.stack([positive, *negatives]), 0) - positive)
    torch.testing.assert_close(loss, torch.stack(per_row).mean())


def test_capped_in_batch_negatives_are_a_random_subset_with_their_own_draw_count(problem):
    hidden, table, targets = problem
    uncapped = sampled_softmax_ce(hidden, table, targets, num_negatives=5, generator=torch.Generator().manual_seed(4))
    at_batch_size = sampled_softmax_ce(hidden, table, targets, num_negatives=5, max_in_batch=len(targets),
                                       generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(at_batch_size, uncapped)

    capped = sampled_softmax_ce(hidden, table, targets, num_negatives=5, max_in_batch=4,
                                generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)  # replay the function's draws, in its order
    negatives = sample_items(5, NUM_ITEMS, generator=generator)
    in_batch = targets[torch.randperm(len(targets), generator=generator)[:4]]
    candidates = torch.cat([in_batch, negatives])
    correction = math.log((in_batch != 0).sum().item() + 5) - math.log(NUM_ITEMS)
    per_row = []
    for i in range(len(targets)):
        if targets[i] == 0:
            continue
        positive = hidden[i] @ table[targets[i]]
        others = [hidden[i] @ table[c] - correction for c in candidates if c != 0 and c != targets[i]]
        per_row.append(torch.logsumexp(torch.stack([positive, *others]), 0) - positive)
    torch.testing.assert_close(capped, torch.stack(per_row).mean())


def test_sampled_softmax_masks_accidental_hits():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, HIDDEN, generator=generator)
    # Every in-batch and every sampled negative is the positive itself: nothing is left in the
    # denominator but the positive, so the loss is exactly zero.
    one_item_table = torch.randn(2, HIDDEN, generator=generator)
    targets = torch.ones(6, dtype=torch.long)
    assert sampled_softmax_ce(hidden, one_item_table, targets, num_negatives=32).item() == 0.0

    # With two items, only the other item may appear in the denominator.
    two_item_table = torch.randn(3, HIDDEN, generator=generator)
    targets = torch.tensor([1, 1, 1, 2, 2, 2])
    loss = sampled_softmax_ce(hidden, two_item_table, targets, num_negatives=0)
    logits = hidden @ two_item_table.T
    correction = math.log(5) - math.log(2)  # 5 in-batch draws per row, uniform q = 1/2
    other = 3 - targets
    positive = logits.gather(1, targets[:, None]).squeeze(1)
    negative = logits.gather(1, other[:, None]).squeeze(1) - correction
    # Each row sees the other item 3 times in-batch (the rows with the other target).
    expected = torch.logsumexp(torch.stack([positive, negative + math.log(3)], 1), 1) - positive
    torch.testing.assert_close(loss, expected.mean())


def _skewed_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    num_items = 200
    hidden = torch.randn(8, HIDDEN, generator=generator)
    table = torch.randn(num_items + 1, HIDDEN, generator=generator)
    popularity = 1.0 / torch.arange(1, num_items + 1).float() ** 1.2  # Zipf-like
    item_log_prob = torch.cat([torch.zeros(1), popularity.log()])  # index 0 is ignored
    item_log_prob = ItemDistribution.from_log_weights(item_log_prob)
    targets = torch.randint(1, num_items + 1, (8,), generator=generator)
    return hidden, table, targets, item_log_prob


@pytest.mark.parametrize("popularity_sampling", [True, False])
def test_sampled_softmax_with_logq_correction_approaches_full_softmax(popularity_sampling):
    hidden, table, targets, item_log_prob = _skewed_problem()
    full = full_softmax_ce(hidden, table, targets)
    torch.manual_seed(3)
    sampled = sampled_softmax_ce(hidden, table, targets, num_negatives=20000,
                                 popularity=item_log_prob if popularity_sampling else None)
    assert abs(sampled.item() - full.item()) < 0.02 * full.item()

    if popularity_sampling:
        # Without the correction, popular items are over-counted in the denominator.
        torch.manual_seed(3)
        negatives = sample_items(20000, 200, item_log_prob)
        positive = (hidden * table[targets]).sum(-1)
        uncorrected = torch.cat([positive[:, None], hidden @ table[negatives].T], 1)
        uniform_correction = math.log(20000) - math.log(200)
        naive = (torch.logsumexp(uncorrected - uniform_correction, 1) - positive).mean()
        assert abs(naive.item() - full.item()) > 5 * abs(sampled.item() - full.item())


def test_sample_items_follows_popularity_and_never_returns_padding():
    _, _, _, item_log_prob = _skewed_problem()
    torch.manual_seed(4)
    samples = sample_items(200_000, 200, item_log_prob)
    assert samples.min().item() >= 1 and samples.max().item() <= 200
    frequencies = torch.bincount(samples, minlength=201)[1:].float() / samples.numel()
    expected = item_log_prob.log_prob[1:].exp()
    torch.testing.assert_close(frequencies[:20], expected[:20], atol=4e-3, rtol=0.05)

    uniform = sample_items(10_000, 7)
    assert set(uniform.unique().tolist()) == set(range(1, 8))


def test_bpr_loss_and_mask():
    pos = torch.tensor([2.0, 0.0, -1.0])
    neg = torch.tensor([[1.0, 3.0], [0.0, 0.0], [5.0, 5.0]])
    expected = -F.logsigmoid(pos[:, None] - neg).mean(1)
    torch.testing.assert_close(bpr_loss(pos, neg), expected.mean())
    mask = torch.tensor([True, True, False])
    torch.testing.assert_close(bpr_loss(pos, neg, mask), expected[:2].mean())


def test_masked_mean_of_empty_selection_is_zero():
    assert masked_mean(torch.ones(3), torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_two_view_info_nce_matches_hand_computation_and_leaves_out_same_answer_negatives():
    torch.manual_seed(0)
    first, second = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)
    targets = torch.tensor([5, 7, 5, 0])  # rows 0 and 2 share their next item; row 3 has none
    temperature = 0.5
    views = torch.cat([first, second])
    labels = targets.repeat(2)
    expected = []
    for i in range(8):
        if labels[i] == 0:
            continue
        positive = (i + 4) % 8
        # negatives: other sequences with a real, different next item
        negatives = [j for j in range(8) if j != positive and labels[j] != 0 and labels[j] != labels[i]]
        logits = torch.stack([views[i] @ views[j] for j in [positive, *negatives]]) / temperature
        expected.append(torch.logsumexp(logits, 0) - logits[0])
    loss = two_view_info_nce(first, second, targets, temperature)
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_two_view_info_nce_rewards_views_that_agree():
    torch.manual_seed(0)
    first = 4 * torch.eye(HIDDEN)  # orthogonal users: only a view's own pair is similar
    targets = torch.arange(1, HIDDEN + 1)
    agreeing = two_view_info_nce(first, first + 0.01 * torch.randn(HIDDEN, HIDDEN), targets)
    unrelated = two_view_info_nce(first, 4 * torch.randn(HIDDEN, HIDDEN), targets)
    assert agreeing < 0.01 and unrelated > 1.0


def test_two_view_info_nce_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    first, second = 6 * torch.randn(32, HIDDEN), 6 * torch.randn(32, HIDDEN)
    targets = torch.arange(1, 33)
    exact = two_view_info_nce(first, second, targets)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = two_view_info_nce(first, second, targets)
    torch.testing.assert_close(autocast, exact)


def test_intent_info_nce_pairs_each_state_with_its_nearest_centroid_and_spares_same_intent_negatives():
    torch.manual_seed(0)
    centroids = torch.randn(3, HIDDEN)
    intent = torch.tensor([0, 2, 0, 1, 2])
    states = (centroids[intent] + 0.1 * torch.randn(5, HIDDEN)).requires_grad_()
    targets = torch.tensor([4, 9, 4, 0, 3])  # row 3 has no target and is left out
    assert nearest_centroid(states.detach(), centroids).tolist() == intent.tolist()
    loss = intent_info_nce(states, centroids, targets, temperature=0.5)
    # Same-intent rows (0 and 2; 1 and 4) are not each other's negatives, whatever their targets.
    labels = torch.tensor([1, 3, 1, 0, 3])
    torch.testing.assert_close(loss, two_view_info_nce(states, centroids[intent], labels, 0.5))
    loss.backward()
    assert states.grad[[0, 1, 2, 4]].abs().sum(1).min() > 0 and states.grad[3].abs().sum() == 0
