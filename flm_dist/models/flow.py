"""Normalising flow with exact log-likelihood over D-dimensional vectors (user representations).

Each flow layer is ActNorm -> fixed permutation -> coupling (affine RealNVP or rational-quadratic
spline, Durkan et al. 2019). Every step maps x -> z with `forward(x) -> (z, log|det dz/dx|)` and
back with `inverse(z) -> x`. The base distribution is a standard normal. The whole flow computes
in at least fp32, also inside a bf16/fp16 autocast region: log-determinants summed over many
dimensions lose too much precision in half types.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FlowKind = Literal["affine", "spline"]

PERMUTATION_SEED = 0


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ActNorm(nn.Module):
    """Per-dimension affine z = (x + bias) * exp(log_scale) (Kingma & Dhariwal 2018).

    On its first forward it sets bias and scale so that batch's output has zero mean and unit
    variance. The `initialized` buffer travels with checkpoints so a loaded model keeps its
    trained parameters; the Python-side mirror avoids reading the buffer (a host sync on GPU) on
    every step after the first.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False
        self.register_load_state_dict_post_hook(_forget_known_initialization)

    def _initialize_from(self, x: torch.Tensor) -> None:
        if self._known_initialized:
            return
        if not bool(self.initialized):
            if x.shape[0] < 2:
                raise ValueError("ActNorm data-dependent init needs a batch of at least 2 rows")
            with torch.no_grad():
                self.bias.copy_(-x.mean(0))
                self.log_scale.copy_(-torch.log(x.std(0, unbiased=False) + 1e-6))
                self.initialized.fill_(True)
        self._known_initialized = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._initialize_from(x)
        z = (x + self.bias) * self.log_scale.exp()
        return z, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * (-self.log_scale).exp() - self.bias


def _forget_known_initialization(module: ActNorm, incompatible_keys: object) -> None:
    # The loaded `initialized` buffer is the truth now; re-read it once on the next forward.
    module._known_initialized = False


class Permutation(nn.Module):
    """A fixed reordering of the dimensions; volume preserving (log-det 0)."""

    def __init__(self, permutation: torch.Tensor):
        super().__init__()
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.permutation], x.new_zeros(x.shape[0])

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, self.inverse_permutation]


def mixing_permutations(dim: int, count: int, seed: int = PERMUTATION_SEED) -> list[torch.Tensor]:
    """`count` random permutations, each moving at least one coordinate that the previous
    coupling left untouched (its first dim // 2 outputs) into the half the next coupling
    transforms. Without this a small-D flow could draw the identity and keep transforming the
    same half. Seeded locally so every process builds the same flow without touching global RNG.
    """
    generator = torch.Generator().manual_seed(seed)
    conditioning_dim = dim // 2
    permutations = []
    for _ in range(count):
        permutation = torch.randperm(dim, generator=generator)
        while not bool((permutation[conditioning_dim:] < conditioning_dim).any()):
            permutation = torch.randperm(dim, generator=generator)
        permutations.append(permutation)
    return permutations


def conditioner_network(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """MLP predicting coupling parameters; the zero-initialised output layer makes every
    coupling start as the identity map, so a fresh flow is exactly ActNorm + permutations."""
    network = nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(),
        nn.Linear(hidden, hidden), nn.GELU(),
        nn.Linear(hidden, out_dim),
    )
    nn.init.zeros_(network[-1].weight)
    nn.init.zeros_(network[-1].bias)
    return network


