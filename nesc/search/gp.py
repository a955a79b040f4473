"""An exact Gaussian process with an RBF kernel, its leave-one-out likelihood, and expected improvement.

Why a small exact GP in torch and not gpytorch/botorch: the search sees at most a few hundred
evaluated plans, so the exact O(n^3) Cholesky solve costs microseconds; ESNAC trains the *embedding*
(an LSTM) through the kernel by maximising the leave-one-out predictive log-likelihood, which for an
exact GP has a closed form (Rasmussen & Williams, 2006, eq. 5.10-5.12) that is a few lines of autograd-
friendly torch; and the search keeps no dependency beyond torch. gpytorch's deep-kernel machinery and
botorch's acquisition optimisers target continuous spaces and large n; here the candidates are
discrete plans scored in one batch.

Shapes: ``z`` (n, d) embeddings, ``y`` (n,) standardised rewards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

JITTER = 1e-6


class RBFGP(nn.Module):
    """k(a, b) = s^2 exp(-|a - b|^2 / (2 l^2)) + noise^2 [a = b]; constant mean 0 (y is standardised)."""

    def __init__(self, lengthscale: float = 0.5, scale: float = 1.0, noise: float = 0.1) -> None:
        super().__init__()
        self.log_lengthscale = nn.Parameter(torch.tensor(math.log(lengthscale)))
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.log_noise = nn.Parameter(torch.tensor(math.log(noise)))

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)  # (n, m)
        return self.log_scale.exp().pow(2) * torch.exp(-0.5 * d2 / self.log_lengthscale.exp().pow(2))

    def covariance(self, z: Tensor) -> Tensor:
        n = z.shape[0]
        eye = torch.eye(n, dtype=z.dtype, device=z.device)
        return self.kernel(z, z) + (self.log_noise.exp().pow(2) + JITTER) * eye

    def loo_log_likelihood(self, z: Tensor, y: Tensor) -> Tensor:
        """sum_i log p(y_i | y_-i): with K^-1 = A, mu_i = y_i - [A y]_i / A_ii and var_i = 1 / A_ii."""
        inv = torch.cholesky_inverse(torch.linalg.cholesky(self.covariance(z)))
        diag = inv.diagonal()
        alpha = inv @ y
        var = 1.0 / diag
        resid = alpha / diag  # y_i - mu_i
        return (-0.5 * torch.log(2 * math.pi * var) - 0.5 * resid.pow(2) / var).sum()

    def posterior(self, z: Tensor, y: Tensor, zq: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of f at ``zq`` (m, d) given (z, y)."""
        chol = torch.linalg.cholesky(self.covariance(z))
        kq = self.kernel(z, zq)  # (n, m)
        mean = kq.T @ torch.cholesky_solve(y[:, None], chol)[:, 0]
        v = torch.cholesky_solve(kq, chol)
        var = self.log_scale.exp().pow(2) - (kq * v).sum(0)
        return mean, var.clamp_min(1e-12).sqrt()


def gaussian_log_density(y: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return -0.5 * torch.log(2 * math.pi * var) - 0.5 * (y - mean).pow(2) / var


def expected_improvement(mean: Tensor, std: Tensor, best: float) -> Tensor:
    """E[max(f - best, 0)] for f ~ N(mean, std^2) (maximisation)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    u = (mean - best) / std
    return (mean - best) * normal.cdf(u) + std * normal.log_prob(u).exp()
