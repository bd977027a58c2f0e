"""DDP with accumulation: which of the three gradient levels to pair, measured on synthetic gradients.

Pins down the claim behind ``source="auto"`` picking ``accumulation`` under DDP: the micro-batch/global pair is as
precise as the best linear unbiased combination of all three levels, and much more precise than the rank/global
pair that the ``ddp`` source uses.
"""

from __future__ import annotations

import pytest
import torch

from lightning_gns.functional import gns_estimates


def _levels(world, accumulate, micro, steps=3000, dim=120, seed=0):
    """Mean squared norms of the micro-batch, rank and global gradients of many steps, and their batch sizes."""
    generator = torch.Generator().manual_seed(seed)
    sigma = torch.logspace(0, -2, dim, dtype=torch.float64)
    sigma *= 200 / sigma.sum()  # tr Σ = 200, 100:1 anisotropic
    grad = torch.randn(dim, generator=generator, dtype=torch.float64)
    grad /= grad.norm()  # |G|² = 1
    # A micro-batch mean of b examples is G + noise with covariance Σ/b.
    noise = torch.randn(steps, world, accumulate, dim, generator=generator, dtype=torch.float64)
    micro_grads = grad + noise * (sigma / micro).sqrt()
    rank_grads = micro_grads.mean(2)
    global_grads = rank_grads.mean(1)
    means = torch.stack(
        [
            micro_grads.pow(2).sum(-1).mean((1, 2)),
            rank_grads.pow(2).sum(-1).mean(1),
            global_grads.pow(2).sum(-1),
        ],
        dim=1,
    )
    sizes = torch.tensor([micro, micro * accumulate, micro * accumulate * world], dtype=torch.float64)
    return means, sizes


@pytest.mark.parametrize(("world", "accumulate", "micro"), [(2, 4, 8), (4, 2, 16), (2, 8, 4)])
def test_micro_global_pair_is_the_most_precise_use_of_three_levels(world, accumulate, micro):
    means, sizes = _levels(world, accumulate, micro)

    def pair_trace(i, j):
        _, trace = gns_estimates(means[:, i], means[:, j], sizes[i], sizes[j])
        return trace

    micro_global, rank_global = pair_trace(0, 2), pair_trace(1, 2)
    for trace in (micro_global, rank_global):
        assert float(trace.mean()) == pytest.approx(200, rel=0.03)  # both unbiased

    # The best linear unbiased combination of the three levels: generalised least squares of the levels'
    # means on (1, 1/B) with their empirical covariance; its tr(Σ) variance is the bound of any combination.
    design = torch.stack([torch.ones(3, dtype=torch.float64), 1 / sizes])
    precision = torch.linalg.inv(torch.cov(means.T))
    blue_sd = torch.linalg.inv(design @ precision @ design.T)[1, 1].sqrt()

    assert float(micro_global.std()) <= 1.05 * float(blue_sd)
    assert float(rank_global.std()) >= 1.4 * float(micro_global.std())
