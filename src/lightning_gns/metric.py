r"""``GradientNoiseScale``: the noise scale as a torchmetrics ``Metric`` whose states are sums reduced across ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_gns.functional.noise_scale import (
    BatchSize,
    NoiseScaleSums,
    _check_confidence,
    _gns_compute,
    _gns_update,
)

__all__ = ["GradientNoiseScale"]


class GradientNoiseScale(Metric):
    r"""Gradient noise scale :math:`B_{simple} = \operatorname{tr}(\Sigma)/|G|^2` from squared gradient norms.

    Each ``update`` takes the squared norms of gradients averaged over a small and a big batch of the same step
    (a rank's and the all-reduced gradient, a micro-batch's and the accumulated one, one example's and the
    batch's) and turns them into unbiased estimates (McCandlish et al. 2018, A.1):

    .. math::

        |G|^2 \approx \frac{B_{big}|G_{big}|^2 - B_{small}|G_{small}|^2}{B_{big} - B_{small}}, \qquad
        \operatorname{tr}(\Sigma) \approx \frac{|G_{small}|^2 - |G_{big}|^2}{1/B_{small} - 1/B_{big}}

    The states are sums of these estimates, their squares and product, each step weighted by its examples
    :math:`B_{big}` (reduced by sum across ranks); ``compute`` takes the weighted means and divides only then. A
    step's estimates are about as precise as it has examples, so a short step (the last window of an epoch)
    counts for what it holds rather than as much as a full one; with a constant batch this is the plain average.
    Steps whose norms are not finite (an AMP overflow) are left out and counted.

    ``compute`` returns a dict of tensors (shape ``group_shape``):

    ===================  ===========================================================================
    key                  meaning
    ===================  ===========================================================================
    ``b_simple``         the noise scale; NaN when the mean of :math:`|G|^2` is ≤ 0 or of tr Σ < 0
    ``b_simple_valid``   ``False`` where ``b_simple`` is NaN (not enough signal yet), never clamped
    ``b_simple_std``     delta-method standard error (from the weighted spread of the per-step estimates)
    ``b_simple_lower``   lower end of the ``confidence`` interval (Fieller), within [0, inf]
    ``b_simple_upper``   upper end, ``inf`` while :math:`|G|^2` is not resolved
    ``grad_sq_norm``     mean estimate of :math:`|G|^2` (weighted by examples), and ``grad_sq_norm_std``
    ``trace_sigma``      mean estimate of tr Σ (weighted by examples), and ``trace_sigma_std``
    ``effective_steps``  :math:`(\sum_i B_i)^2/\sum_i B_i^2`: as many equally weighted steps give the same
                         precision (``num_steps`` for a constant batch)
    ``num_steps``        steps folded in (a count)
    ``num_skipped``      steps left out because they were not finite
    ===================  ===========================================================================

    Args:
        group_shape: shape of the values kept apart, for example ``(num_layers,)`` for a per-layer breakdown.
            Inputs to ``update`` have shape ``(*steps, *group_shape)``: leading dimensions are steps.
        confidence: coverage of the interval, for example 0.9.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Raises:
        ValueError: if ``group_shape`` is not a tuple of positive ints or ``confidence`` is not in (0, 1).

    Example::

        >>> import torch
        >>> from lightning_gns import GradientNoiseScale
        >>> metric = GradientNoiseScale()
        >>> metric.update(torch.tensor(3.0), torch.tensor(1.5), batch_small=8, batch_big=32)
        >>> metric.update(torch.tensor(2.6), torch.tensor(1.6), batch_small=8, batch_big=32)
        >>> out = metric.compute()
        >>> out["b_simple"], out["trace_sigma"], out["grad_sq_norm"]
        (tensor(11.7647), tensor(13.3333), tensor(1.1333))
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    num_steps: Tensor
    num_skipped: Tensor
    sum_weight: Tensor
    sum_weight_sq: Tensor
    sum_grad_sq_norm: Tensor
    sum_trace_sigma: Tensor
    sum_grad_sq_norm_sq: Tensor
    sum_trace_sigma_sq: Tensor
    sum_cross: Tensor

    def __init__(self, group_shape: int | tuple[int, ...] = (), confidence: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        shape = (group_shape,) if isinstance(group_shape, int) else group_shape
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(
                f"Expected `group_shape` to be a tuple of positive ints such as (num_layers,), but got {group_shape!r}."
            )
        _check_confidence(confidence)
        self.group_shape = shape
        self.confidence = confidence
        # True while the sums are of unit-weighted steps restored from an old state dict (see `update`).
        self._unit_weights = False
        for name in self._state_names():
            # Persistent, so that a checkpoint of a module holding the metric keeps the sums.
            self.add_state(name, default=torch.zeros(shape), dist_reduce_fx="sum", persistent=True)

    @staticmethod
    def _state_names() -> tuple[str, ...]:
        return (
            "num_steps",
            "num_skipped",
            "sum_grad_sq_norm",
            "sum_trace_sigma",
            "sum_grad_sq_norm_sq",
            "sum_trace_sigma_sq",
            "sum_cross",
            # Added after the others: a state dict saved before steps were weighted by examples lacks them.
            "sum_weight",
            "sum_weight_sq",
        )

    def update(
        self,
        sq_norm_small: Tensor | float,
        sq_norm_big: Tensor | float,
        batch_small: BatchSize,
        batch_big: BatchSize,
        population_size: int | None = None,
    ) -> None:
        """Fold in the squared norms of one or more steps (shape ``(*steps, *group_shape)``).

        Each step weighs its examples, ``batch_big``. ``population_size``: the number of examples the batches are
        drawn from without replacement, which makes the :math:`|G|^2` estimate unbiased for the full data (see
        :func:`~lightning_gns.functional.gns_estimates`).
        """
        sums, steps, skipped = _gns_update(
            sq_norm_small, sq_norm_big, batch_small, batch_big, self.group_shape, population_size
        )
        if self._unit_weights:
            # Sums restored from a state dict of unit-weighted steps: give each of them this update's batch.
            big = batch_big if isinstance(batch_big, Tensor) else torch.tensor(float(batch_big))
            self._adopt_unit_weights(big.to(self.num_steps.device, self.num_steps.dtype).mean())
        dtype = self.num_steps.dtype
        self.num_steps += steps.to(dtype)
        self.num_skipped += skipped.to(dtype)
        self.sum_weight += sums.weight.to(dtype)
        self.sum_weight_sq += sums.weight_sq.to(dtype)
        self.sum_grad_sq_norm += sums.grad_sq_norm.to(dtype)
        self.sum_trace_sigma += sums.trace_sigma.to(dtype)
        self.sum_grad_sq_norm_sq += sums.grad_sq_norm_sq.to(dtype)
        self.sum_trace_sigma_sq += sums.trace_sigma_sq.to(dtype)
        self.sum_cross += sums.cross.to(dtype)

    def compute(self) -> dict[str, Tensor]:
        """The noise scale, its uncertainty and the counts (see the table above)."""
        sums = NoiseScaleSums(
            weight=self.sum_weight,
            weight_sq=self.sum_weight_sq,
            grad_sq_norm=self.sum_grad_sq_norm,
            trace_sigma=self.sum_trace_sigma,
            grad_sq_norm_sq=self.sum_grad_sq_norm_sq,
            trace_sigma_sq=self.sum_trace_sigma_sq,
            cross=self.sum_cross,
        )
        out = _gns_compute(sums, self.confidence)
        out["num_steps"] = self.num_steps.clone()
        out["num_skipped"] = self.num_skipped.clone()
        return out

    def reset(self) -> None:
        """Clear every state (and a pending conversion of restored unit-weighted sums)."""
        super().reset()
        self._unit_weights = False

    def _adopt_unit_weights(self, examples_per_step: Tensor | float) -> None:
        """Turn sums of unit-weighted steps into those of steps of ``examples_per_step`` examples each.

        Such sums come from a state saved before steps were weighted by examples. The means do not change; later
        updates weigh in alike.
        """
        self._unit_weights = False
        scale = torch.as_tensor(examples_per_step, dtype=self.num_steps.dtype, device=self.num_steps.device)
        self.sum_weight = self.num_steps * scale
        self.sum_weight_sq = self.num_steps * scale**2
        for name in ("sum_grad_sq_norm", "sum_trace_sigma", "sum_grad_sq_norm_sq", "sum_trace_sigma_sq", "sum_cross"):
            setattr(self, name, getattr(self, name) * scale)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        legacy = prefix + "num_steps" in state_dict and prefix + "sum_weight" not in state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if legacy:
            # Saved before steps were weighted by their examples: until the next update says how many a step
            # holds, each restored step weighs 1 (the means are those that were saved).
            self.sum_weight = self.num_steps.clone()
            self.sum_weight_sq = self.num_steps.clone()
            self._unit_weights = True
