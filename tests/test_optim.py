"""LazyRowAdamW, clipping with sparse gradients, and the sparse user table under DDP."""

import json

import pytest
import torch
from loopback_ranks import spawn_on_loopback
from torch import nn

from flm_dist.config import LossConfig
from flm_dist.models import FLMModel
from flm_dist.train import distributed
from flm_dist.train.loop import forward_backward
from flm_dist.train.optim import LazyRowAdamW, clip_grad_norm_


def _lookup_loss(table: nn.Embedding, head: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    return head(table(rows)).pow(2).mean()


@pytest.mark.parametrize("fused", [False, True])  # training fuses the dense update on CPUs and GPUs
def test_sparse_rows_follow_sparse_adam_and_dense_parameters_follow_adamw(fused):
    torch.manual_seed(0)
    table, head = nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3)
    reference_table, reference_head = nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3)
    reference_table.load_state_dict(table.state_dict())
    reference_head.load_state_dict(head.state_dict())
    optimizer = LazyRowAdamW([{"params": [table.weight], "weight_decay": 0.0},
                              {"params": list(head.parameters()), "weight_decay": 0.1}], lr=0.01, eps=1e-12,
                             fused=fused)
    # SparseAdam adds eps before the bias correction of the second moment, AdamW (and we) after:
    # with a negligible eps the two rules are the same.
    sparse_adam = torch.optim.SparseAdam([reference_table.weight], lr=0.01, eps=1e-12)
    adamw = torch.optim.AdamW(reference_head.parameters(), lr=0.01, weight_decay=0.1, eps=1e-12)
    untouched = torch.arange(40, 50)
    before = table.weight[untouched].clone()
    for _ in range(6):
        rows = torch.randint(0, 40, (12,))  # repeated rows included
        for model, optimizers in (((table, head), (optimizer,)), ((reference_table, reference_head), (sparse_adam, adamw))):
            for o in optimizers:
                o.zero_grad()
            _lookup_loss(*model, rows).backward()
            for o in optimizers:
                o.step()
    torch.testing.assert_close(table.weight, reference_table.weight)
    torch.testing.assert_close(head.weight, reference_head.weight)
    assert torch.equal(table.weight[untouched], before)  # rows never looked up never move


