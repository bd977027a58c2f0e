"""Does growing the batch size help? Fixed batch sizes against ``NoiseScaleMonitor(grow_batch_size=True)``.

On small real tasks that train in minutes on two CPU cores (the digits MLP and the tiny character LM of
:mod:`lightning_gns.demo`), this script measures the optimizer steps and the training examples needed to reach a few
target values of the *training-set* loss (the full training set for the digits, a fixed subset of it for the LM,
evaluated in a callback after every few optimizer steps; the noisy batch loss is not used):

1. **fixed batch sizes** on a log2 grid, each with its own learning rate: a small grid of rates (factor 2 apart) is
   searched per size on seed 0, best = fewest steps to the middle target (a candidate is stopped as soon as it can no
   longer win), then the best rate is run on the other seeds;
2. **adaptive growth**: ``NoiseScaleMonitor(grow_batch_size=True, max_batch_size=<largest grid size>)`` starting at
   the smallest size with the rate tuned for it, learning-rate rule ``auto`` (linear for SGD, square root for Adam),
   every other option at its default except ``log_every_n_steps`` (decisions are taken at logging steps); growth
   policies ``b_crit`` (the default) and ``sqrt``;
3. the relation of McCandlish et al. (2018), ``S/S_min - 1 = (E/E_min - 1)^-1``, fitted to the fixed runs of each
   target (``S(B) = S_min + E_min / B``, least squares on log S), giving ``B_crit = E_min / S_min``, reported beside
   the ``B_simple`` that the monitor measured when the target was reached.

Every run is a Lightning ``Trainer`` fit with a ``NoiseScaleMonitor`` attached (measuring only, for the fixed runs),
so all runs carry the same overheads; ``logger=False``, no checkpoints, the Trainer's folder is a temporary one.

Writes ``growth.md``, ``growth.json`` and ``growth_<task>.png`` into ``--out`` (default ``benchmarks/results``; with
``--quick`` a temporary folder unless ``--out`` is given).

Usage::

    python benchmarks/bench_growth.py --quick       # about 2-3 minutes on 2 CPU cores: the digits task, 3 seeds
    python benchmarks/bench_growth.py               # about 10 minutes: digits (5 seeds) and the char LM (3 seeds)
    ./run bench-growth [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gns import NoiseScaleMonitor
from lightning_gns.demo import CharTextDataModule, CharTransformer, DigitsDataModule, DigitsMLP

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("b_crit", "sqrt")
MONITOR_LOG_EVERY = 10  # optimizer steps between two readings of the noise scale (and growth decisions)


# --------------------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One benchmark task: how to build its model and data, and what to measure."""

    name: str
    description: str
    sizes: list[int]
    max_batch_size: int  # the adaptive runs' bound
    targets: list[float]  # training-set loss levels, decreasing
    tune_target: float  # the rate of each size is the one with the fewest steps to this target
    base_lr: float  # the demo's default rate; the grid is base_lr × 2^k
    lr_shift_per_doubling: int  # where the search starts at the next size: +1 grid step (linear rule) or 0
    seeds: int
    max_steps: int
    max_examples: int
    eval_every_examples: int  # 0: evaluate after every optimizer step
    make_model: Callable[[float], pl.LightningModule]
    make_data: Callable[[int, int], pl.LightningDataModule]
    train_size: int  # N, the number of training examples (the same split size for every seed)
    eval_subset: int | None  # measure the loss on this many training examples (a fixed random subset), None: all
    optimizer: str

    @property
    def lr_grid(self) -> list[float]:
        return [self.base_lr * 2.0**k for k in range(-6, 7)]


def _train_size(make_data: Callable[[int, int], pl.LightningDataModule]) -> int:
    data = make_data(8, 0)
    data.setup("fit")
    return len(data.train_set)  # type: ignore[attr-defined]


def digits_task(quick: bool) -> Task:
    def make_data(batch_size: int, seed: int) -> pl.LightningDataModule:
        return DigitsDataModule(batch_size=batch_size, seed=seed)

    return Task(
        name="digits",
        description="DigitsMLP (64-128-128-10, LayerNorm, GELU), SGD momentum 0.9, on the "
        f"{_train_size(make_data)} training images of sklearn's digits; loss on the whole training set after every "
        "step",
        sizes=[8, 16, 32, 64, 128, 256, 512, 1024],
        max_batch_size=256,
        targets=[0.5, 0.2, 0.1, 0.05, 0.02],
        tune_target=0.1,
        base_lr=0.05,
        lr_shift_per_doubling=1,
        seeds=3 if quick else 5,
        max_steps=2500,
        max_examples=60_000,
        eval_every_examples=0,
        make_model=lambda lr: DigitsMLP(layer_norm=True, lr=lr),
        make_data=make_data,
        train_size=_train_size(make_data),
        eval_subset=None,
        optimizer="sgd",
    )


CHARLM_BLOCK = 32
CHARLM_CHARS = 120_000


