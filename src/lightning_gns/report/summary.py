r"""What a run's logs say, as numbers and sentences: the suggestion, where it came from, and the predicted trade-off.

Pure functions of a :class:`~lightning_gns.report.reading.RunLog`; the figures and the documents are drawn from a
:class:`RunSummary`. Nothing here guesses silently: a quantity the logs do not hold is "not recorded".

The trade-off is McCandlish et al. (2018), eqs. 2.11–2.12: training at batch size :math:`B` with a noise scale
:math:`B_{noise}` takes

.. math::

    S/S_{min} = 1 + B_{noise}/B \quad\text{optimizer steps and}\quad E/E_{min} = 1 + B/B_{noise}
    \quad\text{examples}

of the minimum possible; :math:`B = B_{noise}` costs twice the minimum of both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lightning_gns import tags
from lightning_gns.functional.noise_scale import relative_examples, relative_steps, suggested_batch_size
from lightning_gns.report.reading import RunLog, Series, find_hparam


@dataclass(frozen=True)
class Suggestion:
    """The last logged suggestion and the smoothed B_simple it was made from."""

    step: int
    examples: float
    b_crit: float
    b_simple: float
    lower: float
    upper: float

    @property
    def resolved(self) -> bool:
        """Whether B_simple is defined (|G|² resolved): a finite, positive value."""
        return math.isfinite(self.b_simple) and self.b_simple > 0 and math.isfinite(self.b_crit)

    @property
    def factor(self) -> float:
        """``b_crit / b_simple``: the monitor's ``b_crit_factor`` (NaN when B_simple is undefined)."""
        return self.b_crit / self.b_simple if self.resolved else math.nan

    @property
    def power_of_two(self) -> int | None:
        """The power of two nearest (in log scale) to the suggestion, not below its interval's lower end."""
        if not self.resolved:
            return None
        return suggested_batch_size(self.b_crit, self.lower * self.factor)


@dataclass(frozen=True)
class BatchSizeChange:
    """One entry of the batch-size history: the values in force from ``step`` on."""

    step: int
    examples: float
    batch_size: float
    lr: float
    accumulate_grad_batches: float


@dataclass(frozen=True)
class TradeOffRow:
    """The predicted cost of one candidate batch size, relative to the minimum steps and examples."""

    batch_size: int
    steps_ratio: float
    examples_ratio: float


@dataclass(frozen=True)
class RunSummary:
    """Everything the report states, each with the text that says where it came from."""

    suggestion: Suggestion
    batch_size: float
    short_batches: int
    horizon_examples: float | None
    horizon_text: str
    num_skipped: float
    gradient_source: str
    lr_text: str
    batch_history: list[BatchSizeChange]
    trade_off: list[TradeOffRow]

    @property
    def b_noise(self) -> float:
        """The noise scale the trade-off uses: the final smoothed B_simple."""
        return self.suggestion.b_simple

    def predicted_at(self, batch_size: float) -> tuple[float, float]:
        """``(S/S_min, E/E_min)`` predicted at ``batch_size`` for :attr:`b_noise` (NaN when undefined)."""
        if not (self.suggestion.resolved and batch_size > 0):
            return math.nan, math.nan
        return (
            float(relative_steps(float(batch_size), self.b_noise)),
            float(relative_examples(float(batch_size), self.b_noise)),
        )


