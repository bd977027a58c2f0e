"""The demo: train the bundled tasks with a :class:`~lightning_gns.NoiseScaleMonitor` and print what it measured.

Each task is the YAML config of the same name in ``configs/`` (shipped in this package, see :func:`config_path`),
run through :class:`~lightning_gns.lightning_cli.GNSLightningCLI`: ``lightning-gns demo`` trains exactly what
``lightning-gns fit --config configs/<task>.yaml`` trains, with a few overrides (steps, batch size, seed, where
the logs go) and a callback that keeps the history for the printed table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_gns.callbacks.noise_scale_monitor import NoiseScaleMonitor
from lightning_gns.functional import suggested_batch_size
from lightning_gns.lightning_cli import GNSLightningCLI

Task = Literal["digits", "charlm"]
TASKS: tuple[Task, ...] = ("digits", "charlm")

CONFIG_DIR = Path(__file__).parent / "configs"


def config_path(task: Task) -> Path:
    """The YAML config of a demo task (``configs/<task>.yaml`` of the repository is the same folder)."""
    if task not in TASKS:
        raise ValueError(f"Expected `task` to be one of {TASKS}, but got {task!r}.")
    return CONFIG_DIR / f"{task}.yaml"


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


def demo_config(
    task: Task,
    out_dir: Path | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """A task's config (:func:`config_path`) as a dict, with the demo's overrides applied.

    Args:
        task: ``"digits"`` or ``"charlm"``.
        out_dir: the ``save_dir`` of every logger (``None``: the config's, ``runs/demo``).
        max_steps: optimizer steps; the Trainer then logs 40 times in the run (``None``: the config's).
        batch_size: examples per batch (``None``: the config's).
        seed: ``seed_everything`` (``None``: the config's).
        progress_bar: show Lightning's progress bar.

    Returns:
        The config, as ``GNSLightningCLI(args=config, run=False)`` takes it.
    """
    config: dict[str, Any] = yaml.safe_load(config_path(task).read_text())
    trainer = config.setdefault("trainer", {})
    if max_steps is not None:
        trainer["max_steps"] = max_steps
        trainer["log_every_n_steps"] = max(1, max_steps // 40)
    if out_dir is not None:
        loggers = trainer.get("logger") or []
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            logger.setdefault("init_args", {})["save_dir"] = str(out_dir)
    if batch_size is not None:
        config["data"].setdefault("init_args", {})["batch_size"] = batch_size
    if seed is not None:
        config["seed_everything"] = seed
    trainer["enable_progress_bar"] = progress_bar
    return config


def run_task(
    task: Task,
    out_dir: Path | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    progress_bar: bool = True,
) -> DemoResult:
    """Train one bundled task from its config (:func:`demo_config`), logging to TensorBoard and CSV.

    Returns:
        The monitor's estimates at ten points of the run, for :func:`format_result`.

    Raises:
        ValueError: if the task's config has no :class:`~lightning_gns.NoiseScaleMonitor` among its callbacks.
    """
    config = demo_config(task, out_dir, max_steps, batch_size, seed, progress_bar)
    cli = GNSLightningCLI(args=config, run=False)
    trainer = cli.trainer
    monitors = [c for c in trainer.callbacks if isinstance(c, NoiseScaleMonitor)]  # type: ignore[attr-defined]
    if not monitors:
        raise ValueError(f"Expected a NoiseScaleMonitor in `trainer.callbacks` of {config_path(task)}, found none.")
    steps = trainer.max_steps
    batch_size = getattr(cli.datamodule, "batch_size", 0)
    result = DemoResult(task=task, log_dir=Path(trainer.log_dir or "."), batch_size=batch_size)
    trainer.callbacks.append(_History(monitors[0], max(1, steps // 10), result))  # type: ignore[attr-defined]
    trainer.fit(cli.model, datamodule=cli.datamodule)
    return result


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
    b_crit, b_simple = final.get("b_crit", math.nan), final.get("b_simple", math.nan)
    suggestion = suggested_batch_size(b_crit, final.get("b_simple_lower", math.nan) * b_crit / b_simple)
    if suggestion is None:
        lines.append("No suggestion yet: |G|² is not resolved (B_simple undefined); train longer.")
    else:
        lines.append(
            f"Suggested batch size: {suggestion} (B_crit ≈ B_simple = {final['b_crit']:.0f}, 90% interval "
            f"[{final['b_simple_lower']:.0f}, {final['b_simple_upper']:.0f}]). B_simple ignores curvature: "
            "papers found it 1.4–5× above a sweep's critical batch size, our growth benchmark 0.2–0.8× of it "
            "(docs/batch_size_benchmark.md): treat it as a guide, not a law."
        )
    lines.append(f"Logs: tensorboard --logdir {result.log_dir}")
    return "\n".join(lines)
