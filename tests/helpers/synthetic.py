"""Synthetic gradients with a known mean and covariance, and finite populations of per-example gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianGradients:
    """Per-example gradients g_i = G + ε_i, ε_i ~ N(0, diag(sigma_diag)): |G|², tr Σ and B_simple in closed form."""

    mean: Tensor
    sigma_diag: Tensor

    @classmethod
    def anisotropic(cls, dim: int = 64, grad_sq_norm: float = 1.0, trace_sigma: float = 100.0, spread: float = 100.0):
        """A covariance whose diagonal spans `spread`:1 (log-spaced), scaled to the requested trace."""
        gen = torch.Generator().manual_seed(1234)
        direction = torch.randn(dim, generator=gen, dtype=torch.float64)
        mean = direction / direction.norm() * grad_sq_norm**0.5
        diag = torch.logspace(0, -torch.log10(torch.tensor(spread)).item(), dim, dtype=torch.float64)
        return cls(mean=mean, sigma_diag=diag / diag.sum() * trace_sigma)

    @property
    def grad_sq_norm(self) -> float:
        return float(self.mean.pow(2).sum())

    @property
    def trace_sigma(self) -> float:
        return float(self.sigma_diag.sum())

    @property
    def b_simple(self) -> float:
        return self.trace_sigma / self.grad_sq_norm

    def step_norms(
        self, batch_per_rank: int, world_size: int, shape: tuple[int, ...], generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Squared norms of one step as DDP ranks see it, for `shape` independent steps.

        Each rank draws its own `batch_per_rank` examples (disjoint): its mean gradient is exactly N(G, Σ/b) for
        Gaussian examples. The small-batch squared norm is the average of the ranks' local squared norms, the big
        one is the squared norm of the average over ranks (the all-reduced gradient).
        """
        noise = torch.randn(*shape, world_size, self.mean.numel(), generator=generator, dtype=torch.float64)
        rank_means = self.mean + noise * (self.sigma_diag / batch_per_rank).sqrt()
        sq_norm_small = rank_means.pow(2).sum(-1).mean(-1)
        sq_norm_big = rank_means.mean(-2).pow(2).sum(-1)
        return sq_norm_small, sq_norm_big


def finite_population(num_examples: int, dim: int, seed: int = 0) -> Tensor:
    """A fixed set of per-example 'gradients' with a non-zero mean and anisotropic spread."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1, dim, dtype=torch.float64)
    return 0.3 + torch.randn(num_examples, dim, generator=gen, dtype=torch.float64) * scales


def population_truth(per_example: Tensor) -> tuple[float, float]:
    """|G|² of the full-data gradient and tr(S²) of the finite-population covariance (divisor N - 1)."""
    mean = per_example.mean(0)
    trace_s2 = float(((per_example - mean) ** 2).sum() / (per_example.shape[0] - 1))
    return float(mean.pow(2).sum()), trace_s2


def z_score(samples: Tensor, expected: float) -> float:
    """How many standard errors the sample mean lies from `expected`."""
    return float((samples.mean() - expected) / (samples.std() / samples.numel() ** 0.5))