def summarize(log: RunLog) -> RunSummary:
    r"""The report's numbers, from a run's logs.

    Example::

        >>> import tempfile, pathlib
        >>> from lightning_gns.report import read_run, summarize
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> text = "step,gns/b_simple,gns/b_simple_lower,gns/b_simple_upper,gns/b_crit,gns/batch_size\n"
        >>> _ = (run / "metrics.csv").write_text(text + "9,60.0,20.0,inf,60.0,32\n19,48.0,30.0,90.0,48.0,32\n")
        >>> summary = summarize(read_run(run))
        >>> summary.suggestion.b_crit, summary.suggestion.power_of_two, summary.horizon_examples
        (48.0, 64, None)
        >>> [(row.batch_size, row.steps_ratio) for row in summary.trade_off if row.batch_size in (16, 32, 64)]
        [(16, 4.0), (32, 2.5), (64, 1.75)]
    """
    b_simple = log.get(tags.B_SIMPLE)
    assert b_simple is not None  # read_run refuses logs without it
    step = int(b_simple.steps[-1])

    def at(name: str) -> float:
        series = log.get(name)
        return math.nan if series is None else series.at(step)

    b_crit = at(tags.B_CRIT)
    suggestion = Suggestion(
        step=step,
        examples=at(tags.EXAMPLES),
        b_crit=b_crit if not math.isnan(b_crit) else b_simple.last(),
        b_simple=b_simple.last(),
        lower=at(tags.B_SIMPLE_LOWER),
        upper=at(tags.B_SIMPLE_UPPER),
    )
    batch = log.get(tags.BATCH_SIZE)
    batch_size, short_batches = math.nan, 0
    if batch is not None:
        nominal, short_batches = nominal_batch_sizes(batch)
        batch_size = Series(batch.steps, nominal).at(step)
    horizon, horizon_text = _horizon(log)
    history = batch_history(log)
    return RunSummary(
        suggestion=suggestion,
        batch_size=batch_size,
        short_batches=short_batches,
        horizon_examples=horizon,
        horizon_text=horizon_text,
        num_skipped=at(tags.NUM_SKIPPED),
        gradient_source=_gradient_source(log),
        lr_text=_lr_rule(log, batch_changed=bool(history)),
        batch_history=history,
        trade_off=trade_off(suggestion.b_simple, [batch_size, suggestion.b_crit]),
    )


def _horizon(log: RunLog) -> tuple[float | None, str]:
    """The moving average's horizon in examples: logged, in the hparams, or not recorded (and what is known)."""
    logged = log.last(tags.HORIZON_EXAMPLES)
    if math.isfinite(logged):
        return logged, f"{format_number(logged)} examples (logged as `{log.prefix}horizon_examples`)"
    hparam = find_hparam(log.hparams, tags.HORIZON_HPARAM)
    if isinstance(hparam, int | float) and not isinstance(hparam, bool) and hparam > 0:
        return float(hparam), f"{format_number(hparam)} examples (`horizon_examples` in hparams.yaml)"
    batch = log.get(tags.BATCH_SIZE)
    text = f"not recorded in the logs (no `{log.prefix}horizon_examples` tag or `horizon_examples` hparam)"
    if batch is not None and len(batch.values):
        first = float(batch.values[0])
        text += (
            f"; with the monitor's default it is {tags.DEFAULT_HORIZON_STEPS} steps' worth of examples at the first "
            f"step's batch size: ≈ {format_number(tags.DEFAULT_HORIZON_STEPS * first)} examples if that was "
            f"{format_number(first)} (the first logged batch size)"
        )
    return None, text


def _gradient_source(log: RunLog) -> str:
    source = find_hparam(log.hparams, tags.SOURCE_HPARAM)
    if isinstance(source, str):
        return f"`{source}` (from hparams.yaml)"
    if log.layer_names:
        return "`per_example` (not recorded; inferred: per-layer tags need the per_example source)"
    return "not recorded in the logs (the monitor names it at start-up when `source='auto'`)"


def _lr_rule(log: RunLog, batch_changed: bool) -> str:
    """The learning-rate rule in force: from a scheduler's tags and hparams, else fixed or not recorded."""
    parts = []
    rule = find_hparam(log.hparams, tags.LR_SCALING_HPARAM)
    if rule is not None:
        parts.append(f"rule `{rule}` (hparams.yaml)")
    lr, scale, batch = log.get(tags.LR), log.get(tags.LR_SCALE), log.get(tags.BATCH_SIZE)
    if lr is not None and len(lr.values):
        first, last = float(lr.values[0]), float(lr.values[-1])
        if np.allclose(lr.values, first, rtol=1e-6, atol=0):
            parts.append(f"learning rate fixed at {format_number(first)} (`{log.prefix}lr`)")
        else:
            parts.append(f"learning rate {format_number(first)} → {format_number(last)} (`{log.prefix}lr`)")
            exponent = _observed_exponent(lr, batch)
            if exponent is not None:
                parts.append(f"observed lr ∝ B^{exponent:.2f} ({_rule_name(exponent)})")
    if scale is not None and len(scale.values):
        parts.append(f"last scale factor {format_number(scale.last())} (`{log.prefix}lr_scale`)")
    if parts:
        return "; ".join(parts)
    if not batch_changed:
        return f"fixed: the batch size did not change and no `{log.prefix}lr` was logged (the optimizer's own)"
    return f"not recorded: the batch size changed but no `{log.prefix}lr` or `{log.prefix}lr_scale` was logged"