class AffineCoupling(nn.Module):
    """RealNVP coupling: the first dim // 2 coordinates condition an elementwise affine map of
    the rest. The log-scale is soft-clamped to (-bound, bound) with tanh so one step can never
    blow a coordinate up or collapse it by more than exp(bound)."""

    def __init__(self, dim: int, hidden: int, log_scale_bound: float = 3.0):
        super().__init__()
        self.conditioning_dim = dim // 2
        self.transformed_dim = dim - self.conditioning_dim
        self.log_scale_bound = log_scale_bound
        self.conditioner = conditioner_network(self.conditioning_dim, hidden,
                                               2 * self.transformed_dim)

    def _log_scale_and_shift(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_log_scale, shift = self.conditioner(conditioning).chunk(2, dim=-1)
        bound = self.log_scale_bound
        return bound * torch.tanh(raw_log_scale / bound), shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conditioning, transformed = x.split([self.conditioning_dim, self.transformed_dim], dim=-1)
        log_scale, shift = self._log_scale_and_shift(conditioning)
        z = torch.cat([conditioning, transformed * log_scale.exp() + shift], dim=-1)
        return z, log_scale.sum(-1)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        conditioning, transformed = z.split([self.conditioning_dim, self.transformed_dim], dim=-1)
        log_scale, shift = self._log_scale_and_shift(conditioning)
        return torch.cat([conditioning, (transformed - shift) * (-log_scale).exp()], dim=-1)


MIN_KNOT_SIZE = 1e-3
MIN_DERIVATIVE = 1e-3
# MIN_DERIVATIVE + softplus(0 + offset) == 1: a zero conditioner output gives unit derivatives.
_UNIT_DERIVATIVE_OFFSET = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def _knots(unnormalized_sizes: torch.Tensor,
           tail_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin sizes (softmax, each at least MIN_KNOT_SIZE of the range) -> K+1 knot positions on
    [-tail_bound, tail_bound] with exact end points, and the K bin sizes between them."""
    num_bins = unnormalized_sizes.shape[-1]
    fractions = MIN_KNOT_SIZE + (1 - MIN_KNOT_SIZE * num_bins) * F.softmax(unnormalized_sizes, -1)
    interior = tail_bound * (2 * fractions[..., :-1].cumsum(-1) - 1)
    lower = torch.full_like(interior[..., :1], -tail_bound)
    knots = torch.cat([lower, interior, -lower], dim=-1)
    return knots, knots.diff(dim=-1)


def _gather_bin(values: torch.Tensor, bin_index: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, bin_index[..., None]).squeeze(-1)


def rational_quadratic_spline(inputs: torch.Tensor, unnormalized_widths: torch.Tensor,
                              unnormalized_heights: torch.Tensor,
                              unnormalized_derivatives: torch.Tensor, inverse: bool,
                              tail_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotone rational-quadratic spline on [-B, B], identity outside (linear tails).

    Shapes: inputs [...]; widths and heights [..., K]; interior derivatives [..., K-1] (the two
    boundary derivatives are 1 so the spline joins the identity tails smoothly). Returns the
    outputs and log|d out / d in| of the *forward* map evaluated at the forward input (for
    `inverse=True` that is at the returned output). Tail inputs are clamped into the spline
    before evaluation and then replaced, so no NaN/inf ever appears, even in unused branches.
    """
    x_knots, widths = _knots(unnormalized_widths, tail_bound)
    y_knots, heights = _knots(unnormalized_heights, tail_bound)
    derivatives = MIN_DERIVATIVE + F.softplus(unnormalized_derivatives + _UNIT_DERIVATIVE_OFFSET)
    derivatives = F.pad(derivatives, (1, 1), value=1.0)

    inside = (inputs >= -tail_bound) & (inputs <= tail_bound)
    clamped = inputs.clamp(-tail_bound, tail_bound)
    search_knots = y_knots if inverse else x_knots
    bin_index = (clamped[..., None] >= search_knots[..., 1:-1]).sum(-1)

    bin_x = _gather_bin(x_knots, bin_index)
    bin_y = _gather_bin(y_knots, bin_index)
    width = _gather_bin(widths, bin_index)
    height = _gather_bin(heights, bin_index)
    slope = height / width
    left_derivative = _gather_bin(derivatives, bin_index)
    right_derivative = _gather_bin(derivatives, bin_index + 1)
    curvature = left_derivative + right_derivative - 2 * slope

    if inverse:
        offset = clamped - bin_y
        a = height * (slope - left_derivative) + offset * curvature
        b = height * left_derivative - offset * curvature
        c = -slope * offset
        discriminant = (b.square() - 4 * a * c).clamp_min(0)
        xi = (2 * c) / (-b - discriminant.sqrt())
    else:
        xi = (clamped - bin_x) / width
    xi_one_minus_xi = xi * (1 - xi)
    denominator = slope + curvature * xi_one_minus_xi
    if inverse:
        outputs = bin_x + xi * width
    else:
        rise = slope * xi.square() + left_derivative * xi_one_minus_xi
        outputs = bin_y + height * rise / denominator
    numerator = slope.square() * (right_derivative * xi.square() + 2 * slope * xi_one_minus_xi
                                  + left_derivative * (1 - xi).square())
    log_derivative = numerator.log() - 2 * denominator.log()

    outputs = torch.where(inside, outputs, inputs)
    log_derivative = torch.where(inside, log_derivative, torch.zeros_like(log_derivative))
    return outputs, log_derivative


class RationalQuadraticSplineCoupling(nn.Module):
    """Neural spline coupling (Durkan et al. 2019): the first dim // 2 coordinates condition a
    K-bin monotone rational-quadratic spline per remaining coordinate, identity beyond
    +-tail_bound. Starts as the identity (uniform bins, unit derivatives)."""

    def __init__(self, dim: int, hidden: int, num_bins: int = 8, tail_bound: float = 5.0):
        super().__init__()
        self.conditioning_dim = dim // 2
        self.transformed_dim = dim - self.conditioning_dim
        self.num_bins = num_bins
        self.tail_bound = tail_bound
        self.conditioner = conditioner_network(self.conditioning_dim, hidden,
                                               self.transformed_dim * (3 * num_bins - 1))

    def _transform(self, inputs: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        conditioning, transformed = inputs.split([self.conditioning_dim, self.transformed_dim], -1)
        parameters = self.conditioner(conditioning).view(
            inputs.shape[0], self.transformed_dim, 3 * self.num_bins - 1)
        widths, heights, derivatives = parameters.split(
            [self.num_bins, self.num_bins, self.num_bins - 1], dim=-1)
        outputs, log_derivative = rational_quadratic_spline(
            transformed, widths, heights, derivatives, inverse=inverse, tail_bound=self.tail_bound)
        return torch.cat([conditioning, outputs], dim=-1), log_derivative.sum(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._transform(x, inverse=False)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self._transform(z, inverse=True)[0]


class NormalizingFlow(nn.Module):
    """Exact-likelihood density over R^dim: `layers` x (ActNorm, permutation, coupling).

    `layers=0` is allowed and is the identity map, i.e. a standard-normal density on the input.
    """

    def __init__(self, dim: int, layers: int = 4, hidden: int = 128, kind: FlowKind = "affine",
                 num_bins: int = 8, tail_bound: float = 5.0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling flow needs dim >= 2, got {dim}")
        if kind not in ("affine", "spline"):
            raise ValueError(f"unknown flow kind {kind!r}; expected 'affine' or 'spline'")
        self.dim = dim
        steps: list[nn.Module] = []
        for permutation in mixing_permutations(dim, layers):
            if kind == "affine":
                coupling: nn.Module = AffineCoupling(dim, hidden)
            else:
                coupling = RationalQuadraticSplineCoupling(dim, hidden, num_bins, tail_bound)
            steps += [ActNorm(dim), Permutation(permutation), coupling]
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, dim] -> (z [B, dim], log|det dz/dx| [B]), in at least fp32."""
        with full_precision(x.device):
            z = at_least_fp32(x)
            log_det = z.new_zeros(z.shape[0])
            for step in self.steps:
                z, step_log_det = step(z)
                log_det = log_det + step_log_det
            return z, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, dim] -> x [B, dim]."""
        with full_precision(z.device):
            x = at_least_fp32(z)
            for step in reversed(self.steps):
                x = step.inverse(x)
            return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of each row of x [B, dim] in nats -> [B]."""
        with full_precision(x.device):
            z, log_det = self(x)
            base_log_prob = -0.5 * z.square().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
            return base_log_prob + log_det

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw [num_samples, dim] vectors from the flow's density."""
        # With layers=0 there are no parameters: the flow is the standard normal itself.
        reference = next(self.parameters(), torch.empty(0))
        z = torch.randn(num_samples, self.dim, device=reference.device, dtype=reference.dtype,
                        generator=generator)
        return self.inverse(z)
