r"""The two-batch-size estimators of the gradient noise scale (McCandlish et al. 2018, appendix A.1).

A mini-batch gradient :math:`G_B` over :math:`B` examples satisfies
:math:`\mathbb{E}|G_B|^2 = |G|^2 + \operatorname{tr}(\Sigma)/B`, so squared norms measured at two batch sizes
give unbiased estimates of both terms. Everything here is pure torch, works on any float dtype and device,
and never synchronises with the host: validation looks only at Python numbers, shapes and dtypes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_gns.functional.uncertainty import ratio_interval, ratio_std

BatchSize = int | float | Tensor

__all__ = [
    "BatchSize",
    "NoiseScaleSums",
    "b_simple",
    "gns_estimates",
    "gradient_noise_scale",
    "relative_examples",
    "relative_steps",
]


def _as_float_tensor(name: str, value: Tensor | float) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, Tensor | int | float):
        raise TypeError(f"Expected `{name}` to be a floating-point tensor or a number, but got {type(value).__name__}.")
    if not isinstance(value, Tensor):
        return torch.as_tensor(float(value), dtype=torch.get_default_dtype())
    if not value.is_floating_point():
        raise TypeError(
            f"Expected `{name}` to be a floating-point tensor, but got dtype {value.dtype}. "
            f"Squared norms are real numbers: pass `{name}.float()`."
        )
    return value


def _check_batch_size(name: str, value: BatchSize) -> None:
    if isinstance(value, bool) or not isinstance(value, Tensor | int | float):
        raise TypeError(f"Expected `{name}` to be a positive number or tensor, but got {type(value).__name__}.")
    # Only values that are already on the host are checked: looking at an accelerator tensor would sync.
    if isinstance(value, Tensor):
        if value.device.type != "cpu":
            return
        bad = bool((~(value > 0)).any())
    else:
        bad = not value > 0
    if bad:
        raise ValueError(f"Expected `{name}` to be positive (a number of examples), but got {value}.")


def _check_batch_order(batch_small: BatchSize, batch_big: BatchSize) -> None:
    on_host = [not isinstance(v, Tensor) or v.device.type == "cpu" for v in (batch_small, batch_big)]
    if not all(on_host):
        return
    if bool(torch.as_tensor(batch_small >= batch_big).any()):
        raise ValueError(
            f"Expected `batch_small` < `batch_big`, but got batch_small={batch_small} and batch_big={batch_big}. "
            "The small batch is the one the big batch is made of (a rank's or a micro-batch's share): swap the "
            "arguments, or measure at two different batch sizes."
        )


def gns_estimates(
    sq_norm_small: Tensor | float,
    sq_norm_big: Tensor | float,
    batch_small: BatchSize,
    batch_big: BatchSize,
    population_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Unbiased estimates of :math:`|G|^2` and :math:`\operatorname{tr}(\Sigma)` from two batch sizes.

    .. math::

        |G|^2 \approx \frac{B_{big}|G_{big}|^2 - B_{small}|G_{small}|^2}{B_{big} - B_{small}}, \qquad
        \operatorname{tr}(\Sigma) \approx \frac{|G_{small}|^2 - |G_{big}|^2}{1/B_{small} - 1/B_{big}}

    Batched over any leading dimensions (layers, steps): the squared norms must have the same shape, the batch
    sizes are numbers or tensors that broadcast against them. A single estimate is noisy and may be negative;
    that is legal and must be kept, or averages become biased.

    Batches drawn without replacement from a finite data set of :math:`N` examples (an epoch) bias the first
    estimate: its expectation is :math:`|G|^2 - \operatorname{tr}(S^2)/N`, while the second stays unbiased for
    :math:`\operatorname{tr}(S^2)`. Passing ``population_size=N`` adds the second estimate divided by :math:`N` to
    the first, which makes it unbiased for the full-data :math:`|G|^2` (it matters when :math:`B_{simple}` is not
    small against :math:`N`).

    Args:
        sq_norm_small: squared norm of the gradient averaged over ``batch_small`` examples.
        sq_norm_big: squared norm of the gradient averaged over ``batch_big`` examples.
        batch_small: the small batch size (examples), positive.
        batch_big: the big batch size, larger than ``batch_small``.
        population_size: the number of examples the batches are drawn from without replacement, or ``None``
            for i.i.d. draws (no correction).

    Returns:
        ``(grad_sq_norm, trace_sigma)``, each with the shape of the squared norms.

    Raises:
        TypeError: if a squared norm is an integer tensor or not a number.
        ValueError: if the shapes differ, a batch size is not positive, ``batch_small >= batch_big``, or
            ``population_size`` is smaller than 2.

    Example::

        >>> import torch
        >>> from lightning_gns.functional import gns_estimates
        >>> grad_sq_norm, trace_sigma = gns_estimates(torch.tensor(3.0), torch.tensor(1.5), 8, 32)
        >>> grad_sq_norm, trace_sigma
        (tensor(1.), tensor(16.))
    """
    small = _as_float_tensor("sq_norm_small", sq_norm_small)
    big = _as_float_tensor("sq_norm_big", sq_norm_big)
    if small.shape != big.shape:
        raise ValueError(
            "Expected `sq_norm_small` and `sq_norm_big` to have the same shape (one pair per layer or step), "
            f"but got {tuple(small.shape)} and {tuple(big.shape)}."
        )
    _check_batch_size("batch_small", batch_small)
    _check_batch_size("batch_big", batch_big)
    _check_batch_order(batch_small, batch_big)
    b_small = _as_batch(batch_small, small)
    b_big = _as_batch(batch_big, small)
    grad_sq_norm = (b_big * big - b_small * small) / (b_big - b_small)
    trace_sigma = (small - big) / (1.0 / b_small - 1.0 / b_big)
    if population_size is not None:
        if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
            raise ValueError(
                f"Expected `population_size` to be the number of examples (an int >= 2), or None, but got "
                f"{population_size!r}."
            )
        grad_sq_norm = grad_sq_norm + trace_sigma / population_size
    return grad_sq_norm, trace_sigma


