r"""``BatchSizeScheduler``: from the measured noise scale to the batch size actually used.

A plain class (no Trainer needed): feed it the smoothed :math:`B_{simple}` with its interval every so often and it
answers with the effective batch size to train at, or ``None`` while nothing should change. Three policies say
what batch size the noise scale asks for:

=============  ===========================================================================================
policy         target effective batch size
=============  ===========================================================================================
``b_crit``     :math:`\text{factor} \cdot B_{simple}`, the critical batch size (McCandlish et al., 2018)
``sqrt``       :math:`B_0 \sqrt{B_{simple}(t) / B_{simple}(t_0)}`: the batch that balances steps against
               examples grows as :math:`\sqrt{B_{noise}(t)}` (ibid., appendix D); :math:`t_0` is the first
               confident reading and :math:`B_0` the batch size then
``goodput``    the batch that trains fastest in wall-clock time: with steps :math:`S \propto 1 + B_{noise}/B`
               and a step time :math:`\alpha + \beta B`, time is least at
               :math:`B^* = \sqrt{(\alpha/\beta) B_{noise}}` (Pollux weighs statistical efficiency against
               throughput the same way); :math:`\alpha/\beta` (examples whose compute costs as much as a step's
               fixed overhead) is given, or fitted from :meth:`~BatchSizeScheduler.observe_step_time`
=============  ===========================================================================================

Whatever the policy, a change is made only when it is safe: the whole interval of :math:`B_{simple}` must ask for
more than the current batch (no growth while uncertain), at least ``min_examples_between_changes`` examples have
passed since the last change, the new size is at least ``1 + min_relative_change`` times the old one
(hysteresis), at most ``max_growth_factor`` times it, a multiple of ``multiple``, and within
``[min_batch_size, max_batch_size]``. It never shrinks unless ``allow_shrink=True`` (and then only when the whole
interval asks for less).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["BatchSizeChange", "BatchSizeScheduler", "GrowthPolicy"]

GrowthPolicy = Literal["b_crit", "sqrt", "goodput"]
_POLICIES = ("b_crit", "sqrt", "goodput")


@dataclass(frozen=True)
class BatchSizeChange:
    """A decision of the scheduler: train at ``batch_size`` from now on (was ``previous``), and why."""

    batch_size: int
    previous: int
    target: float
    examples_seen: float
    reason: str


class BatchSizeScheduler:
    r"""Decide the effective batch size (examples per optimizer step, all ranks) from the noise scale.

    Args:
        initial_batch_size: the effective batch size the run starts at.
        policy: ``"b_crit"``, ``"sqrt"`` or ``"goodput"`` (see the module docstring).
        factor: ``b_crit`` policy: target = ``factor`` × B_simple (B_simple tends to sit above the critical batch
            size of a sweep; a factor below 1 is cautious).
        min_batch_size: lower bound (default: ``initial_batch_size``).
        max_batch_size: upper bound (``None``: none).
        multiple: every batch size is a multiple of this (for example world size × 8); the initial one need not be.
        max_growth_factor: at most this factor per change (and at least its inverse when shrinking).
        min_relative_change: hysteresis: change only for at least this relative change.
        min_examples_between_changes: examples to train on after a change before the next one (the moving
            average needs time to forget the old batch size); also the wait before the first change.
        allow_shrink: also shrink when the whole interval asks for a smaller batch.
        step_overhead_examples: ``goodput`` policy: :math:`\alpha/\beta`. ``None``: fitted from observed step
            times once two batch sizes have been seen, and the current batch size until then.

    Raises:
        ValueError: for an invalid argument (the message names it).

    Example::

        >>> scheduler = BatchSizeScheduler(64, max_batch_size=1024, multiple=32)
        >>> scheduler.update(b_simple=90.0, b_simple_lower=70.0, b_simple_upper=120.0, examples_seen=5_000)
        >>> change = scheduler.update(b_simple=400.0, b_simple_lower=300.0, b_simple_upper=600.0, examples_seen=9_000)
        >>> change.batch_size, scheduler.batch_size
        (128, 128)
    """

    def __init__(
        self,
        initial_batch_size: int,
        policy: GrowthPolicy = "b_crit",
        factor: float = 1.0,
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        multiple: int = 1,
        max_growth_factor: float = 2.0,
        min_relative_change: float = 0.1,
        min_examples_between_changes: float = 0.0,
        allow_shrink: bool = False,
        step_overhead_examples: float | None = None,
    ) -> None:
        _check_positive_int("initial_batch_size", initial_batch_size)
        if policy not in _POLICIES:
            raise ValueError(f"Expected `policy` to be one of {_POLICIES}, but got {policy!r}.")
        if not factor > 0:
            raise ValueError(f"Expected `factor` > 0, but got {factor!r}.")
        _check_positive_int("multiple", multiple)
        if min_batch_size is not None:
            _check_positive_int("min_batch_size", min_batch_size)
        if max_batch_size is not None:
            _check_positive_int("max_batch_size", max_batch_size)
            if max_batch_size < initial_batch_size:
                raise ValueError(
                    f"Expected `max_batch_size` >= `initial_batch_size` ({initial_batch_size}), but got "
                    f"{max_batch_size}."
                )
            if max_batch_size < multiple:
                raise ValueError(f"Expected `max_batch_size` >= `multiple` ({multiple}), but got {max_batch_size}.")
        if min_batch_size is not None and max_batch_size is not None and min_batch_size > max_batch_size:
            raise ValueError(f"Expected `min_batch_size` <= `max_batch_size`, got {min_batch_size} > {max_batch_size}.")
        if not max_growth_factor > 1:
            raise ValueError(f"Expected `max_growth_factor` > 1, but got {max_growth_factor!r}.")
        if not min_relative_change >= 0:
            raise ValueError(f"Expected `min_relative_change` >= 0, but got {min_relative_change!r}.")
        if not min_examples_between_changes >= 0:
            raise ValueError(f"Expected `min_examples_between_changes` >= 0, but got {min_examples_between_changes!r}.")
        if step_overhead_examples is not None and not step_overhead_examples > 0:
            raise ValueError(f"Expected `step_overhead_examples` > 0 or None, but got {step_overhead_examples!r}.")
        self.initial_batch_size = initial_batch_size
        self.policy: GrowthPolicy = policy
        self.factor = factor
        self.min_batch_size = initial_batch_size if min_batch_size is None else min_batch_size
        self.max_batch_size = max_batch_size
        self.multiple = multiple
        self.max_growth_factor = max_growth_factor
        self.min_relative_change = min_relative_change
        self.min_examples_between_changes = min_examples_between_changes
        self.allow_shrink = allow_shrink
        self.step_overhead_examples = step_overhead_examples

        self.batch_size = initial_batch_size
        self.last_change_examples = 0.0
        self.num_changes = 0
        # `sqrt` policy: the first confident reading and the batch size then.
        self._sqrt_reference: tuple[float, int] | None = None
        # `goodput` policy: mean step time per batch size, as (batch size, sum of seconds, count).
        self._step_times: dict[int, tuple[float, int]] = {}

    # -- the policies ---------------------------------------------------------------------------------------------

    def target(self, b_simple: float) -> float:
        """The effective batch size the policy asks for at this noise scale (before bounds and rounding)."""
        if not math.isfinite(b_simple) or b_simple <= 0:
            return math.nan
        if self.policy == "b_crit":
            return self.factor * b_simple
        if self.policy == "sqrt":
            if self._sqrt_reference is None:
                return math.nan
            b_ref, batch_ref = self._sqrt_reference
            return batch_ref * math.sqrt(b_simple / b_ref)
        return math.sqrt(self.overhead_examples() * b_simple)

    def overhead_examples(self) -> float:
        r"""``goodput`` policy: :math:`\alpha/\beta` of the step-time model :math:`\alpha + \beta B`, in examples.

        The given ``step_overhead_examples``, else a least-squares fit of the observed mean step times (once two
        batch sizes have been seen and the fit is physical), else the current batch size (an even split between
        fixed and per-example cost).
        """
        if self.step_overhead_examples is not None:
            return self.step_overhead_examples
        if len(self._step_times) >= 2:
            sizes = list(self._step_times)
            means = [total / count for total, count in self._step_times.values()]
            n = len(sizes)
            mean_b, mean_t = sum(sizes) / n, sum(means) / n
            var_b = sum((b - mean_b) ** 2 for b in sizes)
            beta = sum((b - mean_b) * (t - mean_t) for b, t in zip(sizes, means, strict=True)) / var_b
            alpha = mean_t - beta * mean_b
            if beta > 0 and alpha > 0:
                return alpha / beta
        return float(self.batch_size)

    def observe_step_time(self, batch_size: int, seconds: float, steps: int = 1) -> None:
        """Record that ``steps`` optimizer steps at ``batch_size`` took ``seconds`` in all (``goodput`` policy)."""
        if steps < 1 or not seconds > 0 or not math.isfinite(seconds):
            return
        total, count = self._step_times.get(batch_size, (0.0, 0))
        self._step_times[batch_size] = (total + seconds, count + steps)

    # -- the decision ---------------------------------------------------------------------------------------------

    def update(
        self, b_simple: float, b_simple_lower: float, b_simple_upper: float, examples_seen: float
    ) -> BatchSizeChange | None:
        """Take a new reading of the smoothed noise scale; return the change to make, or ``None``.

        Args:
            b_simple: the smoothed B_simple (NaN while undefined).
            b_simple_lower: the lower end of its interval.
            b_simple_upper: the upper end (``inf`` while |G|² is not resolved).
            examples_seen: examples trained on so far (all ranks).
        """
        confident = math.isfinite(b_simple_lower) and b_simple_lower > 0 and math.isfinite(b_simple_upper)
        if self.policy == "sqrt" and self._sqrt_reference is None and confident and b_simple > 0:
            self._sqrt_reference = (b_simple, self.batch_size)
            return None
        if examples_seen - self.last_change_examples < self.min_examples_between_changes:
            return None
        target = self.target(b_simple)
        if math.isnan(target):
            return None
        # The whole interval must agree: growth needs even the lower end to ask for more, shrinking the upper end
        # (inf while |G|² is unresolved) to ask for less.
        low, high = self.target(b_simple_lower), self.target(b_simple_upper)
        current = self.batch_size
        if not math.isnan(low) and low >= current * (1 + self.min_relative_change):
            proposal = self._bounded(min(target, current * self.max_growth_factor), up=True)
            if proposal >= current * (1 + self.min_relative_change) and proposal > current:
                return self._change(proposal, target, examples_seen, f"{self.policy} target {target:.0f} > {current}")
        if self.allow_shrink and math.isfinite(high) and high * (1 + self.min_relative_change) <= current:
            proposal = self._bounded(max(target, current / self.max_growth_factor), up=False)
            if proposal * (1 + self.min_relative_change) <= current:
                return self._change(proposal, target, examples_seen, f"{self.policy} target {target:.0f} < {current}")
        return None

    def _bounded(self, size: float, up: bool) -> int:
        """Round to the multiple (towards the current size) and clamp to the bounds."""
        rounded = math.floor(size / self.multiple) if up else math.ceil(size / self.multiple)
        size_int = max(rounded, 1) * self.multiple
        if self.max_batch_size is not None:
            size_int = min(size_int, self.max_batch_size // self.multiple * self.multiple)
        return max(size_int, self.min_batch_size)

    def accept(self, batch_size: int, examples_seen: float) -> BatchSizeChange:
        """Take a change decided elsewhere (by another rank's scheduler) as if this one had made it.

        Under DDP every rank runs a scheduler and they agree by a vote; a rank that did not decide takes the
        decision with this, so that its wait and change count stay in step with the rank that did.

        Example::

            >>> scheduler = BatchSizeScheduler(initial_batch_size=32)
            >>> scheduler.accept(64, examples_seen=3200.0).batch_size, scheduler.num_changes
            (64, 1)
        """
        return self._change(batch_size, float(batch_size), examples_seen, "decided on another rank")

    def _change(self, size: int, target: float, examples_seen: float, reason: str) -> BatchSizeChange:
        change = BatchSizeChange(size, self.batch_size, target, examples_seen, reason)
        self.batch_size = size
        self.last_change_examples = examples_seen
        self.num_changes += 1
        return change

    # -- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to decide as the uninterrupted one would."""
        return {
            "batch_size": self.batch_size,
            "last_change_examples": self.last_change_examples,
            "num_changes": self.num_changes,
            "sqrt_reference": self._sqrt_reference,
            "step_times": dict(self._step_times),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.batch_size = int(state_dict["batch_size"])
        self.last_change_examples = float(state_dict["last_change_examples"])
        self.num_changes = int(state_dict["num_changes"])
        reference = state_dict["sqrt_reference"]
        self._sqrt_reference = None if reference is None else (float(reference[0]), int(reference[1]))
        self._step_times = {int(k): (float(v[0]), int(v[1])) for k, v in state_dict["step_times"].items()}


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
