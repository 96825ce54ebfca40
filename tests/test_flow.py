"""Normalising flow: invertibility, exact log-determinants, density fitting, precision."""

import copy

import pytest
import torch

from flm_dist.models import NormalizingFlow
from flm_dist.models.flow import (
    ActNorm,
    AffineCoupling,
    Permutation,
    RationalQuadraticSplineCoupling,
    rational_quadratic_spline,
)

KINDS = ["affine", "spline"]



def perturbed(module: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its (identity) initialisation so transforms are non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def initialized_flow(kind: str, dim: int = 4, scale: float = 0.05) -> NormalizingFlow:
    torch.manual_seed(0)
    flow = NormalizingFlow(dim, layers=3, hidden=16, kind=kind)
    flow(torch.randn(256, dim) * 2 + 1)  # ActNorm data-dependent init
    return perturbed(flow, scale)


def log_abs_det_jacobian(function, x: torch.Tensor) -> torch.Tensor:
    """Reference log|det J| per row, from autograd's full Jacobian of a row-wise map."""
    values = []
    for row in x:
        jacobian = torch.autograd.functional.jacobian(lambda v: function(v[None])[0][0], row)
        values.append(torch.linalg.slogdet(jacobian)[1])
    return torch.stack(values)


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_undoes_forward(kind):
    flow = initialized_flow(kind)
    x = torch.randn(512, 4) * 2 + 1
    z, _ = flow(x)
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow(flow.inverse(z))[0], z, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_undoes_forward_in_float64_for_strongly_perturbed_flows(kind):
    flow = perturbed(initialized_flow(kind), 0.2, seed=1).double()
    x = torch.randn(256, 4, dtype=torch.float64) * 4
    z, _ = flow(x)
    assert z.dtype == torch.float64
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-8, rtol=0)


def _single_layers() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    actnorm = ActNorm(4)
    actnorm(torch.randn(64, 4) * 3 + 2)
    return {
        "actnorm": actnorm,
        "permutation": Permutation(torch.tensor([2, 0, 3, 1])),
        "affine": perturbed(AffineCoupling(4, 16), 0.3),
        "spline": perturbed(
            RationalQuadraticSplineCoupling(4, 16, num_bins=6, tail_bound=3.0), 0.3),
    }