def charlm_task(quick: bool) -> Task:
    vocab = CharTextDataModule(block_size=CHARLM_BLOCK, max_chars=CHARLM_CHARS).vocab_size

    def make_data(batch_size: int, seed: int) -> pl.LightningDataModule:
        return CharTextDataModule(block_size=CHARLM_BLOCK, batch_size=batch_size, max_chars=CHARLM_CHARS, seed=seed)

    return Task(
        name="charlm",
        description=f"CharTransformer (2 layers, d=64, 4 heads, {CHARLM_BLOCK} tokens), Adam, on the first "
        f"{CHARLM_CHARS:,} characters of Python's help text; loss on a fixed subset of 256 training sequences, "
        "every 256 examples",
        sizes=[8, 16, 32, 64, 128],
        max_batch_size=128,
        targets=[2.8, 2.5, 2.3, 2.15],
        tune_target=2.5,
        base_lr=3e-3,
        lr_shift_per_doubling=0,
        seeds=2 if quick else 3,
        max_steps=3000,
        max_examples=40_000,
        eval_every_examples=256,
        make_model=lambda lr: CharTransformer(vocab_size=vocab, block_size=CHARLM_BLOCK, lr=lr),
        make_data=make_data,
        train_size=_train_size(make_data),
        eval_subset=256,
        optimizer="adam",
    )


TASK_BUILDERS: dict[str, Callable[[bool], Task]] = {"digits": digits_task, "charlm": charlm_task}


# --------------------------------------------------------------------------------------------------- one run


@dataclass
class Crossing:
    """Where a run first reached a target: optimizer steps, examples, and the monitor's B_simple then."""

    steps: float
    examples: float
    b_simple: float
    batch_size: int


@dataclass
class RunResult:
    task: str
    kind: str  # "fixed" or "adaptive:<policy>"
    batch_size: int  # the (initial) batch size
    lr: float  # the (initial) learning rate
    seed: int
    crossings: dict[str, Crossing | None]  # keyed by str(target)
    steps: int
    examples: int
    final_loss: float
    status: str  # "reached", "diverged", "budget", "pruned"
    seconds: float
    history: list[tuple[int, int, float, int, float, float]] = field(default_factory=list)
    # (step, examples, loss, batch size in force, learning rate in force, smoothed B_simple)
    changes: list[dict[str, Any]] = field(default_factory=list)


class TrainingLoss(pl.Callback):
    """Measures the training-set loss every few optimizer steps, records target crossings, stops the run."""

    def __init__(
        self,
        task: Task,
        x: Tensor,
        y: Tensor,
        monitor: NoiseScaleMonitor,
        prune: tuple[float, int] | None,
    ) -> None:
        self.task = task
        self.x, self.y = x, y
        self.monitor = monitor
        self.prune = prune  # (target, steps): stop once past `steps` without having reached `target`
        self.targets = sorted(task.targets, reverse=True)
        self.crossings: dict[str, Crossing | None] = {str(t): None for t in self.targets}
        self.history: list[tuple[int, int, float, int, float, float]] = []
        self.examples = 0
        self.last_eval = (0, 0, math.nan)  # step, examples, loss
        self.initial_loss = math.nan
        self.status = "budget"
        self._batch_size = 0
        self._last_step = -1

    def _behind(self, target: float, bound: int) -> bool:
        """Whether the run can no longer beat ``bound`` steps to ``target`` (tuning candidates stop then)."""
        crossing = self.crossings[str(target)]
        return crossing is None or crossing.steps > bound

    def _loss(self, module: pl.LightningModule) -> float:
        was_training = module.training
        module.eval()
        with torch.no_grad():
            logits = module(self.x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.reshape(-1))
        module.train(was_training)
        return float(loss)

    def _state(self, trainer: pl.Trainer) -> tuple[int, float, float]:
        growth = self.monitor.growth
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if growth is not None:
            lr *= growth.current_lr_scale
        batch = growth.batch_size if growth is not None else self._batch_size
        estimates = self.monitor.estimates
        b_simple = float(estimates["b_simple"]) if estimates else math.nan
        return batch, lr, b_simple

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial_loss = self._loss(pl_module)
        self.last_eval = (0, 0, self.initial_loss)
        self.history.append((0, 0, self.initial_loss, 0, math.nan, math.nan))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_size = int(batch[0].shape[0])
        self.examples += self._batch_size
        step = trainer.global_step
        if step == self._last_step:  # inside an accumulation window: not a step boundary
            return
        self._last_step = step
        last_step, last_examples, last_loss = self.last_eval
        if self.examples - last_examples < self.task.eval_every_examples and step < self.task.max_steps:
            return
        loss = self._loss(pl_module)
        batch_size, lr, b_simple = self._state(trainer)
        self.history.append((step, self.examples, loss, batch_size, lr, b_simple))
        for target in self.targets:
            key = str(target)
            if self.crossings[key] is None and loss <= target:
                if step - last_step > 1 and last_loss > target:  # between two evaluations: interpolate linearly
                    frac = (last_loss - target) / (last_loss - loss)
                    at_step = last_step + frac * (step - last_step)
                    at_examples = last_examples + frac * (self.examples - last_examples)
                else:
                    at_step, at_examples = float(step), float(self.examples)
                self.crossings[key] = Crossing(at_step, at_examples, b_simple, batch_size)
        self.last_eval = (step, self.examples, loss)
        if self.crossings[str(self.targets[-1])] is not None:
            self.status = "reached"
        elif not math.isfinite(loss) or loss > 3 * self.initial_loss:
            self.status = "diverged"
        elif self.examples >= self.task.max_examples:
            self.status = "budget"
        elif self.prune is not None and step >= self.prune[1] and self._behind(*self.prune):
            self.status = "pruned"
        else:
            return
        trainer.should_stop = True


