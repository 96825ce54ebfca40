"""AdamW with lazy row updates for tables that have sparse gradients.

A table built as `nn.Embedding(sparse=True)` gets a sparse gradient holding only the rows a step
looked up. `LazyRowAdamW` updates those rows' moments and values and leaves every other row alone
(the update rule of `torch.optim.SparseAdam`), so the cost of a step on such a table follows the
batch, not the table. Every dense parameter gets plain (or fused) AdamW. One optimiser, so one
state dict and one LR schedule cover both. `warmup_cosine` is that schedule.
"""

from __future__ import annotations

import math

import torch


class LazyRowAdamW(torch.optim.AdamW):
    """AdamW; a parameter whose gradient is sparse gets a lazy Adam step on its touched rows.

    A row's moments only advance on the steps that touch it, while the bias correction follows the
    parameter's step count, as in `torch.optim.SparseAdam` (eps is added after the bias
    correction, as AdamW does for the dense parameters). This is not the same trajectory as
    dense AdamW, whose momentum keeps moving a row for steps after its last gradient. Weight decay
    is not applied to sparse rows (embedding tables are never decayed here).
    """

    _dense_clip_scale: torch.Tensor | None = None

    def parameters(self) -> list[torch.Tensor]:
        return [parameter for group in self.param_groups for parameter in group["params"]]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`clip_grad_norm_` over this optimiser's parameters, for its next `step`; returns the
        total norm before clipping. With fused steps the dense gradients are not rewritten: the
        fused kernel divides each gradient by `grad_scale` as it reads it (torch's AMP hook), which
        spares a pass over every gradient, the whole item table's among them."""
        fused = self.defaults["fused"]
        total = clip_grad_norm_(self.parameters(), max_norm, dense=not fused)
        if fused:
            self._dense_clip_scale = _clip_scale(total, max_norm)
        return total

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse = []
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None and parameter.grad.is_sparse:
                    self._lazy_step(parameter, group)
                    sparse.append((parameter, parameter.grad))
                    parameter.grad = None  # AdamW below only sees the dense parameters
        if self._dense_clip_scale is not None:
            self.grad_scale = 1 / self._dense_clip_scale
            self.found_inf = torch.zeros_like(self.grad_scale)
        try:
            super().step()
        finally:
            if self._dense_clip_scale is not None:
                del self.grad_scale, self.found_inf
                self._dense_clip_scale = None
        for parameter, gradient in sparse:
            parameter.grad = gradient
        return loss

    def _lazy_step(self, parameter: torch.Tensor, group: dict) -> None:
        if group["weight_decay"]:
            raise ValueError("LazyRowAdamW: weight decay on a sparse-gradient table is not supported")
        gradient = parameter.grad.coalesce()
        rows, values = gradient.indices()[0], gradient.values()
        state = self.state[parameter]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(parameter)
            state["exp_avg_sq"] = torch.zeros_like(parameter)
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"][rows].lerp_(values, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        denominator = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        lr = group["lr"].item() if torch.is_tensor(group["lr"]) else group["lr"]
        parameter.index_add_(0, rows, exp_avg / denominator, alpha=-lr / (1 - beta1 ** step))


def grad_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    """Total 2-norm of the gradients of `parameters`, sparse ones included (coalesced in place, so
    repeated rows sum before their norm is taken); NaN or inf if any gradient entry is."""
    with_grad = [p for p in parameters if p.grad is not None]
    sparse = [p for p in with_grad if p.grad.is_sparse]
    dense = [p.grad for p in with_grad if not p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.get_total_norm(dense)
    for parameter in sparse:
        parameter.grad = parameter.grad.coalesce()
    norms = [parameter.grad.values().norm() for parameter in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm(dense))
    return torch.linalg.vector_norm(torch.stack(norms))


def _clip_scale(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that clips gradients of total norm `total` to `max_norm` (torch's, eps included)."""
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


def clip_grad_norm_(parameters: list[torch.Tensor], max_norm: float, dense: bool = True) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` that also counts and scales sparse gradients (which the
    torch version rejects). Returns the total norm before clipping. With `dense=False` the dense
    gradients are counted but left for the caller to scale."""
    total = grad_norm(parameters)
    with_grad = [p for p in parameters if p.grad is not None]
    if dense:
        torch.nn.utils.clip_grads_with_norm_([p for p in with_grad if not p.grad.is_sparse], max_norm, total)
    scale = _clip_scale(total, max_norm)
    for parameter in with_grad:
        if parameter.grad.is_sparse:
            parameter.grad.values().mul_(scale)
    return total


def warmup_cosine(warmup: int, total: int, floor: float):
    """The LR factor of a step: linear warm-up over `warmup` steps, then a cosine from 1 down to
    `floor` at step `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor
