"""How another callback follows the monitor's estimates: the read-only view the monitor hands out at logging steps.

:class:`~lightning_gns.NoiseScaleMonitor` measures and logs. A callback that acts on what it measures
(:class:`~lightning_gns.BatchSizeGrowth`) registers with :meth:`NoiseScaleMonitor.follow
<lightning_gns.NoiseScaleMonitor.follow>` and is then, at every logging step and on every rank, asked for the
quantities it wants logged in the same row, and handed the logged estimates as a read-only mapping of floats.
This module sits below both, so that neither imports the other to meet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from torch import Tensor

from lightning_gns.sources.base import GradientSource

__all__ = ["EstimatesFollower", "EstimatesProvider"]


@runtime_checkable
class EstimatesFollower(Protocol):
    """What the monitor asks of a callback that follows its estimates."""

    def hparams(self) -> dict[str, Any]:
        """Hyperparameters to write to the loggers with the monitor's, at the start of training."""

    def logged(self) -> dict[str, float]:
        """Quantities to log in the monitor's row at a logging step (names without the prefix)."""

    def tensorboard_charts(self, prefix: str) -> dict[str, list[Any]]:
        """Charts to add to the monitor's TensorBoard custom-scalars layout."""

    def on_estimates_logged(self, trainer: pl.Trainer, estimates: Mapping[str, float]) -> None:
        """Called on every rank right after a logging step, with the logged estimates (names without prefix)."""


@runtime_checkable
class EstimatesProvider(Protocol):
    """The public, read-only side of :class:`~lightning_gns.NoiseScaleMonitor` that followers rely on."""

    b_crit_factor: float
    log_key_prefix: str

    @property
    def horizon_examples(self) -> float | None:
        """The moving average's horizon in examples (``None`` until the first step fixes the default)."""

    @property
    def source(self) -> GradientSource | None:
        """The gradient source in use, resolved at ``setup``."""

    @property
    def estimates(self) -> Mapping[str, Tensor]:
        """The latest smoothed estimates, read-only."""

    def follow(self, follower: EstimatesFollower) -> None:
        """Register ``follower`` (once; a second call is a no-op)."""
