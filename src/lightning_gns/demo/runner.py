"""The demo: train the bundled tasks with a :class:`~lightning_gns.NoiseScaleMonitor` and print what it measured."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_gns.callbacks.noise_scale_monitor import NoiseScaleMonitor
from lightning_gns.demo.data import CharTextDataModule, DigitsDataModule
from lightning_gns.demo.models import CharTransformer, DigitsMLP

Task = Literal["digits", "charlm"]
TASKS: tuple[Task, ...] = ("digits", "charlm")


@dataclass
class DemoResult:
    """What one task's run measured: the history of the smoothed estimates and the final suggestion."""

    task: str
    log_dir: Path
    batch_size: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        """The last recorded estimates."""
        return self.history[-1] if self.history else {}


class _History(Callback):
    """Keeps the monitor's estimates at each of its logging steps (one host sync per logging period)."""

    def __init__(self, monitor: NoiseScaleMonitor, every: int, result: DemoResult) -> None:
        self.monitor = monitor
        self.every = every
        self.result = result
        self.examples = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        estimates = self.monitor.estimates
        if not estimates or trainer.global_step % self.every:
            return
        row = {key: float(estimates[key]) for key in ("b_simple", "b_simple_lower", "b_simple_upper", "b_crit")}
        row["step"] = trainer.global_step
        row["examples"] = float(estimates["examples"])
        self.result.history.append(row)


def _task(task: Task, batch_size: int) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    if task == "digits":
        return DigitsMLP(layer_norm=True), DigitsDataModule(batch_size=batch_size)
    data = CharTextDataModule(block_size=64, batch_size=batch_size, max_chars=200_000)
    return CharTransformer(vocab_size=data.vocab_size, block_size=64), data


def run_task(
    task: Task, out_dir: Path, max_steps: int, batch_size: int = 32, seed: int = 0, progress_bar: bool = True
) -> DemoResult:
    """Train one bundled task with the monitor, logging to TensorBoard and CSV under ``out_dir/task``."""
    pl.seed_everything(seed, verbose=False)
    model, data = _task(task, batch_size)
    monitor = NoiseScaleMonitor(prog_bar=True)
    log_every = max(1, max_steps // 40)
    result = DemoResult(task=task, log_dir=out_dir / task, batch_size=batch_size)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        log_every_n_steps=log_every,
        logger=[TensorBoardLogger(out_dir, name=task, version=""), CSVLogger(out_dir, name=task, version="csv")],
        callbacks=[monitor, _History(monitor, max(1, max_steps // 10), result)],
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    return result


def suggested_batch_size(b_crit: float, lower: float) -> int | None:
    """A power of two near the critical-batch estimate, never below what the interval's lower end supports."""
    if not math.isfinite(b_crit) or b_crit <= 0:
        return None
    return 2 ** max(0, round(math.log2(max(b_crit, lower if math.isfinite(lower) else 0.0))))


def format_result(result: DemoResult) -> str:
    """A plain-text table of B_simple (with its 90% band) over training, and the suggested batch size."""
    lines = [f"\n== {result.task}: B_simple over training (batch size {result.batch_size}, 90% interval)"]
    lines.append(f"{'step':>6} {'examples':>9} {'B_simple':>10} {'lower':>10} {'upper':>10}")
    for row in result.history:
        lines.append(
            f"{int(row['step']):>6} {int(row['examples']):>9} {row['b_simple']:>10.1f} "
            f"{row['b_simple_lower']:>10.1f} {row['b_simple_upper']:>10.1f}"
        )
    final = result.final
    suggestion = suggested_batch_size(final.get("b_crit", math.nan), final.get("b_simple_lower", math.nan))
    if suggestion is None:
        lines.append("No suggestion yet: |G|² is not resolved (B_simple undefined); train longer.")
    else:
        lines.append(
            f"Suggested batch size: {suggestion} (B_crit ≈ B_simple = {final['b_crit']:.0f}, 90% interval "
            f"[{final['b_simple_lower']:.0f}, {final['b_simple_upper']:.0f}]). B_simple ignores curvature and has "
            "been measured 1.4–5× above the critical batch size of a sweep: treat it as an upper guide."
        )
    lines.append(f"Logs: tensorboard --logdir {result.log_dir}")
    return "\n".join(lines)
