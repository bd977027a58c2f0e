"""Lightning internals that the monitor and batch-size growth read or set, each behind one function.

Every function here was checked on Lightning 2.6.0 through 2.6.6 (the supported range, ``pyproject.toml``), where
the private names below are the same. Each reads its name with a fallback: a Lightning that renamed it raises
:class:`LightningInternalsError`, which names the internal, the versions it was checked on and what to do, rather
than an ``AttributeError`` from deep inside a hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning
import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy

__all__ = [
    "LightningInternalsError",
    "batches_that_stepped",
    "ddp_comm_state",
    "replace_ddp_comm_hook",
    "replace_train_dataloaders",
    "restart_train_fetcher",
    "set_train_fetcher_length",
    "train_dataloaders",
    "validates_by_time",
]

#: The Lightning versions every function of this module was run against.
CHECKED_ON = "Lightning 2.6.0-2.6.6"
_MISSING = object()


class LightningInternalsError(RuntimeError):
    """A private Lightning attribute that lightning-gns relies on is not where it was in :data:`CHECKED_ON`."""


def _get(obj: Any, name: str, owner: str) -> Any:
    value = getattr(obj, name, _MISSING)
    if value is _MISSING:
        raise LightningInternalsError(
            f"lightning-gns reads Lightning's private `{owner}.{name}`, which this Lightning "
            f"({lightning.__version__}) does not have (checked on {CHECKED_ON}). Install a Lightning in that range "
            "(`pip install 'lightning>=2.6,<2.7'`), or report the version so the shim in "
            "lightning_gns/_compat/lightning.py can follow it."
        )
    return value


def ddp_comm_state(strategy: DDPStrategy) -> object | None:
    """The state the user gave ``DDPStrategy(ddp_comm_state=...)``: the first argument of a DDP comm hook.

    Checked on Lightning 2.6.0-2.6.6 (``DDPStrategy._ddp_comm_state``).
    """
    return _get(strategy, "_ddp_comm_state", "DDPStrategy")


def replace_ddp_comm_hook(strategy: DDPStrategy, hook: Callable[..., Any]) -> Callable[..., Any] | None:
    """Make ``hook`` the strategy's DDP comm hook; return the one the user had set, its wrapper applied, or None.

    Lightning registers ``DDPStrategy(ddp_comm_hook=..., ddp_comm_wrapper=...)`` itself when it wraps the model,
    on CUDA only. The returned hook is for ``hook`` to call on each bucket, so that the user's compression (or
    other) hook still runs.

    Checked on Lightning 2.6.0-2.6.6 (``DDPStrategy._ddp_comm_hook`` and ``_ddp_comm_wrapper``).
    """
    inner = _get(strategy, "_ddp_comm_hook", "DDPStrategy")
    wrapper = _get(strategy, "_ddp_comm_wrapper", "DDPStrategy")
    if inner is not None and wrapper is not None:
        inner = wrapper(inner)
    strategy._ddp_comm_hook = hook
    strategy._ddp_comm_wrapper = None
    return inner


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """The step Lightning's own logging uses for ``self.log`` values (batches that ran an optimizer step).

    Checked on Lightning 2.6.0-2.6.6 (``_TrainingEpochLoop._batches_that_stepped``).
    """
    return int(_get(trainer.fit_loop.epoch_loop, "_batches_that_stepped", "_TrainingEpochLoop"))


def validates_by_time(trainer: pl.Trainer) -> bool:
    """Whether ``val_check_interval`` is a duration (Lightning 2.6+), not a fraction of the epoch or a count.

    Lightning before 2.6 has no time-based validation: there the answer is ``False``.
    Checked on Lightning 2.6.0-2.6.6 (``Trainer._val_check_time_interval``, new in 2.6).
    """
    return getattr(trainer, "_val_check_time_interval", None) is not None


def _fit_loop_fetcher(trainer: pl.Trainer) -> Any:
    return _get(trainer.fit_loop, "_data_fetcher", "_FitLoop")


def restart_train_fetcher(trainer: pl.Trainer) -> None:
    """Make the fit loop draw a fresh iterator from the training dataloader (it starts where the sampler stands).

    Checked on Lightning 2.6.0-2.6.6 (``_FitLoop._data_fetcher``; ``iter()`` of a ``_DataFetcher`` resets it).
    """
    fetcher = _fit_loop_fetcher(trainer)
    if fetcher is not None:
        iter(fetcher)


def set_train_fetcher_length(trainer: pl.Trainer, length: int) -> None:
    """Tell the fit loop's fetcher that this epoch has ``length`` batches (it caches the dataloader's length).

    Checked on Lightning 2.6.0-2.6.6 (``_DataFetcher.length``, ``.fetched`` and ``.done``).
    """
    fetcher = _fit_loop_fetcher(trainer)
    if fetcher is not None and _get(fetcher, "length", "_DataFetcher") is not None:
        fetcher.length = length
        fetcher.done = _get(fetcher, "fetched", "_DataFetcher") >= length


def _combined_loader(trainer: pl.Trainer) -> Any:
    return _get(trainer.fit_loop, "_combined_loader", "_FitLoop")


def train_dataloaders(trainer: pl.Trainer) -> list[Any]:
    """The training dataloaders as the fit loop holds them (flattened), ``[]`` before it holds any.

    Checked on Lightning 2.6.0-2.6.6 (``_FitLoop._combined_loader``, ``CombinedLoader.flattened``).
    """
    combined = _combined_loader(trainer)
    return [] if combined is None else list(combined.flattened)


def replace_train_dataloaders(trainer: pl.Trainer, loaders: list[Any]) -> None:
    """Swap the fit loop's training dataloaders for ``loaders`` mid-``on_train_start``, iterators included.

    The iterator Lightning made before the hook (workers included) is shut down, ``limit_train_batches`` limits
    are dropped (the new loaders set the epoch), and the fetcher is pointed at the new loaders.

    Checked on Lightning 2.6.0-2.6.6 (``_FitLoop._combined_loader``/``_data_fetcher``, ``CombinedLoader.reset``,
    ``.flattened``, ``.limits``, ``_DataFetcher.setup``).
    """
    combined = _combined_loader(trainer)
    if combined is None:
        raise LightningInternalsError(
            "The fit loop holds no training dataloader yet: replace it from `on_train_start` or later."
        )
    combined.reset()
    combined.flattened = loaders
    combined.limits = None
    fetcher = _fit_loop_fetcher(trainer)
    if fetcher is not None:
        fetcher.setup(combined)
