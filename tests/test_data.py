import pyarrow as pa
import torch

from flm_dist.data.batches import build_eval_arrays, build_train_arrays


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
