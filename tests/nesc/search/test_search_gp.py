"""nesc.search.gp: the closed-form leave-one-out likelihood against n refits, and expected improvement
against a Monte Carlo estimate."""

from __future__ import annotations

import torch

from nesc.search.gp import RBFGP, expected_improvement, gaussian_log_density

torch.set_default_dtype(torch.float32)


def _brute_force_loo(gp: RBFGP, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i log N(y_i; mean_i, var_i) of the GP conditioned on every point but i (noise included)."""
    total = torch.zeros((), dtype=z.dtype)
    full = gp.covariance(z)
    for i in range(len(y)):
        rest = [j for j in range(len(y)) if j != i]
        k_rest = full[rest][:, rest]
        k_i = full[rest, i]
        solve = torch.linalg.solve(k_rest, torch.stack([y[rest], k_i], 1))
        mean = k_i @ solve[:, 0]
        var = full[i, i] - k_i @ solve[:, 1]
        total = total + gaussian_log_density(y[i], mean, var)
    return total


def test_loo_log_likelihood_matches_leaving_each_point_out() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(12, generator=gen, dtype=torch.float64)
    gp = RBFGP(lengthscale=0.8, scale=1.3, noise=0.2).double()
    closed, brute = gp.loo_log_likelihood(z, y), _brute_force_loo(gp, z, y)
    torch.testing.assert_close(closed, brute, rtol=1e-9, atol=1e-9)


def test_loo_log_likelihood_has_gradients_for_the_embedding_and_the_kernel() -> None:
    z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    gp = RBFGP().double()
    gp.loo_log_likelihood(z, torch.randn(8, dtype=torch.float64)).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad) for p in gp.parameters())


def test_posterior_interpolates_the_observations_when_noise_is_small() -> None:
    z = torch.randn(6, 2, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)
    gp = RBFGP(noise=1e-4).double()
    mean, std = gp.posterior(z, y, z)
    torch.testing.assert_close(mean, y, atol=1e-3, rtol=0)
    assert bool((std < 1e-2).all())


def test_expected_improvement_matches_monte_carlo() -> None:
    mean, std = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.5, 2.0, 0.1])
    samples = mean + std * torch.randn(400_000, 3, generator=torch.Generator().manual_seed(1))
    mc = (samples - 0.5).clamp_min(0).mean(0)
    torch.testing.assert_close(expected_improvement(mean, std, 0.5), mc, atol=5e-3, rtol=0)