def _observed_exponent(lr: Series, batch: Series | None) -> float | None:
    """The power ``k`` in lr ∝ Bᵏ between the first and the last logged points, when both changed."""
    if batch is None or not len(batch.values):
        return None
    step = int(lr.steps[-1])
    b_first, b_last = batch.at(int(lr.steps[0])), batch.at(step)
    if not (b_first > 0 and b_last > 0 and lr.values[0] > 0 and lr.values[-1] > 0) or b_first == b_last:
        return None
    return math.log(lr.values[-1] / lr.values[0]) / math.log(b_last / b_first)


def _rule_name(exponent: float) -> str:
    for target, name in ((1.0, "linear scaling"), (0.5, "square-root scaling"), (0.0, "no scaling")):
        if abs(exponent - target) < 0.05:
            return name
    return "neither linear nor square-root"


def nominal_batch_sizes(batch: Series) -> tuple[np.ndarray, int]:
    """The logged batch sizes with the short last batches of epochs taken out, and how many there were.

    The monitor logs the batch of the logging step; when that step ends an epoch whose last batch is short, one
    point dips below its neighbours. A dip for a single logged point (back up to the value before it at the next
    point, or at the end of the log) is such a batch, not a change of the batch size in use: it takes the value
    before it.

    Example::

        >>> import numpy as np
        >>> from lightning_gns.report.reading import Series
        >>> nominal_batch_sizes(Series(np.arange(6), np.array([32.0, 30, 32, 64, 64, 60])))
        (array([32., 32., 32., 64., 64., 64.]), 2)
    """
    values = batch.values.copy()
    short = 0
    for i in range(1, len(values)):
        last = i == len(values) - 1
        if values[i] < values[i - 1] and (last or batch.values[i + 1] == values[i - 1]):
            values[i] = values[i - 1]
            short += 1
    return values, short


def batch_history(log: RunLog) -> list[BatchSizeChange]:
    """The batch size in force from each change on (its first value included); empty if it never changed.

    Short last batches of epochs are not changes (:func:`nominal_batch_sizes`).
    """
    batch = log.get(tags.BATCH_SIZE)
    if batch is None or len(batch.values) < 2:
        return []
    nominal, _ = nominal_batch_sizes(batch)
    if np.ptp(nominal) == 0:
        return []
    examples, lr, accumulate = log.get(tags.EXAMPLES), log.get(tags.LR), log.get(tags.ACCUMULATE_GRAD_BATCHES)
    keep = np.flatnonzero(np.r_[True, np.diff(nominal) != 0])
    return [
        BatchSizeChange(
            step=int(batch.steps[i]),
            examples=math.nan if examples is None else examples.at(int(batch.steps[i])),
            batch_size=float(nominal[i]),
            lr=math.nan if lr is None else lr.at(int(batch.steps[i])),
            accumulate_grad_batches=math.nan if accumulate is None else accumulate.at(int(batch.steps[i])),
        )
        for i in keep.tolist()
    ]


def candidate_batch_sizes(b_noise: float, marks: list[float], octaves: int = 4) -> list[int]:
    """Powers of two from ``octaves`` below to ``octaves`` above the smallest and largest of B_noise and the marks.

    Example::

        >>> candidate_batch_sizes(100.0, [32.0], octaves=2)
        [8, 16, 32, 64, 128, 256, 512]
    """
    points = [x for x in (b_noise, *marks) if math.isfinite(x) and x > 0]
    if not points:
        return []
    low = max(0, math.floor(math.log2(min(points))) - octaves)
    high = max(low, math.ceil(math.log2(max(points))) + octaves)
    return [2**k for k in range(low, high + 1)]


def trade_off(b_noise: float, marks: list[float]) -> list[TradeOffRow]:
    """Predicted S/S_min and E/E_min on a log2 grid of batch sizes around B_noise and ``marks``; none if undefined."""
    if not (math.isfinite(b_noise) and b_noise > 0):
        return []
    grid = candidate_batch_sizes(b_noise, marks)
    sizes = torch.tensor(grid, dtype=torch.float64)
    steps = relative_steps(sizes, b_noise).tolist()
    examples = relative_examples(sizes, b_noise).tolist()
    return [TradeOffRow(b, s, e) for b, s, e in zip(grid, steps, examples, strict=True)]


def format_number(value: float) -> str:
    """A number as the report prints it: 6 significant digits, ``inf``/``nan`` spelled out."""
    return f"{value:.6g}"