def _as_batch(batch: BatchSize, like: Tensor) -> Tensor | float:
    if isinstance(batch, Tensor):
        return batch.to(dtype=like.dtype, device=like.device)
    return float(batch)


def suggested_batch_size(b_crit: float, b_crit_lower: float = math.nan) -> int | None:
    """The power of two nearest (in log scale) to the critical-batch estimate, not below its interval's lower end.

    Args:
        b_crit: the estimate (``b_crit_factor`` × B_simple).
        b_crit_lower: the lower end of its interval (``b_crit_factor`` × the lower end of B_simple's); NaN for none.

    Returns:
        The batch size, or ``None`` while the estimate is undefined.

    Example::

        >>> suggested_batch_size(90.0), suggested_batch_size(90.0, b_crit_lower=100.0), suggested_batch_size(math.nan)
        (64, 128, None)
    """
    if not math.isfinite(b_crit) or b_crit <= 0:
        return None
    floor = b_crit_lower if math.isfinite(b_crit_lower) else 0.0
    return 2 ** max(0, round(math.log2(max(b_crit, floor))))


def b_simple(trace_sigma: Tensor, grad_sq_norm: Tensor) -> Tensor:
    r"""The simple noise scale :math:`B_{simple} = \operatorname{tr}(\Sigma)/|G|^2`, NaN where it is undefined.

    Meant for smoothed estimates: where :math:`|G|^2 \le 0` or :math:`\operatorname{tr}(\Sigma) < 0` (noise has
    not averaged out yet) the ratio is meaningless and is returned as NaN, never clamped.

    Args:
        trace_sigma: estimate of the trace of the per-example gradient covariance.
        grad_sq_norm: estimate of the squared norm of the true gradient.

    Returns:
        The ratio, NaN where it is not defined.

    Example::

        >>> import torch
        >>> from lightning_gns.functional import b_simple
        >>> b_simple(torch.tensor([16.0, 16.0]), torch.tensor([1.0, -0.5]))
        tensor([16., nan])
    """
    defined = (grad_sq_norm > 0) & (trace_sigma >= 0)
    return torch.where(defined, trace_sigma / grad_sq_norm, torch.full_like(grad_sq_norm, float("nan")))


def relative_steps(batch_size: Tensor | float, b_noise: Tensor | float) -> Tensor:
    r"""Predicted optimizer steps over the minimum, :math:`S/S_{min} = 1 + B_{noise}/B` (McCandlish et al. eq. 2.11).

    Example::

        >>> from lightning_gns.functional import relative_steps
        >>> relative_steps(torch.tensor([64.0, 256.0]), 256.0)
        tensor([5., 2.])
    """
    return 1.0 + torch.as_tensor(b_noise) / torch.as_tensor(batch_size)


