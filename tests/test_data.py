import numpy as np
import pyarrow as pa
import torch

from flm_dist.data.batches import (
    build_eval_arrays,
    build_train_arrays,
    order_by_partner_width,
    same_target_partners,
    same_width_runs,
)


def _train_table(sequences):
    return pa.table({"user": pa.array(range(len(sequences)), pa.int32()),
                     "items": pa.array(sequences, pa.list_(pa.int32()))})


def test_windows_cover_every_target_once():
    arrays = build_train_arrays(_train_table([[1, 2, 3, 4, 5, 6, 7], [8], [9, 10]]), max_len=3)
    assert arrays.user.tolist() == [0, 0, 2]
    assert arrays.input.tolist() == [[4, 5, 6], [1, 2, 3], [0, 0, 9]]
    assert arrays.target.tolist() == [[5, 6, 7], [2, 3, 4], [0, 0, 10]]
    targets = arrays.target[arrays.target > 0]
    assert sorted(targets.tolist()) == [2, 3, 4, 5, 6, 7, 10]


def test_last_window_only():
    arrays = build_train_arrays(_train_table([[1, 2, 3, 4, 5, 6, 7]]), max_len=3, windows="last")
    assert arrays.input.tolist() == [[4, 5, 6]] and arrays.target.tolist() == [[5, 6, 7]]


def test_prefix_windows_give_one_window_per_target_with_the_target_last():
    arrays = build_train_arrays(_train_table([[1, 2, 3, 4, 5], [8], [9, 10]]), max_len=3, windows="prefixes")
    assert arrays.user.tolist() == [0, 0, 0, 0, 2]
    assert arrays.input.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [0, 0, 9]]
    assert arrays.target.tolist() == [[0, 0, 2], [0, 0, 3], [0, 0, 4], [0, 0, 5], [0, 0, 10]]


def test_eval_arrays_keep_full_history_for_masking():
    table = pa.table({"user": pa.array([1, 0], pa.int32()), "history": [[1, 2, 3, 4], [5]],
                      "target": [9, 8], "negatives": [[1, 2], [3, 4]]})
    arrays = build_eval_arrays(table, max_len=3)
    assert arrays.user.tolist() == [0, 1]
    assert arrays.input.tolist() == [[0, 0, 5], [2, 3, 4]]
    rows, items = arrays.history_pairs(0, 2)
    assert rows.tolist() == [0, 1, 1, 1, 1] and items.tolist() == [5, 1, 2, 3, 4]
    rows, items = arrays.history_pairs(1, 2)
    assert rows.tolist() == [0, 0, 0, 0] and items.tolist() == [1, 2, 3, 4]
    assert torch.equal(arrays.negatives, torch.tensor([[3, 4], [1, 2]]))


def test_same_target_partners_share_the_target_and_are_another_window_when_one_exists():
    targets = np.array([5, 7, 5, 9, 5, 7, 0, 0])
    seen = set()
    for seed in range(40):
        partners = same_target_partners(targets, seed)
        assert (targets[partners] == targets).all()
        assert partners[3] == 3 and partners[6] == 6 and partners[7] == 7  # no other with 9; no target
        mates = partners[[0, 1, 2, 4, 5]]
        assert (mates != np.array([0, 1, 2, 4, 5])).all()
        seen.add(int(partners[0]))
    assert seen == {2, 4}  # both other windows with target 5 get drawn
    np.testing.assert_array_equal(same_target_partners(targets, 3), same_target_partners(targets, 3))


def test_rows_by_input_length_keep_their_history_and_cut_to_their_longest_input():
    table = pa.table({"user": pa.array([0, 1, 2, 3], pa.int32()), "history": [[1, 2, 3, 4, 5], [6], [7, 8], [9, 1, 2]],
                      "target": [9, 8, 7, 6], "negatives": [[1], [2], [3], [4]], "cold": [False, True, False, True]})
    arrays = build_eval_arrays(table, max_len=4)
    ordered = arrays.by_input_length()
    assert ordered.user.tolist() == [1, 2, 3, 0]
    assert ordered.target.tolist() == [8, 7, 6, 9] and ordered.cold.tolist() == [True, False, True, False]
    assert ordered.negatives.view(-1).tolist() == [2, 3, 4, 1]
    rows, items = ordered.history_pairs(1, 4)
    assert rows.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2] and items.tolist() == [7, 8, 9, 1, 2, 1, 2, 3, 4, 5]
    assert ordered.input_width(0, 2, multiple=1) == 2 and ordered.input_width(0, 3, multiple=2) == 4
    assert ordered.input_width(0, 4, multiple=8) == 4  # never past max_len


def test_batches_follow_their_partners_widths_in_runs_of_one_width():
    widths = np.array([8, 8, 16, 8, 24, 16, 8, 8])
    order = np.array([0, 1, 3, 6, 7, 2, 5, 4])  # two batches: four windows of width 8, then the rest
    partners = np.array([4, 2, 6, 1, 0, 5, 2, 7])
    batches = [(0, 4, 8), (4, 8, 24)]
    arranged, arranged_partners = order_by_partner_width(order, batches, partners, widths)
    assert arranged.tolist() == [3, 6, 1, 0, 7, 4, 2, 5] and arranged_partners.tolist() == [6, 1, 2, 4, 0, 7, 5, 2]
    assert dict(zip(arranged, arranged_partners)) == dict(zip(order, partners))  # every window keeps its partner
    assert same_width_runs(widths[arranged_partners[:4]]) == [(0, 2, 8), (2, 3, 16), (3, 4, 24)]
    assert same_width_runs(widths[arranged_partners[4:]]) == [(0, 2, 8), (2, 4, 16)]
