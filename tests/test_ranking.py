import math

import pytest
import torch

from flm_dist.eval.ranking import CPU_RANK_BLOCK_ELEMENTS, item_chunk_size, rank_chunk_size, rank_targets, top_k


def test_chunk_size_follows_the_budget_and_keeps_small_catalogs_whole():
    assert item_chunk_size(users=1024, num_items=12_101, max_elements=2 ** 26) == 12_101
    assert item_chunk_size(users=1024, num_items=1_000_000, max_elements=2 ** 26) == 65_536
    assert item_chunk_size(users=1024, num_items=1_000_000, max_elements=1000) == 1


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 500])
def test_top_k_equals_one_topk_over_the_whole_matrix(chunk_size):
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(9, 8, generator=generator)
    table = torch.randn(301, 8, generator=generator)
    rows = torch.tensor([0, 0, 0, 3, 3, 8])
    items = torch.tensor([5, 5, 300, 1, 2, 17])  # a repeat, the last item, the first items
    scores, ids = top_k(vectors, table, 20, chunk_size, (rows, items))

    whole = vectors @ table[1:].T
    whole[rows, items - 1] = -math.inf
    expected_scores, expected_columns = whole.topk(20, dim=1)
    torch.testing.assert_close(scores, expected_scores)  # matmul kernels differ by an ulp
    assert torch.equal(ids, expected_columns + 1)
    assert not (ids[0, :, None] == torch.tensor([5, 300])).any()


def test_top_k_of_a_user_who_has_seen_almost_everything_ends_in_minus_infinity():
    table = torch.randn(6, 4)
    scores, ids = top_k(torch.randn(1, 4), table, 10, 2, (torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])))
    assert scores.shape == (1, 5)
    assert torch.isfinite(scores[0, :2]).all() and torch.isneginf(scores[0, 2:]).all()
    assert set(ids[0, :2].tolist()) == {4, 5}


def test_rank_targets_by_hand():
    # One user, items 1..5 scored 5, 4, 3, 2, 1 (item 1 best).
    table = torch.tensor([[0.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    vectors = torch.ones(2, 1)
    target = torch.tensor([4, 2])
    history = (torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 5, 2]))  # user 1's target is history
    for chunk_size in (1, 2, 5):
        ranks = rank_targets(vectors, table, target, history, chunk_size)
        assert ranks.unmasked.tolist() == [3, 1]
        assert ranks.masked.tolist() == [2, 6]  # item 1 removed for user 0; user 1: a miss
        assert ranks.candidates.tolist() == [3, 4]
        assert ranks.top_in_history.tolist() == [True, False]  # item 1, in user 0's history only


@pytest.mark.parametrize("chunk_size", [1, 3, 6])
def test_zeroed_history_outranks_a_target_only_when_the_target_scores_below_zero(chunk_size):
    # Items 1..6 scored 3, 2, 1, -1, -2, -3; both users have seen items 1 and 6.
    table = torch.tensor([[0.0], [3.0], [2.0], [1.0], [-1.0], [-2.0], [-3.0]])
    vectors = torch.ones(2, 1)
    target = torch.tensor([3, 5])
    history = (torch.tensor([0, 0, 1, 1]), torch.tensor([1, 6, 1, 6]))
    ranks = rank_targets(vectors, table, target, history, chunk_size)
    assert ranks.masked.tolist() == [1, 3]  # item 1 removed: 2 above item 3; 2, 3, 4 above item 5
    # Set to 0: both history items now sit at 0, above item 5 (-2) but below item 3 (1).
    assert ranks.zeroed.tolist() == [1, 5]
    # Brute force: the S3-Rec code's masking, then the number of items above the target.
    scores = (vectors @ table[1:].T).clone()
    scores[history[0], history[1] - 1] = 0
    brute = (scores > scores.gather(1, (target - 1)[:, None])).sum(dim=1)
    assert ranks.zeroed.tolist() == brute.tolist()


def test_a_cpu_ranks_cache_sized_blocks_and_other_devices_what_memory_allows():
    assert rank_chunk_size(1024, 100_000, 1 << 26, torch.device("cpu")) == CPU_RANK_BLOCK_ELEMENTS // 1024
    assert rank_chunk_size(1024, 100_000, 1 << 26, torch.device("meta")) == (1 << 26) // 1024
    assert rank_chunk_size(1024, 500, 1 << 26, torch.device("cpu")) == 500  # a small catalog: one chunk