def relative_examples(batch_size: Tensor | float, b_noise: Tensor | float) -> Tensor:
    r"""Predicted training examples over the minimum, :math:`E/E_{min} = 1 + B/B_{noise}`.

    Example::

        >>> from lightning_gns.functional import relative_examples
        >>> relative_examples(torch.tensor([64.0, 256.0]), 256.0)
        tensor([1.2500, 2.0000])
    """
    return 1.0 + torch.as_tensor(batch_size) / torch.as_tensor(b_noise)


class NoiseScaleSums(NamedTuple):
    """Weighted sums of per-step estimates and of their products: the additive statistics behind every estimate.

    For plain sums (the metric) each finite step weighs its examples (``batch_big``), so that a short step, such
    as the last window of an epoch, counts for what it holds; for an exponential moving average the weights also
    follow the examples (``elapsed``) and decay. Means are ``sum / weight``; ``weight**2 / weight_sq`` is the
    effective number of steps.
    """

    weight: Tensor
    weight_sq: Tensor
    grad_sq_norm: Tensor
    trace_sigma: Tensor
    grad_sq_norm_sq: Tensor
    trace_sigma_sq: Tensor
    cross: Tensor


def _finite_estimates(
    sq_norm_small: Tensor | float,
    sq_norm_big: Tensor | float,
    batch_small: BatchSize,
    batch_big: BatchSize,
    population_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step estimates with non-finite steps zeroed, and the mask of finite ones."""
    grad_sq_norm, trace_sigma = gns_estimates(sq_norm_small, sq_norm_big, batch_small, batch_big, population_size)
    finite = torch.isfinite(grad_sq_norm) & torch.isfinite(trace_sigma)
    zero = torch.zeros_like(grad_sq_norm)
    return torch.where(finite, grad_sq_norm, zero), torch.where(finite, trace_sigma, zero), finite


def _gns_update(
    sq_norm_small: Tensor | float,
    sq_norm_big: Tensor | float,
    batch_small: BatchSize,
    batch_big: BatchSize,
    group_shape: tuple[int, ...] = (),
    population_size: int | None = None,
) -> tuple[NoiseScaleSums, Tensor, Tensor]:
    """Validate, estimate per step and sum over the leading (step) dimensions, each step weighted by ``batch_big``.

    Inputs have shape ``(*steps, *group_shape)``. A step's estimates have a variance that falls roughly as one over
    its examples, so weighting by them (rather than 1 per step) keeps a short step, such as an epoch's last window,
    from counting as much as a full one. Non-finite steps (an AMP overflow) weigh nothing.

    Returns:
        ``(sums, num_steps, num_skipped)``: the weighted sums, and the counts of steps folded in and left out.
    """
    grad_sq_norm, trace_sigma, finite = _finite_estimates(
        sq_norm_small, sq_norm_big, batch_small, batch_big, population_size
    )
    if tuple(grad_sq_norm.shape[grad_sq_norm.ndim - len(group_shape) :]) != tuple(group_shape):
        raise ValueError(
            f"Expected squared norms of shape (*steps, {', '.join(map(str, group_shape))}) to match "
            f"`group_shape={tuple(group_shape)}`, but got {tuple(grad_sq_norm.shape)}."
        )
    step_dims = tuple(range(grad_sq_norm.ndim - len(group_shape)))
    counted = finite.to(grad_sq_norm.dtype)
    weight = counted * _as_batch(batch_big, grad_sq_norm)

    def total(x: Tensor) -> Tensor:
        return x.sum(dim=step_dims) if step_dims else x

    sums = NoiseScaleSums(
        weight=total(weight),
        weight_sq=total(weight**2),
        grad_sq_norm=total(weight * grad_sq_norm),
        trace_sigma=total(weight * trace_sigma),
        grad_sq_norm_sq=total(weight * grad_sq_norm**2),
        trace_sigma_sq=total(weight * trace_sigma**2),
        cross=total(weight * grad_sq_norm * trace_sigma),
    )
    return sums, total(counted), total(1.0 - counted)


def _gns_compute(sums: NoiseScaleSums, confidence: float = 0.9) -> dict[str, Tensor]:
    r"""Turn weighted sums of per-step estimates into the noise scale and its uncertainty.

    The means of the per-step estimates are divided only at the end (never the mean of per-step ratios).
    Their (co)variances come from the spread of the per-step estimates, divided by the effective number of
    steps :math:`n_{eff} = (\sum w)^2/\sum w^2` (steps are taken as independent, which holds at fixed weights
    and is a fair approximation while training moves slowly against the averaging window).
    """
    weight = sums.weight
    mean_g = sums.grad_sq_norm / weight
    mean_t = sums.trace_sigma / weight
    effective_steps = weight**2 / sums.weight_sq
    # Unbiased weighted (co)variance of one step's estimates, then of their weighted mean.
    bessel = effective_steps / (effective_steps - 1.0)
    var_g = ((sums.grad_sq_norm_sq / weight - mean_g**2) * bessel).clamp(min=0.0) / effective_steps
    var_t = ((sums.trace_sigma_sq / weight - mean_t**2) * bessel).clamp(min=0.0) / effective_steps
    cov = (sums.cross / weight - mean_g * mean_t) * bessel / effective_steps
    ratio = b_simple(mean_t, mean_g)
    lower, upper = ratio_interval(mean_t, mean_g, var_t, var_g, cov, confidence)
    return {
        "b_simple": ratio,
        "b_simple_std": ratio_std(ratio, mean_g, var_t, var_g, cov),
        "b_simple_lower": lower,
        "b_simple_upper": upper,
        "b_simple_valid": torch.isfinite(ratio),
        "grad_sq_norm": mean_g,
        "grad_sq_norm_std": var_g.sqrt(),
        "trace_sigma": mean_t,
        "trace_sigma_std": var_t.sqrt(),
        "effective_steps": effective_steps,
    }


def gradient_noise_scale(
    sq_norm_small: Tensor | float,
    sq_norm_big: Tensor | float,
    batch_small: BatchSize,
    batch_big: BatchSize,
    group_shape: tuple[int, ...] = (),
    confidence: float = 0.9,
    population_size: int | None = None,
) -> dict[str, Tensor]:
    r"""The noise scale of many steps at once: the functional twin of :class:`~lightning_gns.GradientNoiseScale`.

    Each step's squared norms give an estimate of :math:`|G|^2` and :math:`\operatorname{tr}(\Sigma)`
    (:func:`gns_estimates`); these are averaged over the steps, each weighted by its examples (``batch_big``), and
    only then divided.

    Args:
        sq_norm_small: squared norms at the small batch size, shape ``(*steps, *group_shape)``.
        sq_norm_big: squared norms at the big batch size, same shape.
        batch_small: small batch size, a number or a tensor broadcasting against the norms (per step).
        batch_big: big batch size, likewise.
        group_shape: trailing dimensions that are kept apart (for example one entry per layer).
        confidence: coverage of the interval ``[b_simple_lower, b_simple_upper]``.
        population_size: examples drawn from without replacement (see :func:`gns_estimates`), or ``None``.

    Returns:
        A dict with ``b_simple`` (NaN where undefined, see ``b_simple_valid``), ``b_simple_std`` (delta method),
        ``b_simple_lower``/``b_simple_upper`` (Fieller interval), ``grad_sq_norm``, ``trace_sigma`` and their
        standard errors, ``effective_steps`` (:math:`(\sum w)^2/\sum w^2` of the weights), ``num_steps`` and
        ``num_skipped`` (non-finite steps left out).

    Example::

        >>> import torch
        >>> from lightning_gns.functional import gradient_noise_scale
        >>> out = gradient_noise_scale(torch.tensor([3.0, 2.6]), torch.tensor([1.5, 1.6]), 8, 32)
        >>> out["b_simple"], out["num_steps"]
        (tensor(11.7647), tensor(2.))
    """
    _check_confidence(confidence)
    sums, steps, skipped = _gns_update(
        sq_norm_small, sq_norm_big, batch_small, batch_big, tuple(group_shape), population_size
    )
    out = _gns_compute(sums, confidence)
    out["num_steps"] = steps
    out["num_skipped"] = skipped
    return out


def _check_confidence(confidence: float) -> None:
    if not isinstance(confidence, float | int) or not 0.0 < confidence < 1.0:
        raise ValueError(f"Expected `confidence` in (0, 1), for example 0.9, but got {confidence!r}.")