def run_one(
    task: Task,
    batch_size: int,
    lr: float,
    seed: int,
    policy: str | None = None,
    prune: tuple[float, int] | None = None,
    workdir: Path | None = None,
) -> RunResult:
    """Train one configuration until the last target, divergence, the budget or the pruning bound."""
    pl.seed_everything(seed, verbose=False)
    model = task.make_model(lr)
    data = task.make_data(batch_size, seed)
    data.setup("fit")
    x, y = data.train_set.tensors  # type: ignore[attr-defined]  # the seed's own training split
    if len(x) != task.train_size:
        raise RuntimeError(f"{task.name}: expected {task.train_size} training examples, the split has {len(x)}")
    if task.eval_subset is not None and task.eval_subset < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))[: task.eval_subset]
        x, y = x[keep], y[keep]
    if policy is None:
        monitor = NoiseScaleMonitor(log_every_n_steps=MONITOR_LOG_EVERY)
    else:
        monitor = NoiseScaleMonitor(
            log_every_n_steps=MONITOR_LOG_EVERY,
            grow_batch_size=True,
            max_batch_size=task.max_batch_size,
            growth_policy=policy,  # type: ignore[arg-type]
        )
    probe = TrainingLoss(task, x, y, monitor=monitor, prune=prune)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=task.max_steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=workdir,
        callbacks=[monitor, probe],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    changes = []
    if monitor.growth is not None:
        changes = [
            {"step": c["global_step"], "batch_size": c["batch_size"], "reason": c["reason"]}
            for c in monitor.growth.changes
        ]
    return RunResult(
        task=task.name,
        kind="fixed" if policy is None else f"adaptive:{policy}",
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        crossings=probe.crossings,
        steps=trainer.global_step,
        examples=probe.examples,
        final_loss=probe.last_eval[2],
        status=probe.status,
        seconds=seconds,
        history=probe.history,
        changes=changes,
    )


# --------------------------------------------------------------------------------------------------- protocol


def _score(result: RunResult, target: float) -> float:
    crossing = result.crossings[str(target)]
    return math.inf if crossing is None else crossing.steps


def tune_size(
    task: Task,
    batch_size: int,
    start: int,
    workdir: Path,
    log: Callable[[str], None],
    max_extra: int = 3,
) -> tuple[int, list[RunResult]]:
    """Line search over the rate grid on seed 0: the start, its two neighbours, then outwards while the edge wins.

    Returns the index of the best rate and every tuning run (the best one is the seed-0 run of this size).
    """
    grid = task.lr_grid
    tried: dict[int, RunResult] = {}

    def best() -> int:
        # Fewest steps to the tuning target; ties go to the smaller rate (the more stable one).
        return min(tried, key=lambda i: (_score(tried[i], task.tune_target), i))

    def attempt(index: int) -> None:
        if index in tried or not 0 <= index < len(grid):
            return
        prune = None
        if tried:
            bound = _score(tried[best()], task.tune_target)
            if math.isfinite(bound):
                prune = (task.tune_target, math.ceil(bound))
        result = run_one(task, batch_size, grid[index], 0, prune=prune, workdir=workdir)
        tried[index] = result
        log(
            f"  tune {task.name} B={batch_size:<4} lr={grid[index]:<9.4g} steps to {task.tune_target}: "
            f"{_score(result, task.tune_target):>7.1f}  ({result.status}, {result.seconds:.1f} s)"
        )

    for index in (start, start + 1, start - 1):
        attempt(index)
    for _ in range(max_extra):
        index = best()
        if index == min(tried) and index - 1 >= 0:
            attempt(index - 1)
        elif index == max(tried) and index + 1 < len(grid):
            attempt(index + 1)
        else:
            break
    winner = best()
    return winner, [tried[i] for i in sorted(tried)]


def run_task(
    task: Task, workdir: Path, log: Callable[[str], None], policies: Sequence[str] = POLICIES
) -> dict[str, Any]:
    started = time.perf_counter()
    tuned: dict[int, float] = {}
    tuning: list[RunResult] = []
    fixed: list[RunResult] = []
    grid = task.lr_grid
    start = grid.index(task.base_lr)
    for batch_size in task.sizes:
        winner, runs = tune_size(task, batch_size, start, workdir, log)
        tuning.extend(runs)
        tuned[batch_size] = grid[winner]
        fixed.extend(r for r in runs if r.lr == grid[winner])
        start = winner + task.lr_shift_per_doubling
        for seed in range(1, task.seeds):
            result = run_one(task, batch_size, grid[winner], seed, workdir=workdir)
            fixed.append(result)
        log(f"  fixed {task.name} B={batch_size}: lr {grid[winner]:.4g}, {_summary(fixed[-task.seeds :], task)}")
    adaptive: list[RunResult] = []
    smallest = min(task.sizes)
    for policy in policies:
        for seed in range(task.seeds):
            result = run_one(task, smallest, tuned[smallest], seed, policy=policy, workdir=workdir)
            adaptive.append(result)
            sizes = " -> ".join(str(c["batch_size"]) for c in result.changes) or "no change"
            log(f"  adaptive {task.name} {policy} seed {seed}: {_summary([result], task)}; grew {sizes}")
    return {
        "task": task,
        "tuned_lr": tuned,
        "tuning": tuning,
        "fixed": fixed,
        "adaptive": adaptive,
        "seconds": time.perf_counter() - started,
    }


def _summary(runs: list[RunResult], task: Task) -> str:
    parts = []
    for target in task.targets:
        steps = [c.steps for r in runs if (c := r.crossings[str(target)]) is not None]
        parts.append(f"{target}: {statistics.median(steps):.0f}" if len(steps) == len(runs) else f"{target}: –")
    return "steps to " + ", ".join(parts) + f" [{', '.join(sorted({r.status for r in runs}))}]"


