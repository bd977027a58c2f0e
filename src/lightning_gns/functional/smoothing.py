r"""Bias-corrected exponential moving averages of the per-step noise-scale estimates.

The numerator (:math:`\operatorname{tr}\Sigma`) and the denominator (:math:`|G|^2`) are smoothed separately, and
so are their squares and product, which give the uncertainty; the ratio is taken only when reading out.

A step that covers ``elapsed`` units of time (1 step, or the number of examples in the step) decays the history
by :math:`\beta = e^{-\text{elapsed}/\text{horizon}}`. With the horizon in examples, a run whose batch size changes
keeps the same amount of history: doubling the batch halves the number of steps remembered. Weights are kept
unnormalised (:math:`\sum_i w_i = 1 - \prod \beta`), which is the bias correction of Adam and Pollux and works
with a decay that changes from step to step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_gns.functional.noise_scale import (
    BatchSize,
    NoiseScaleSums,
    _check_confidence,
    _finite_estimates,
    _gns_compute,
)

__all__ = ["NoiseScaleEMA", "ema_compute", "ema_init", "ema_update"]


class NoiseScaleEMA(NoiseScaleSums):
    """State of the smoothed estimates: decayed weighted sums (see :class:`NoiseScaleSums`).

    The weights of the steps add up to ``weight`` (below 1 until the history is long against the horizon, which is
    what the bias correction divides by).
    """


def ema_init(
    shape: tuple[int, ...] = (), dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> NoiseScaleEMA:
    """An empty moving average for estimates of the given shape (``()`` for one model-wide value).

    Example::

        >>> ema_init((2,)).weight
        tensor([0., 0.])
    """
    zero = torch.zeros(shape, dtype=dtype, device=device)
    return NoiseScaleEMA(*(zero.clone() for _ in NoiseScaleSums._fields))


def ema_update(
    state: NoiseScaleEMA,
    sq_norm_small: Tensor | float,
    sq_norm_big: Tensor | float,
    batch_small: BatchSize,
    batch_big: BatchSize,
    horizon: float,
    elapsed: float | Tensor = 1.0,
    population_size: int | None = None,
) -> tuple[NoiseScaleEMA, Tensor]:
    r"""Fold one step's squared norms into the moving average.

    Entries whose estimates are not finite (an AMP overflow) leave the state untouched, decay included, and are
    flagged in the second return value. Negative single-step estimates are noise and are kept.

    Args:
        state: the state so far (from :func:`ema_init` or a previous update).
        sq_norm_small: squared norm at the small batch size, shape of the state.
        sq_norm_big: squared norm at the big batch size.
        batch_small: small batch size.
        batch_big: big batch size.
        horizon: time constant of the average, in the unit of ``elapsed``.
        elapsed: the time this step covers: ``1`` for a horizon in steps, the number of examples in the step
            (usually ``batch_big``) for a horizon in examples.
        population_size: examples drawn from without replacement (see :func:`gns_estimates`), or ``None``.

    Returns:
        ``(new_state, skipped)``: the updated state and a boolean tensor marking entries left out.

    Raises:
        ValueError: if ``horizon`` or ``elapsed`` is not positive.

    Example::

        >>> import torch
        >>> state = ema_init()
        >>> for small, big in [(3.0, 1.5), (2.6, 1.6)]:
        ...     state, _ = ema_update(state, torch.tensor(small), torch.tensor(big), 8, 32, horizon=1e9)
        >>> ema_compute(state)["b_simple"]  # a very long horizon is a plain average
        tensor(11.76...)
    """
    if not isinstance(horizon, int | float) or not horizon > 0 or math.isinf(horizon):
        raise ValueError(f"Expected `horizon` to be a positive, finite number of steps or examples, got {horizon!r}.")
    if isinstance(elapsed, int | float) and not elapsed > 0:
        raise ValueError(f"Expected `elapsed` to be positive (1 step or the examples in the step), got {elapsed!r}.")
    grad_sq_norm, trace_sigma, finite = _finite_estimates(
        sq_norm_small, sq_norm_big, batch_small, batch_big, population_size
    )
    # 1 - β computed as -expm1 keeps its precision when the horizon is many orders longer than one step.
    new_weight = -torch.expm1(-torch.as_tensor(elapsed, dtype=grad_sq_norm.dtype, device=grad_sq_norm.device) / horizon)
    new_weight = torch.where(finite, new_weight, torch.zeros_like(grad_sq_norm))
    keep = 1.0 - new_weight
    step: tuple[Tensor | float, ...] = (
        1.0,
        1.0,
        grad_sq_norm,
        trace_sigma,
        grad_sq_norm**2,
        trace_sigma**2,
        grad_sq_norm * trace_sigma,
    )
    decayed = NoiseScaleEMA(*(keep * old + new_weight * value for old, value in zip(state, step, strict=True)))
    # The effective sample size needs the sum of squared weights, which decays with β².
    return decayed._replace(weight_sq=keep**2 * state.weight_sq + new_weight**2), ~finite


def ema_compute(state: NoiseScaleEMA, confidence: float = 0.9) -> dict[str, Tensor]:
    """Read the smoothed noise scale out of a moving average: the same keys as the metric's ``compute``.

    ``effective_steps`` is the number of equally weighted steps that would give the same precision; with a
    stationary signal it tends to about twice the horizon in steps.
    """
    _check_confidence(confidence)
    return _gns_compute(state, confidence)