@pytest.mark.parametrize("name", ["actnorm", "permutation", "affine", "spline"])
def test_each_layer_log_det_equals_autograd_jacobian(name):
    layer = _single_layers()[name].double()
    # Spread wide enough that spline inputs land both inside [-3, 3] and in the linear tails.
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3
    _, log_det = layer(x)
    torch.testing.assert_close(log_det, log_abs_det_jacobian(layer, x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(layer.inverse(layer(x)[0]), x, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_whole_flow_log_det_equals_autograd_jacobian(kind):
    flow = perturbed(initialized_flow(kind), 0.2, seed=2).double()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 2
    _, log_det = flow(x)
    torch.testing.assert_close(log_det, log_abs_det_jacobian(flow, x), atol=1e-8, rtol=1e-8)


def test_spline_is_identity_at_zero_parameters_and_in_tails():
    inputs = torch.linspace(-6, 6, 101)
    zeros_k = torch.zeros(101, 8)
    outputs, log_derivative = rational_quadratic_spline(
        inputs, zeros_k, zeros_k, torch.zeros(101, 7), inverse=False, tail_bound=5.0)
    torch.testing.assert_close(outputs, inputs)
    torch.testing.assert_close(log_derivative, torch.zeros(101), atol=1e-6, rtol=0)

    generator = torch.Generator().manual_seed(0)
    widths, heights = torch.randn(2, 101, 8, generator=generator)
    derivatives = torch.randn(101, 7, generator=generator)
    outputs, log_derivative = rational_quadratic_spline(
        inputs, widths, heights, derivatives, inverse=False, tail_bound=5.0)
    tails = inputs.abs() > 5
    torch.testing.assert_close(outputs[tails], inputs[tails])
    assert torch.all(log_derivative[tails] == 0)
    assert torch.isfinite(outputs).all() and torch.isfinite(log_derivative).all()


@pytest.mark.parametrize("kind", KINDS)
def test_density_integrates_to_one(kind):
    flow = perturbed(NormalizingFlow(2, layers=3, hidden=16, kind=kind), 0.1)
    flow(torch.randn(512, 2, generator=torch.Generator().manual_seed(0)))
    grid = torch.linspace(-9, 9, 361)
    cell = (grid[1] - grid[0]) ** 2
    points = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        mass = flow.log_prob(points).exp().sum() * cell
    assert abs(mass.item() - 1.0) < 5e-3


def test_actnorm_data_init_standardises_first_batch_and_only_once():
    torch.manual_seed(0)
    actnorm = ActNorm(5)
    first = torch.randn(128, 5) * torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5]) + 7
    z, _ = actnorm(first)
    torch.testing.assert_close(z.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    assert bool(actnorm.initialized)

    parameters = [p.detach().clone() for p in actnorm.parameters()]
    actnorm(torch.randn(128, 5) * 100)
    for before, after in zip(parameters, actnorm.parameters()):
        torch.testing.assert_close(after, before)


def test_loaded_checkpoint_is_not_reinitialised():
    torch.manual_seed(0)
    trained = NormalizingFlow(3, layers=2, hidden=8)
    trained(torch.randn(64, 3) * 4 - 2)
    fresh = NormalizingFlow(3, layers=2, hidden=8)
    fresh.load_state_dict(trained.state_dict())
    probe = torch.randn(16, 3) * 50 + 10  # would give very different ActNorm stats
    torch.testing.assert_close(fresh(probe)[0], trained(probe)[0])

    # Loading an uninitialised state into a flow that already initialised must re-arm the init.
    trained.load_state_dict(NormalizingFlow(3, layers=2, hidden=8).state_dict())
    z, _ = trained(probe)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-4, rtol=0)


def test_flow_stays_fp32_inside_bf16_autocast():
    flow = initialized_flow("spline", scale=0.1)
    x = torch.randn(32, 4).bfloat16().float()  # exactly representable in bf16
    float64_flow = copy.deepcopy(flow).double()
    reference_z, reference_log_det = (t.float() for t in float64_flow(x.double()))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        z, log_det = flow(x.bfloat16())
        log_prob = flow.log_prob(x)
        inverse = flow.inverse(z)
    assert z.dtype == log_det.dtype == log_prob.dtype == inverse.dtype == torch.float32
    # bf16 matmuls inside the flow would be off by ~1e-2 here.
    torch.testing.assert_close(z, reference_z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det, reference_log_det, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inverse, x, atol=1e-5, rtol=0)


def test_zero_layer_flow_is_the_standard_normal():
    flow = NormalizingFlow(3, layers=0)
    x = torch.randn(10, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(flow.log_prob(x), expected)
    assert flow.sample(7).shape == (7, 3)


def test_invalid_configurations_raise():
    with pytest.raises(ValueError, match="dim >= 2"):
        NormalizingFlow(1)
    with pytest.raises(ValueError, match="unknown flow kind"):
        NormalizingFlow(4, kind="glow")
    with pytest.raises(ValueError, match="at least 2"):
        NormalizingFlow(4)(torch.randn(1, 4))


# --- Fitting a known Gaussian --------------------------------------------------------------------

DIM = 3
STEPS = 150
LEARNING_RATE = 3e-3


@pytest.fixture(scope="module")
def gaussian_data() -> tuple[torch.distributions.MultivariateNormal, torch.Tensor, torch.Tensor]:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5])
    scale_tril = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.5, 0.3, 0.4]])
    truth = torch.distributions.MultivariateNormal(mean, scale_tril=scale_tril)
    train, test = truth.sample((1024,)), truth.sample((4096,))
    torch.random.set_rng_state(generator_state)
    return truth, train, test


def fit(log_prob, parameters, train: torch.Tensor) -> None:
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
    for _ in range(STEPS):
        optimizer.zero_grad()
        (-log_prob(train).mean()).backward()
        optimizer.step()


def fit_ours(kind: str, train: torch.Tensor) -> NormalizingFlow:
    torch.manual_seed(1)
    flow = NormalizingFlow(DIM, layers=3, hidden=16, kind=kind)
    fit(flow.log_prob, flow.parameters(), train)
    return flow


def fit_zuko(kind: str, train: torch.Tensor) -> float:
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(1)
    build = zuko.flows.MAF if kind == "affine" else zuko.flows.NSF
    flow = build(DIM, transforms=3, hidden_features=(16, 16))
    fit(lambda x: flow().log_prob(x), flow.parameters(), train)
    return flow


@pytest.mark.parametrize("kind", KINDS)
def test_fitted_nll_approaches_true_entropy_and_matches_zuko(kind, gaussian_data):
    truth, train, test = gaussian_data
    true_nll = -truth.log_prob(test).mean().item()
    assert abs(true_nll - truth.entropy().item()) < 0.05  # the test set is big enough

    ours = fit_ours(kind, train)
    with torch.no_grad():
        our_nll = -ours.log_prob(test).mean().item()
    assert our_nll >= true_nll - 0.02 * DIM  # cannot beat the true density by much out of sample
    assert our_nll - true_nll < 0.06 * DIM  # per dimension, within 0.06 nats of the truth

    zuko_flow = fit_zuko(kind, train)
    with torch.no_grad():
        zuko_nll = -zuko_flow().log_prob(test).mean().item()
    assert our_nll - zuko_nll < 0.1 * DIM

    with torch.no_grad():
        z, _ = ours(test)
        torch.testing.assert_close(ours.inverse(z), test, atol=1e-5, rtol=0)
        samples = ours.sample(8192, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(samples.mean(0), truth.mean, atol=0.1, rtol=0)
    torch.testing.assert_close(samples.T.cov(), truth.covariance_matrix, atol=0.15, rtol=0)