# --------------------------------------------------------------------------------------------------- analysis


def fit_pareto(batch_sizes: Sequence[float], steps: Sequence[float], population: int | None = None) -> dict[str, float]:
    r"""Fit :math:`S(B) = S_{min} + E_{min}/B` (equivalently :math:`S/S_{min} - 1 = (E/E_{min} - 1)^{-1}` with
    :math:`E = B S`), least squares on :math:`\log S` (each size weighs alike), both parameters positive.

    With ``population`` :math:`N`, the finite-data form :math:`S = S_{min} + E_{min} (1/B - 1/N)`: batches drawn
    without replacement from :math:`N` examples carry gradient noise :math:`\propto 1/B - 1/N`, not :math:`1/B`, which
    favours batches that are a sizeable share of the data.
    """
    inverse = 1 / np.asarray(batch_sizes, dtype=float)
    if population is not None:
        inverse = inverse - 1 / population
    b = 1 / inverse
    s = np.asarray(steps, dtype=float)
    nan = {"s_min": math.nan, "e_min": math.nan, "b_crit": math.nan, "rms_log_residual": math.nan}
    if len(b) < 3:
        return nan
    from scipy.optimize import least_squares

    def residuals(theta: np.ndarray) -> np.ndarray:
        s_min, e_min = np.exp(theta)
        return np.log(s_min + e_min / b) - np.log(s)

    # Start from the linear least-squares fit of S on 1/B, kept positive.
    design = np.stack([np.ones_like(b), 1 / b], axis=1)
    (a0, c0), *_ = np.linalg.lstsq(design / s[:, None], np.ones_like(s), rcond=None)
    theta0 = np.log([max(a0, 0.05 * s.min()), max(c0, 0.05 * (s * b).min())])
    fit = least_squares(residuals, theta0)
    s_min, e_min = (float(v) for v in np.exp(fit.x))
    rms = float(np.sqrt(np.mean(fit.fun**2)))
    return {"s_min": s_min, "e_min": e_min, "b_crit": e_min / s_min, "rms_log_residual": rms}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _spread(values: list[float]) -> tuple[float, float]:
    return (min(values), max(values)) if values else (math.nan, math.nan)


def analyse(outcome: dict[str, Any]) -> dict[str, Any]:
    """Per target: medians and spreads per fixed size, the best fixed run, the adaptive runs, the fit."""
    task: Task = outcome["task"]
    fixed: list[RunResult] = outcome["fixed"]
    adaptive: list[RunResult] = outcome["adaptive"]
    seeds = task.seeds
    rows = []
    for target in task.targets:
        key = str(target)
        per_size: dict[int, dict[str, Any]] = {}
        for size in task.sizes:
            runs = [r for r in fixed if r.batch_size == size]
            crossings = [r.crossings[key] for r in runs]
            reached = [c for c in crossings if c is not None]
            complete = len(reached) == seeds
            steps = [c.steps for c in reached]
            examples = [c.examples for c in reached]
            per_size[size] = {
                "reached": f"{len(reached)}/{seeds}",
                "steps": _median(steps) if complete else math.nan,
                "steps_range": _spread(steps) if complete else (math.nan, math.nan),
                "examples": _median(examples) if complete else math.nan,
                "examples_range": _spread(examples) if complete else (math.nan, math.nan),
                "b_simple": _median([c.b_simple for c in reached]) if complete else math.nan,
                "by_seed": {
                    r.seed: None if c is None else (c.steps, c.examples) for r, c in zip(runs, crossings, strict=True)
                },
            }
        complete_sizes = [b for b in task.sizes if math.isfinite(per_size[b]["examples"])]
        best = min(complete_sizes, key=lambda b: per_size[b]["examples"]) if complete_sizes else None
        # The fit takes the mean batch size actually used, examples / steps: an epoch's last batch is smaller, which
        # matters once the batch is a sizeable share of the training set.
        mean_sizes = [per_size[b]["examples"] / per_size[b]["steps"] for b in complete_sizes]
        median_steps = [per_size[b]["steps"] for b in complete_sizes]
        fit = fit_pareto(mean_sizes, median_steps)
        fit_finite = fit_pareto(mean_sizes, median_steps, population=task.train_size)
        seed_fits = []
        for seed in range(seeds):
            points = [per_size[b]["by_seed"][seed] for b in complete_sizes]
            seed_fits.append(fit_pareto([e / s for s, e in points], [s for s, _ in points])["b_crit"])
        fixed_b_simple = [per_size[b]["b_simple"] for b in complete_sizes]
        row: dict[str, Any] = {
            "target": target,
            "fixed": per_size,
            "best_fixed_size": best,
            "fit": fit,
            "fit_finite_data": fit_finite,
            "b_crit_by_seed": seed_fits,
            "b_simple_fixed_median": _median(fixed_b_simple),
            "b_simple_fixed_range": _spread(fixed_b_simple),
            "adaptive": {},
        }
        for policy in sorted({r.kind for r in adaptive}):
            runs = [r for r in adaptive if r.kind == policy]
            crossings = [r.crossings[key] for r in runs]
            reached = [c for c in crossings if c is not None]
            complete = len(reached) == len(runs)
            entry: dict[str, Any] = {
                "reached": f"{len(reached)}/{len(runs)}",
                "steps": _median([c.steps for c in reached]) if complete else math.nan,
                "steps_range": _spread([c.steps for c in reached]) if complete else (math.nan, math.nan),
                "examples": _median([c.examples for c in reached]) if complete else math.nan,
                "examples_range": _spread([c.examples for c in reached]) if complete else (math.nan, math.nan),
                "b_simple": _median([c.b_simple for c in reached]) if complete else math.nan,
                "batch_size": _median([float(c.batch_size) for c in reached]) if complete else math.nan,
            }
            if best is not None and complete:
                ref = per_size[best]
                entry["examples_ratio"] = entry["examples"] / ref["examples"]
                entry["steps_ratio"] = entry["steps"] / ref["steps"]
                # Paired by seed (same initialisation and split): the spread of the ratios.
                pairs = [(r, c, ref["by_seed"][r.seed]) for r, c in zip(runs, crossings, strict=True) if c is not None]
                entry["examples_ratio_range"] = _spread([c.examples / f[1] for _, c, f in pairs if f])
                entry["steps_ratio_range"] = _spread([c.steps / f[0] for _, c, f in pairs if f])
            else:
                entry.update(examples_ratio=math.nan, steps_ratio=math.nan)
            if math.isfinite(fit["b_crit"]) and complete and entry["steps"] > fit["s_min"]:
                # Examples the fitted fixed-batch front needs in the adaptive run's number of steps.
                front = fit["e_min"] * (1 + 1 / (entry["steps"] / fit["s_min"] - 1))
                entry["examples_vs_front"] = entry["examples"] / front
            else:
                entry["examples_vs_front"] = math.nan
            row["adaptive"][policy] = entry
        rows.append(row)
    return {"rows": rows}