def test_clip_counts_sparse_rows_like_their_dense_gradient():
    torch.manual_seed(0)
    grads = {}
    for sparse in (True, False):
        torch.manual_seed(1)
        table, head = nn.Embedding(20, 4, sparse=sparse), nn.Linear(4, 2)
        _lookup_loss(table, head, torch.tensor([3, 3, 7, 11])).mul(100).backward()
        parameters = [table.weight, *head.parameters()]
        total = clip_grad_norm_(parameters, 0.5) if sparse else torch.nn.utils.clip_grad_norm_(parameters, 0.5)
        grads[sparse] = (total, [p.grad.to_dense() for p in parameters])
    torch.testing.assert_close(grads[True][0], grads[False][0])
    assert grads[True][0] > 0.5  # the clip was active
    for sparse_grad, dense_grad in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(sparse_grad, dense_grad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("scale", [100.0, 0.01])  # clipped, and under the bound (left as it is)
def test_the_optimizer_clips_for_its_next_step_as_clipping_the_gradients_does(device, fused, scale):
    # Fused steps leave the dense gradients as they are and divide them inside the kernel.
    torch.manual_seed(0)
    table, head = nn.Embedding(20, 4, sparse=True).to(device), nn.Linear(4, 2).to(device)
    reference_table, reference_head = nn.Embedding(20, 4, sparse=True).to(device), nn.Linear(4, 2).to(device)
    reference_table.load_state_dict(table.state_dict())
    reference_head.load_state_dict(head.state_dict())
    optimizers = [LazyRowAdamW([*model[0].parameters(), *model[1].parameters()], lr=0.01, weight_decay=0.0,
                               fused=fused)
                  for model in ((table, head), (reference_table, reference_head))]
    for step in range(3):
        rows = torch.randint(0, 20, (6,)).to(device)
        norms = []
        for model, optimizer in zip(((table, head), (reference_table, reference_head)), optimizers):
            optimizer.zero_grad()
            _lookup_loss(*model, rows).mul(scale).backward()
            parameters = [model[0].weight, *model[1].parameters()]
            norms.append(optimizer.clip_grad_norm_(0.5) if model[0] is table else clip_grad_norm_(parameters, 0.5))
            optimizer.step()
        torch.testing.assert_close(norms[0], norms[1])
        assert (norms[0] > 0.5) == (scale > 1)
    for ours, reference in ((table.weight, reference_table.weight), (head.weight, reference_head.weight)):
        torch.testing.assert_close(ours, reference)
    assert not hasattr(optimizers[0], "grad_scale")  # the scale was for that step only


def test_lazy_optimizer_without_sparse_gradients_is_adamw():
    torch.manual_seed(0)
    model, reference = nn.Linear(5, 5), nn.Linear(5, 5)
    reference.load_state_dict(model.state_dict())
    ours, theirs = LazyRowAdamW(model.parameters(), lr=0.1), torch.optim.AdamW(reference.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, 5)
        for m, o in ((model, ours), (reference, theirs)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    torch.testing.assert_close(model.weight, reference.weight, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# DDP: the sparse user table is left out of the all-reduce and its rows are all-gathered.
# ---------------------------------------------------------------------------------------------

USERS, ITEMS, BATCH, LENGTH, STEPS = 16, 40, 8, 6, 4


def _batch(step: int, users: slice) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    windows = torch.randint(1, ITEMS + 1, (BATCH, LENGTH + 1), generator=generator)
    user = torch.randperm(USERS, generator=generator)[:BATCH]
    return {"user": user[users], "input": windows[users, :-1], "target": windows[users, 1:]}


def _train(users_of_rank: slice) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = FLMModel(num_users=USERS, num_items=ITEMS, hidden=8, max_len=LENGTH, layers=1, heads=2, dropout=0.0,
                     flow_layers=0)
    model.cf.user_embedding.sparse = True
    table = model.cf.user_embedding.weight
    ddp_model = distributed.wrap_model(model, torch.device("cpu"), find_unused_parameters=True, row_sparse=[table])
    optimizer = LazyRowAdamW([{"params": [table], "weight_decay": 0.0},
                              {"params": [p for p in model.parameters() if p is not table]}],
                             lr=0.05, eps=1e-3)  # eps: Adam would blow up the rounding noise of the key bias's zero gradient
    options = {"weights": LossConfig(flow=0.0).weights(), "cf_loss": "ce", "softmax": "full", "num_negatives": 0,
               "popularity": None, "chunk_size": None, "bf16": False}
    for step in range(STEPS):
        forward_backward(ddp_model, _batch(step, users_of_rank), options, grad_accum=1)
        distributed.average_row_gradients_(table, sparse=True)
        clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _rank(rank: int, world: int, init_method: str, result_path: str) -> None:
    torch.set_num_threads(1)
    with distributed.process_group(rank, world, init_method):
        half = BATCH // world
        parameters = _train(slice(rank * half, (rank + 1) * half))
        if rank == 0:
            torch.save(parameters, result_path)
    distributed.exit_rank_process()


def test_sparse_user_table_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    result_path = str(tmp_path / "rank0.pt")
    spawn_on_loopback(_rank, 2, result_path)
    two_ranks = torch.load(result_path, weights_only=True)
    one_process = _train(slice(0, BATCH))
    assert two_ranks.keys() == one_process.keys()
    for name, tensor in one_process.items():
        torch.testing.assert_close(two_ranks[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_bench_optim_prints_both_step_times(capsys):
    from flm_dist.cli.main import main

    main(["bench", "optim", "--rows", "5000", "--dim", "8", "--batch", "64", "--steps", "2", "--warmup", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 5000 and result["table_bytes"] == 5000 * 8 * 4
    assert result["dense_step_ms"] > 0 and result["lazy_step_ms"] > 0
    assert result["dense_over_lazy"] == pytest.approx(result["dense_step_ms"] / result["lazy_step_ms"])


@pytest.mark.gpu
def test_lazy_rows_on_cuda_match_cpu():
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)  # initialised on the CPU, then moved: the same start on both devices
        table, head = nn.Embedding(1000, 16, sparse=True).to(device), nn.Linear(16, 4).to(device)
        optimizer = LazyRowAdamW([{"params": [table.weight], "weight_decay": 0.0},
                                  {"params": list(head.parameters())}], lr=0.01, fused=device == "cuda")
        for step in range(4):
            rows = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(step)).to(device)
            optimizer.zero_grad()
            _lookup_loss(table, head, rows).backward()
            clip_grad_norm_([table.weight, *head.parameters()], 0.1)
            optimizer.step()
        results[device] = table.weight.detach().cpu()
    torch.testing.assert_close(results["cuda"], results["cpu"], rtol=1e-4, atol=1e-5)
