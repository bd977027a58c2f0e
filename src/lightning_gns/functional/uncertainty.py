r"""Uncertainty of a ratio of two estimated means, such as :math:`B_{simple} = \bar t / \bar g`.

Two views of the same information, both computed from the means, their variances and covariance:

* :func:`ratio_std`, the delta method: a standard error for display, fine while the denominator is many
  standard errors away from zero.
* :func:`ratio_interval`, Fieller's interval: the set of ratios :math:`\rho` that the data cannot reject,
  :math:`(a - \rho b)^2 \le z^2 (v_{aa} - 2\rho v_{ab} + \rho^2 v_{bb})`. Unlike the delta method it stays
  honest when :math:`|G|^2` is barely resolved (late in training, when the noise scale is large): the upper
  end then becomes infinite while the lower end still says how large the noise scale is at least.

Since both :math:`\operatorname{tr}\Sigma` and :math:`|G|^2` are non-negative, the interval is intersected with
:math:`[0, \infty]` and reported by its two ends.
"""

from __future__ import annotations

from statistics import NormalDist

import torch
from torch import Tensor

__all__ = ["ratio_interval", "ratio_std"]


def ratio_std(ratio: Tensor, denominator: Tensor, var_num: Tensor, var_den: Tensor, cov: Tensor) -> Tensor:
    r"""Delta-method standard error of ``ratio = numerator / denominator``.

    .. math:: \operatorname{se}(R) = \frac{\sqrt{v_{aa} - 2 R\, v_{ab} + R^2 v_{bb}}}{|b|}

    Example::

        >>> import torch
        >>> ratio_std(torch.tensor(10.0), torch.tensor(2.0), torch.tensor(4.0), torch.tensor(0.01), torch.tensor(0.0))
        tensor(1.1180)
    """
    variance = (var_num - 2.0 * ratio * cov + ratio**2 * var_den).clamp(min=0.0)
    return variance.sqrt() / denominator.abs()


def ratio_interval(
    numerator: Tensor,
    denominator: Tensor,
    var_num: Tensor,
    var_den: Tensor,
    cov: Tensor,
    confidence: float = 0.9,
) -> tuple[Tensor, Tensor]:
    r"""Fieller's confidence interval for a ratio of two jointly (asymptotically) normal means, within [0, ∞].

    Solves :math:`A\rho^2 - 2B\rho + C \le 0` with :math:`A = b^2 - z^2 v_{bb}`, :math:`B = ab - z^2 v_{ab}`,
    :math:`C = a^2 - z^2 v_{aa}`. When :math:`A > 0` (the denominator is resolved) the set is the bounded interval
    between the roots. Otherwise it is unbounded: ``upper`` is ``inf`` and ``lower`` is the larger root (or 0 when
    the data exclude no ratio at all).

    Args:
        numerator: estimated mean of the numerator, :math:`a`.
        denominator: estimated mean of the denominator, :math:`b`.
        var_num: variance of ``numerator`` (of the mean, not of one sample).
        var_den: variance of ``denominator``.
        cov: their covariance.
        confidence: two-sided coverage, for example 0.9.

    Returns:
        ``(lower, upper)``, tensors of the broadcast shape; NaN where the inputs are NaN or where every ratio the
        data allow is negative.

    Example::

        >>> import torch
        >>> lower, upper = ratio_interval(
        ...     torch.tensor(10.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.01), torch.tensor(0.0)
        ... )
        >>> lower, upper
        (tensor(7.90...), tensor(12.65...))
    """
    z_sq = NormalDist().inv_cdf(0.5 + confidence / 2.0) ** 2
    a, b = numerator, denominator
    quad = b**2 - z_sq * var_den
    half_linear = a * b - z_sq * cov
    const = a**2 - z_sq * var_num
    discriminant = half_linear**2 - quad * const
    sqrt_disc = discriminant.clamp(min=0.0).sqrt()
    root_minus = (half_linear - sqrt_disc) / quad
    root_plus = (half_linear + sqrt_disc) / quad
    zero = torch.zeros_like(root_minus)
    inf = torch.full_like(root_minus, float("inf"))

    bounded = quad > 0
    # quad < 0: the set is (-inf, root_plus] ∪ [root_minus, inf); only the right ray meets [0, inf)
    # unless the left ray reaches past 0 too (then the hull is all of [0, inf)).
    whole_line = (discriminant < 0) | (root_plus >= 0)
    lower = torch.where(bounded, root_minus.clamp(min=0.0), torch.where(whole_line, zero, root_minus.clamp(min=0.0)))
    upper = torch.where(bounded, root_plus.clamp(min=0.0), inf)
    # A bounded set of only negative ratios (|G|² or tr Σ confidently below 0, e.g. the finite-population bias of
    # |G|² near convergence) says nothing about a non-negative noise scale: no interval rather than [0, 0].
    empty = bounded & (root_plus < 0)
    missing = empty | ~(torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(var_num) & torch.isfinite(var_den))
    nan = torch.full_like(lower, float("nan"))
    return torch.where(missing, nan, lower), torch.where(missing, nan, upper)