# --------------------------------------------------------------------------------------------------- report


def _fmt(value: float, spec: str = ".0f") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, spec)


def _range(pair: tuple[float, float], spec: str = ".0f") -> str:
    return f"[{_fmt(pair[0], spec)}, {_fmt(pair[1], spec)}]"


def _cell(median: float, spread: tuple[float, float], reached: str) -> str:
    if not math.isfinite(median):
        return f"not reached ({reached})"
    return f"{_fmt(median)} [{_fmt(spread[0])}–{_fmt(spread[1])}]"


def _verdict(value: float, limit: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return "meets" if value <= limit else "misses"


def summary_table(analysis: dict[str, Any]) -> list[str]:
    """Per target: the most sample-efficient fixed run, each adaptive policy against it, B_crit and B_simple."""
    rows = analysis["rows"]
    policies = list(rows[0]["adaptive"])
    names = [p.replace("adaptive:", "") for p in policies]
    lines = [
        "### Summary",
        "",
        "Medians over seeds. 'best fixed': the fixed size that needs the fewest examples. Ratios: adaptive over best "
        "fixed (goals: examples ≤ 1.15, steps ≤ 0.6). B_crit: the sweep's fit; B_simple: the monitor's, in the "
        "adaptive b_crit runs at the target.",
        "",
        "| loss ≤ | best fixed: B, steps, examples | "
        + " | ".join(f"{n}: steps, examples (B then) | {n}: examples ratio, steps ratio" for n in names)
        + " | B_crit (fit) | B_simple |",
        "|---|---|" + "---|---|" * len(names) + "---|---|",
    ]
    for row in rows:
        best = row["best_fixed_size"]
        ref = row["fixed"][best] if best is not None else {"steps": math.nan, "examples": math.nan}
        cells = [f"{row['target']}", f"B={best}, {_fmt(ref['steps'])}, {_fmt(ref['examples'])}"]
        for policy in policies:
            entry = row["adaptive"][policy]
            cells.append(f"{_fmt(entry['steps'])}, {_fmt(entry['examples'])} (B={_fmt(entry['batch_size'])})")
            cells.append(
                f"{_fmt(entry['examples_ratio'], '.2f')} ({_verdict(entry['examples_ratio'], 1.15)}), "
                f"{_fmt(entry['steps_ratio'], '.2f')} ({_verdict(entry['steps_ratio'], 0.6)})"
            )
        b_simple = row["adaptive"].get("adaptive:b_crit", {"b_simple": math.nan})["b_simple"]
        cells += [_fmt(row["fit"]["b_crit"]), _fmt(b_simple)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def task_markdown(outcome: dict[str, Any], analysis: dict[str, Any]) -> list[str]:
    task: Task = outcome["task"]
    tuned = outcome["tuned_lr"]
    lines = [
        f"## {task.name}",
        "",
        f"- Task: {task.description}.",
        f"- Fixed sizes {task.sizes}, rate tuned per size on seed 0 (grid {task.base_lr:g} × 2^k; best = fewest "
        f"steps to loss {task.tune_target}): "
        + ", ".join(f"B={b}: {lr:.4g}" for b, lr in tuned.items())
        + f". Seeds 0–{task.seeds - 1} (initialisation, split and order). Each run stops at the last target, "
        f"at divergence, or after {task.max_steps} steps / {task.max_examples:,} examples.",
        f"- Adaptive: start at B={min(task.sizes)} with lr {tuned[min(task.sizes)]:.4g}, "
        f"`NoiseScaleMonitor(grow_batch_size=True, max_batch_size={task.max_batch_size}, growth_policy=..., "
        f"log_every_n_steps={MONITOR_LOG_EVERY})`, learning-rate rule auto "
        f"({'linear for SGD' if task.optimizer == 'sgd' else 'square root for Adam'}), other options "
        "at their defaults.",
        f"- Wall time of this task: {outcome['seconds'] / 60:.1f} min.",
        "",
        *summary_table(analysis),
        "",
        "### Steps and examples to each target",
        "",
        "Median over seeds, [min–max] in brackets; **bold**: the fixed size that needs the fewest examples; for the "
        "adaptive runs, the batch size in force when the target was reached (median) follows the '@'.",
        "",
    ]
    rows = analysis["rows"]
    header = "| run | " + " | ".join(f"loss ≤ {row['target']}" for row in rows) + " |"
    rule = "|---|" + "---|" * len(rows)
    for quantity, title in (("steps", "Optimizer steps"), ("examples", "Training examples")):
        lines += [f"{title}:", "", header, rule]
        for size in task.sizes:
            cells = []
            for row in rows:
                cell = row["fixed"][size]
                text = _cell(cell[quantity], cell[f"{quantity}_range"], cell["reached"])
                cells.append(f"**{text}**" if size == row["best_fixed_size"] else text)
            lines.append(f"| fixed B={size} | " + " | ".join(cells) + " |")
        for policy in rows[0]["adaptive"]:
            cells = []
            for row in rows:
                entry = row["adaptive"][policy]
                text = _cell(entry[quantity], entry[f"{quantity}_range"], entry["reached"])
                cells.append(text + (f" @{_fmt(entry['batch_size'])}" if math.isfinite(entry[quantity]) else ""))
            lines.append(f"| {policy.replace('adaptive:', 'adaptive ')} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "",
        "### Adaptive against the most sample-efficient fixed run",
        "",
        "Ratios of medians; in brackets the range of the ratios paired by seed. Goals: examples ratio ≤ 1.15, steps "
        "ratio ≤ 0.6. 'vs front': the adaptive run's examples over the examples that the fitted fixed-batch front "
        "needs in the same number of steps (< 1: better than any fixed batch size).",
        "",
        "| loss ≤ | best fixed | policy | examples ratio | goal ≤ 1.15 | steps ratio | goal ≤ 0.6 | vs front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in analysis["rows"]:
        for policy, entry in row["adaptive"].items():
            lines.append(
                f"| {row['target']} | B={row['best_fixed_size']} | {policy} | "
                f"{_fmt(entry['examples_ratio'], '.2f')} {_range(entry.get('examples_ratio_range', (math.nan,) * 2), '.2f')} | "  # noqa: E501
                f"{_verdict(entry['examples_ratio'], 1.15)} | "
                f"{_fmt(entry['steps_ratio'], '.2f')} {_range(entry.get('steps_ratio_range', (math.nan,) * 2), '.2f')} | "  # noqa: E501
                f"{_verdict(entry['steps_ratio'], 0.6)} | {_fmt(entry['examples_vs_front'], '.2f')} |"
            )
    lines += [
        "",
        "### Critical batch size: the sweep's fit against the monitor's B_simple",
        "",
        "B_crit = E_min/S_min from fitting S(B) = S_min + E_min/B to the median steps of the fixed sizes (B: the mean "
        "batch actually used, examples/steps; in brackets the range of per-seed fits; 'rms': the fit's rms residual "
        f"in log S). 'finite data': the same fit with the noise of batches drawn without replacement from the "
        f"N = {task.train_size} training examples, S = S_min + E_min (1/B − 1/N). B_simple is the monitor's smoothed "
        "value when the run reached the target: in the adaptive `b_crit` runs, and in the fixed runs (median over "
        "sizes [range of the per-size medians]; it depends on the batch size and rate, McCandlish's 'temperature').",
        "",
        "| loss ≤ | S_min | E_min | B_crit (fit) | rms | B_crit (finite data) | B_simple (adaptive b_crit) | "
        "B_simple (fixed) | B_simple (adaptive) / B_crit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in analysis["rows"]:
        fit = row["fit"]
        adaptive = row["adaptive"].get("adaptive:b_crit", {"b_simple": math.nan})
        seed_fits = [v for v in row["b_crit_by_seed"] if math.isfinite(v)]
        ratio = adaptive["b_simple"] / fit["b_crit"] if math.isfinite(fit["b_crit"]) else math.nan
        lines.append(
            f"| {row['target']} | {_fmt(fit['s_min'], '.1f')} | {_fmt(fit['e_min'])} | {_fmt(fit['b_crit'])} "
            f"{_range(_spread(seed_fits))} | {_fmt(fit['rms_log_residual'], '.2f')} | "
            f"{_fmt(row['fit_finite_data']['b_crit'])} | {_fmt(adaptive['b_simple'])} | "
            f"{_fmt(row['b_simple_fixed_median'])} {_range(row['b_simple_fixed_range'])} | {_fmt(ratio, '.1f')} |"
        )
    lines += ["", "### Adaptive runs: batch-size changes (step: new size)", ""]
    for result in outcome["adaptive"]:
        changes = ", ".join(f"{c['step']}: {c['batch_size']}" for c in result.changes) or "none"
        lines.append(
            f"- {result.kind} seed {result.seed}: {changes}; ended at step {result.steps} after {result.examples:,} "
            f"examples, loss {result.final_loss:.3f} ({result.status}), {result.seconds:.1f} s"
        )
    lines += ["", f"![steps against examples, {task.name}](growth_{task.name}.png)", ""]
    return lines


def to_markdown(outcomes: list[dict[str, Any]], analyses: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Batch-size growth: steps and examples to a target loss, fixed batch sizes against adaptive growth",
        "",
        f"- Run: {meta['date']}, `{meta['command'].strip()}`, {meta['minutes']:.1f} min wall time",
        f"- Device: CPU ({meta['cpu']}, {meta['cores']} cores); torch threads: {meta['threads']}; 1-minute load "
        f"average {meta['load_average_at_start']:.2f} at the start, {meta['load_average_at_end']:.2f} at the end",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        "- Protocol: see the docstring of `benchmarks/bench_growth.py` and `docs/batch_size_benchmark.md`. Steps are "
        "optimizer steps; examples are training examples consumed by them; a target is reached the first time the "
        "measured training-set loss is at or below it (interpolated linearly between two evaluations when they are "
        "more than one step apart).",
        "",
    ]
    for outcome, analysis in zip(outcomes, analyses, strict=True):
        lines += task_markdown(outcome, analysis)
    return "\n".join(lines)


def plot(outcome: dict[str, Any], analysis: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    task: Task = outcome["task"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(task.targets)))
    markers = {"adaptive:b_crit": "*", "adaptive:sqrt": "D"}
    for color, row in zip(colors, analysis["rows"], strict=True):
        sizes = [b for b, c in row["fixed"].items() if math.isfinite(c["steps"])]
        e = [row["fixed"][b]["examples"] for b in sizes]
        s = [row["fixed"][b]["steps"] for b in sizes]
        ax.plot(e, s, "o-", color=color, label=f"loss ≤ {row['target']}", lw=1.2, ms=4)
        for b, ei, si in zip(sizes, e, s, strict=True):
            if row is analysis["rows"][0]:
                ax.annotate(f"B={b}", (ei, si), textcoords="offset points", xytext=(4, 3), fontsize=7)
        fit = row["fit"]
        if math.isfinite(fit["b_crit"]):
            bs = np.geomspace(min(task.sizes) / 4, max(task.sizes) * 4, 100)
            ax.plot(fit["e_min"] + fit["s_min"] * bs, fit["s_min"] + fit["e_min"] / bs, "--", color=color, lw=0.8)
            ax.plot([fit["e_min"] * 2], [fit["s_min"] * 2], "x", color=color, ms=7)
        for policy, entry in row["adaptive"].items():
            if math.isfinite(entry["steps"]):
                ax.plot(
                    entry["examples"],
                    entry["steps"],
                    markers.get(policy, "s"),
                    color=color,
                    ms=12 if markers.get(policy) == "*" else 6,
                    mec="k",
                    mew=0.6,
                )
    ax.plot([], [], "k*", ms=10, label="adaptive b_crit")
    ax.plot([], [], "kD", ms=5, label="adaptive sqrt")
    ax.plot([], [], "k--", lw=0.8, label="fit S/S_min−1 = (E/E_min−1)⁻¹")
    ax.plot([], [], "kx", label="B = B_crit on the fit")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="examples to reach the target",
        ylabel="optimizer steps",
        title=f"{task.name}: fixed batch sizes (median of {task.seeds} seeds) and adaptive growth",
    )
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    # The adaptive run's batch size and the monitor's B_simple, against the fitted B_crit of each target.
    ax = axes[1]
    for policy, style in (("adaptive:b_crit", "-"), ("adaptive:sqrt", ":")):
        runs = [r for r in outcome["adaptive"] if r.kind == policy]
        if not runs:
            continue
        run = runs[0]
        hist = run.history[1:]
        ax.step(
            [h[1] for h in hist],
            [h[3] for h in hist],
            style,
            color="C3",
            where="post",
            label=f"batch size, {policy.split(':')[1]} (seed 0)",
        )
        if policy == "adaptive:b_crit":
            ax.plot([h[1] for h in hist], [h[5] for h in hist], color="C0", lw=1, label="B_simple (monitor, seed 0)")
    for color, row in zip(colors, analysis["rows"], strict=True):
        entry = row["adaptive"].get("adaptive:b_crit")
        if entry and math.isfinite(entry["examples"]) and math.isfinite(row["fit"]["b_crit"]):
            ax.plot(
                entry["examples"],
                row["fit"]["b_crit"],
                "s",
                color=color,
                mec="k",
                label=f"B_crit fit, loss ≤ {row['target']}",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="examples",
        ylabel="batch size",
        title="adaptive run: batch size, B_simple, and the sweep's B_crit",
    )
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[2]
    best = {b: [r for r in outcome["fixed"] if r.batch_size == b and r.seed == 0] for b in task.sizes}
    cmap = plt.cm.plasma(np.linspace(0, 0.85, len(task.sizes)))
    for color, (b, runs) in zip(cmap, best.items(), strict=True):
        if runs:
            hist = runs[0].history
            ax.plot([max(h[1], 1) for h in hist], [h[2] for h in hist], color=color, lw=1, label=f"fixed B={b}")
    for policy, style in (("adaptive:b_crit", "k-"), ("adaptive:sqrt", "k:")):
        runs = [r for r in outcome["adaptive"] if r.kind == policy and r.seed == 0]
        if runs:
            hist = runs[0].history
            ax.plot([max(h[1], 1) for h in hist], [h[2] for h in hist], style, lw=1.6, label=policy)
    for target in task.targets:
        ax.axhline(target, color="grey", lw=0.5, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="examples", ylabel="training-set loss", title="loss curves (seed 0)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
    low, high = axes[1].get_ylim()
    axes[1].set_yticks([2**k for k in range(20) if low <= 2**k <= high])
    initial = next((r.history[0][2] for r in outcome["fixed"] if r.history), math.nan)
    axes[2].set_yticks([*task.targets, round(initial, 1)] if math.isfinite(initial) else task.targets)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- metadata


def _run_json(result: RunResult, keep_history: bool) -> dict[str, Any]:
    out = asdict(result)
    out["crossings"] = {k: None if v is None else asdict(v) for k, v in result.crossings.items()}
    if keep_history:
        stride = max(1, len(result.history) // 200)
        kept = list(result.history[::stride])
        if result.history and kept[-1] != result.history[-1]:
            kept.append(result.history[-1])
        out["history"] = kept
    else:
        del out["history"]
    return out


# --------------------------------------------------------------------------------------------------- main


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="digits only, 3 seeds: about 2-3 minutes on 2 cores")
    parser.add_argument("--tasks", default=None, help="comma-separated of digits,charlm (default: both; quick: digits)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: per task)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="growth policies of the adaptive runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--out", type=Path, default=None, help="folder for growth.md, growth.json and the plots")
    parser.add_argument("--report", type=Path, default=None, help="only re-write the report of this growth.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.report is not None:
        outcomes, meta = load_outcomes(args.report)
        write_report(outcomes, meta, args.out or args.report.parent)
        print((args.out or args.report.parent) / "growth.md")
        return
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*NoiseScaleMonitor has no logger.*")
    warnings.filterwarnings("ignore", message=".*the number of training batches.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_gns"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    names = (args.tasks or ("digits" if args.quick else "digits,charlm")).split(",")
    unknown = [n for n in names if n not in TASK_BUILDERS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {list(TASK_BUILDERS)}")
    policies = [p for p in args.policies.split(",") if p]
    out = args.out or (Path(tempfile.gettempdir()) / "lightning-gns-growth-quick" if args.quick else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "benchmarks/bench_growth.py", *(sys.argv[1:] if argv is None else argv)]),
        "cpu": run_info.cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": run_info.load_average(),
        "versions": run_info.versions(
            ("torch", "lightning", "lightning-gns", "numpy", "scipy", "scikit-learn", "matplotlib"), with_commit=True
        ),
    }

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="lightning-gns-growth-") as workdir:
        for name in names:
            task = TASK_BUILDERS[name](args.quick)
            if args.seeds is not None:
                task.seeds = args.seeds
            log(f"{name}: {task.description}")
            outcomes.append(run_task(task, Path(workdir), log, policies))
            log(f"{name}: done in {outcomes[-1]['seconds'] / 60:.1f} min")
    meta["load_average_at_end"] = run_info.load_average()
    meta["minutes"] = (time.perf_counter() - started) / 60
    write_report(outcomes, meta, out)
    log(f"wrote {out / 'growth.md'}, growth.json and the plots")


def write_report(outcomes: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """Analyse, plot, and write ``growth.md`` and ``growth.json`` (which :func:`load_outcomes` reads back)."""
    out.mkdir(parents=True, exist_ok=True)
    analyses = [analyse(outcome) for outcome in outcomes]
    for outcome, analysis in zip(outcomes, analyses, strict=True):
        plot(outcome, analysis, out / f"growth_{outcome['task'].name}.png")
    (out / "growth.md").write_text(to_markdown(outcomes, analyses, meta) + "\n")
    payload = {
        "meta": meta,
        "tasks": [
            {
                "task": o["task"].name,
                "description": o["task"].description,
                "sizes": o["task"].sizes,
                "max_batch_size": o["task"].max_batch_size,
                "targets": o["task"].targets,
                "tune_target": o["task"].tune_target,
                "seeds": o["task"].seeds,
                "max_steps": o["task"].max_steps,
                "max_examples": o["task"].max_examples,
                "train_size": o["task"].train_size,
                "tuned_lr": o["tuned_lr"],
                "seconds": o["seconds"],
                "analysis": a["rows"],
                "tuning": [_run_json(r, keep_history=False) for r in o["tuning"]],
                "fixed": [_run_json(r, keep_history=r.seed == 0) for r in o["fixed"]],
                "adaptive": [_run_json(r, keep_history=True) for r in o["adaptive"]],
            }
            for o, a in zip(outcomes, analyses, strict=True)
        ],
    }
    (out / "growth.json").write_text(json.dumps(run_info.json_safe(payload), indent=1) + "\n")


def load_outcomes(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The runs and metadata of a ``growth.json``, to analyse and report again without training."""
    payload = json.loads(path.read_text())

    def number(value: Any) -> float:
        return math.nan if value is None else value

    def run(data: dict[str, Any]) -> RunResult:
        crossings = {
            k: None if v is None else Crossing(**{f: number(x) for f, x in v.items()})
            for k, v in data["crossings"].items()
        }
        history = [tuple(number(x) for x in h) for h in data.get("history", [])]
        fields = {k: v for k, v in data.items() if k not in ("crossings", "history")}
        fields["final_loss"] = number(fields["final_loss"])
        return RunResult(**fields, crossings=crossings, history=history)  # type: ignore[arg-type]

    outcomes = []
    for entry in payload["tasks"]:
        task = TASK_BUILDERS[entry["task"]](False)
        for name in ("description", "sizes", "max_batch_size", "targets", "tune_target", "seeds", "max_steps"):
            setattr(task, name, entry.get(name, getattr(task, name)))
        task.max_examples = entry.get("max_examples", task.max_examples)
        outcomes.append(
            {
                "task": task,
                "tuned_lr": {int(k): v for k, v in entry["tuned_lr"].items()},
                "seconds": entry["seconds"],
                "tuning": [run(r) for r in entry["tuning"]],
                "fixed": [run(r) for r in entry["fixed"]],
                "adaptive": [run(r) for r in entry["adaptive"]],
            }
        )
    meta = {k: number(v) for k, v in payload["meta"].items()}
    return outcomes, meta


if __name__ == "__main__":
    main()
