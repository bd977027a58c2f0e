"""Growing the batch size of a running fit: the Lightning side of :class:`~lightning_gns.BatchSizeScheduler`.

:class:`BatchSizeGrowth` is a callback of its own that follows a :class:`~lightning_gns.NoiseScaleMonitor`
(``NoiseScaleMonitor(grow_batch_size=True)`` builds one). It

* swaps the training dataloader for one driven by a :class:`~lightning_gns.sampler.ResizableBatchSampler` (same
  data set, workers and collate function), so that the batch size can change between any two optimizer steps
  with every example of an epoch served exactly once, on every rank;
* turns the scheduler's effective batch size into a micro-batch (up to a memory cap) times
  ``accumulate_grad_batches``, changing both at the same optimizer-step boundary on every rank;
* rescales the learning rate by the declared rule, inside the optimizer step only (optimizer step pre- and
  post-hooks), so that Lightning's LR schedulers keep stepping the unscaled value: their output is scaled, they
  are not fought;
* checkpoints all of it, position in the epoch included.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_gns import tags
from lightning_gns._compat.lightning import (
    replace_train_dataloaders,
    restart_train_fetcher,
    set_train_fetcher_length,
    train_dataloaders,
    validates_by_time,
)
from lightning_gns.callbacks.estimates import EstimatesProvider
from lightning_gns.sampler import ResizableBatchSampler, split_batch_size
from lightning_gns.scheduler import _POLICIES as _GROWTH_POLICIES
from lightning_gns.scheduler import BatchSizeChange, BatchSizeScheduler, GrowthPolicy
from lightning_gns.sources.preconditioning import is_adam_family

#: Steps' worth of examples (at the first step's batch size) that the moving average remembers by default.
DEFAULT_HORIZON_STEPS = tags.DEFAULT_HORIZON_STEPS

LRScaling = Literal["auto", "linear", "sqrt", "none"]
_LR_SCALINGS = ("auto", "linear", "sqrt", "none")

# Optimizers whose step is (momentum) SGD: the learning rate scales linearly with the batch (Goyal et al., 2017).
_LINEAR_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.SGD,)
# Adaptive optimizers: square-root scaling (Malladi et al., 2022; OLMo's batch-size schedule). Beyond these, any
# optimizer the preconditioned noise scale takes for Adam (`is_adam_family`) scales the same way.
_SQRT_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
)


@dataclass
class _PendingChange:
    """A change decided at a logging step, to take effect at batch ``batch`` of epoch ``epoch``."""

    epoch: int
    batch: int
    batch_size: int  # effective
    micro_batch_size: int
    accumulate_grad_batches: int
    reason: str


def default_lr_scaling(optimizers: list[torch.optim.Optimizer]) -> Literal["linear", "sqrt"]:
    """The learning-rate rule for these optimizers: linear for SGD, square root for the Adam family.

    Raises:
        MisconfigurationException: for an optimizer of neither kind, or a mix of both.
    """
    kinds = set()
    for optimizer in optimizers:
        if isinstance(optimizer, _LINEAR_OPTIMIZERS):
            kinds.add("linear")
        elif isinstance(optimizer, _SQRT_OPTIMIZERS) or is_adam_family(optimizer):  # a third-party Adam, too
            kinds.add("sqrt")
        else:
            raise MisconfigurationException(
                f"NoiseScaleMonitor(grow_batch_size=True) has no default learning-rate rule for "
                f"{type(optimizer).__name__}. Declare one: `lr_scaling='linear'` (SGD-like), 'sqrt' (Adam-like) or "
                "'none'."
            )
    if len(kinds) != 1:
        raise MisconfigurationException(
            "The optimizers mix SGD and adaptive methods, which scale their learning rates differently with the "
            "batch size. Declare the rule: `lr_scaling='linear'`, 'sqrt' or 'none'."
        )
    return "linear" if kinds == {"linear"} else "sqrt"


def lr_scale(rule: str, batch_size: int, initial_batch_size: int) -> float:
    """The learning-rate multiplier of ``rule`` at ``batch_size``, relative to ``initial_batch_size``.

    Example::

        >>> lr_scale("linear", 256, 64), lr_scale("sqrt", 256, 64), lr_scale("none", 256, 64)
        (4.0, 2.0, 1.0)
    """
    ratio = batch_size / initial_batch_size
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    return 1.0


class BatchSizeGrowth(Callback):
    r"""Grow the batch size of a fit as its gradient noise scale grows, reading a :class:`NoiseScaleMonitor`.

    Add it to a ``Trainer`` next to a :class:`~lightning_gns.NoiseScaleMonitor`: at the monitor's logging steps
    a :class:`~lightning_gns.BatchSizeScheduler` turns the logged B_simple (and its interval) into the effective
    batch size (micro-batch × ``accumulate_grad_batches`` × world size), which changes at the next optimizer-step
    boundary, mid-epoch included, with every example of an epoch served once on every rank. The training
    dataloader is made resizable; the learning rate is rescaled inside the optimizer step only, so LR schedulers
    keep stepping the unscaled value. Everything is checkpointed, position in the epoch included.

    ``NoiseScaleMonitor(grow_batch_size=True, ...)`` builds one of these with the same options (a shortcut);
    ``monitor.growth`` is the one in use either way.

    Logged with the monitor's estimates (under its ``log_key_prefix``): ``lr``, ``lr_scale``,
    ``accumulate_grad_batches``, ``micro_batch_size``, ``batch_size_target``, ``batch_size_changes``
    (:data:`lightning_gns.tags.GROWTH`); the hyperparameters ``lr_scaling`` and ``growth_policy``.

    Args:
        max_batch_size: the largest effective batch size (``None``: what one epoch of the data can fill).
        max_micro_batch_size: the most examples one forward/backward pass may hold (the memory cap); beyond it
            accumulation grows. ``None``: no cap (set one on an accelerator, e.g. from Lightning's
            ``BatchSizeFinder``).
        growth_policy: ``"b_crit"`` (target ``b_crit_factor`` × B_simple), ``"sqrt"`` or ``"goodput"`` (see
            :class:`~lightning_gns.BatchSizeScheduler`).
        lr_scaling: how the learning rate follows the batch size: ``"linear"`` (SGD), ``"sqrt"`` (Adam family),
            ``"none"``, or ``"auto"`` (by optimizer type).
        lr_warmup_steps: reach a new learning-rate scale linearly over this many optimizer steps.
        min_examples_between_changes: examples to train on between two changes (``None``: half the monitor's
            smoothing horizon).
        batch_size_scheduler: a fully configured scheduler (overrides ``growth_policy``, ``max_batch_size`` and
            ``min_examples_between_changes``); its ``initial_batch_size`` must be the run's.
        b_crit_factor: the scheduler's ``factor`` (target = this × B_simple); ``None``: the monitor's.
        monitor: the monitor to follow; ``None``: the one :class:`~lightning_gns.NoiseScaleMonitor` among the
            Trainer's callbacks.

    Raises:
        MisconfigurationException: for an invalid option when built; at ``setup`` without exactly one monitor to
            follow, or with ``reload_dataloaders_every_n_epochs``/``limit_train_batches``; at the start of
            training for a dataloader it cannot resize (the message says how to build one it can).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_gns import BatchSizeGrowth, NoiseScaleMonitor
        >>> growth = BatchSizeGrowth(max_batch_size=4096, max_micro_batch_size=256, lr_scaling="sqrt")
        >>> trainer = Trainer(callbacks=[NoiseScaleMonitor(), growth], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        max_batch_size: int | None = None,
        max_micro_batch_size: int | None = None,
        growth_policy: GrowthPolicy = "b_crit",
        lr_scaling: LRScaling = "auto",
        lr_warmup_steps: int = 0,
        min_examples_between_changes: float | None = None,
        batch_size_scheduler: BatchSizeScheduler | None = None,
        b_crit_factor: float | None = None,
        monitor: EstimatesProvider | None = None,
    ) -> None:
        check_growth_options(True, growth_policy, max_batch_size, max_micro_batch_size, min_examples_between_changes)
        if lr_scaling not in _LR_SCALINGS:
            raise MisconfigurationException(f"Expected `lr_scaling` to be one of {_LR_SCALINGS}, got {lr_scaling!r}.")
        if not (_is_int(lr_warmup_steps) and lr_warmup_steps >= 0):
            raise MisconfigurationException(f"Expected `lr_warmup_steps` to be an int >= 0, got {lr_warmup_steps!r}.")
        if b_crit_factor is not None and not (_is_number(b_crit_factor) and 0 < b_crit_factor < math.inf):
            raise MisconfigurationException(
                f"Expected `b_crit_factor` to be a finite number > 0, or None for the monitor's; got {b_crit_factor!r}."
            )
        self.scheduler = batch_size_scheduler
        self._scheduler_given = batch_size_scheduler is not None
        self.policy: GrowthPolicy = growth_policy
        self.b_crit_factor = b_crit_factor
        self.max_batch_size = max_batch_size
        self.max_micro_batch_size = max_micro_batch_size
        self.lr_scaling: LRScaling = lr_scaling
        self.lr_warmup_steps = lr_warmup_steps
        self.min_examples_between_changes = min_examples_between_changes
        self.monitor = monitor
        # Built by `NoiseScaleMonitor(grow_batch_size=True)`: its state is checkpointed inside the monitor's.
        self._owned_by_monitor = False

        self.sampler: ResizableBatchSampler | None = None
        self.rule: str = "none"
        self.initial_batch_size = 0
        self.batch_size = 0  # effective, in force
        self.micro_batch_size = 0
        self.accumulate_grad_batches = 1
        self.pending: _PendingChange | None = None
        self.changes: list[dict[str, Any]] = []
        self._lr_from = 1.0
        self._lr_to = 1.0
        self._lr_steps = 0  # optimizer steps since the last change (warm-up progress)
        self._consumed = 0  # batches of this epoch trained on
        self._world_size = 1
        self.data_cap = 0  # the largest effective batch one epoch of the training data can fill (set at fit start)
        self._cap_told = False
        self._handles: list[RemovableHandle] = []
        self._saved_lrs: list[list[float]] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._restored: dict[str, Any] | None = None
        self._timer: tuple[float, int] | None = None  # (time of the last reading, global step then)

    @property
    def factor(self) -> float:
        """The scheduler's factor: ``b_crit_factor``, else the monitor's."""
        if self.b_crit_factor is not None:
            return self.b_crit_factor
        return self.monitor.b_crit_factor if self.monitor is not None else 1.0

    # -- set-up ---------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the monitor to follow; refuse what growth cannot work with, before anything runs."""
        if stage != "fit":
            return
        if self.monitor is None:
            monitors = [c for c in trainer.callbacks if isinstance(c, EstimatesProvider)]  # type: ignore[attr-defined]
            if len(monitors) != 1:
                raise MisconfigurationException(
                    f"BatchSizeGrowth follows the estimates of one NoiseScaleMonitor, but the Trainer has "
                    f"{len(monitors)}. Add one (`Trainer(callbacks=[NoiseScaleMonitor(), BatchSizeGrowth()])`), or "
                    "pass the one to follow: `BatchSizeGrowth(monitor=...)`."
                )
            self.monitor = monitors[0]
        self.monitor.follow(self)
        if trainer.reload_dataloaders_every_n_epochs:  # type: ignore[attr-defined]  # set at run time
            raise MisconfigurationException(
                "grow_batch_size=True replaces the training dataloader with a resizable one, which "
                "`reload_dataloaders_every_n_epochs` would undo. Set it to 0."
            )
        if trainer.limit_train_batches not in (1.0, None):
            raise MisconfigurationException(
                f"grow_batch_size=True serves every example once per epoch, which `limit_train_batches="
                f"{trainer.limit_train_batches}` contradicts (it counts batches, whose size changes). Remove it, "
                "or bound the run with `max_steps`."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Settle the learning-rate rule against the optimizers (configured by now)."""
        self._optimizers = list(trainer.optimizers)
        self.rule = default_lr_scaling(self._optimizers) if self.lr_scaling == "auto" else self.lr_scaling

    def hparams(self) -> dict[str, Any]:
        """The learning-rate rule and the growth policy, written to the loggers with the monitor's hparams."""
        policy = self.scheduler.policy if self.scheduler is not None else self.policy
        return {tags.LR_SCALING_HPARAM: self.rule, tags.GROWTH_POLICY_HPARAM: policy}

    def tensorboard_charts(self, prefix: str) -> dict[str, list[Any]]:
        """The growth charts of the monitor's TensorBoard layout: the batch sizes, and the learning rate."""
        sizes = [f"{prefix}{name}" for name in (tags.BATCH_SIZE, tags.BATCH_SIZE_TARGET, tags.MICRO_BATCH_SIZE)]
        return {
            "batch-size growth: sizes": ["Multiline", sizes],
            "batch-size growth: learning rate": ["Multiline", [f"{prefix}{tags.LR}", f"{prefix}{tags.LR_SCALE}"]],
        }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the training dataloader resizable and put the (restored) batch size, accumulation and LR in force."""
        assert self.monitor is not None  # found at setup
        self._check_micro_batch_cap(trainer)
        source, horizon_examples = self.monitor.source, self.monitor.horizon_examples
        self._world_size = trainer.world_size
        self._optimizers = list(trainer.optimizers)
        self.sampler = _make_resizable(trainer)
        self.data_cap = _data_cap(self.sampler)
        try:
            if self._restored is not None:
                self._load(self._restored, trainer, horizon_examples)
                self._restored = None
            else:
                self.micro_batch_size = self.sampler.batch_size
                self.accumulate_grad_batches = trainer.accumulate_grad_batches
                self.initial_batch_size = self.batch_size = self._effective(self.micro_batch_size)
                self.scheduler = self._build_scheduler(horizon_examples)
            self._cap_scheduler()
        finally:
            # Lightning made its iterator before this hook; a fresh one starts where the (restored) sampler stands
            # (and an error above still leaves the loop a loader to tear down).
            restart_train_fetcher(trainer)
        trainer.accumulate_grad_batches = self.accumulate_grad_batches
        if source is not None:
            source.loss_divisor = self.accumulate_grad_batches  # type: ignore[attr-defined]
        self._sync_lengths(trainer)
        self._handles = [
            handle
            for optimizer in self._optimizers
            for handle in (
                optimizer.register_step_pre_hook(self._scale_lr),
                optimizer.register_step_post_hook(self._unscale_lr),
            )
        ]
        rank_zero_info(
            f"NoiseScaleMonitor: batch-size growth on: {self.batch_size} examples per step (micro-batch "
            f"{self.micro_batch_size} × accumulation {self.accumulate_grad_batches} × {self._world_size} ranks), "
            f"policy `{self.scheduler.policy if self.scheduler else self.policy}`, learning rate scaled `{self.rule}`."
        )

    def _check_micro_batch_cap(self, trainer: pl.Trainer) -> None:
        """A memory cap below the micro-batch the run starts with would be exceeded from the first batch."""
        cap = self.max_micro_batch_size
        start = getattr(trainer.train_dataloader, "batch_size", None)
        if cap is not None and isinstance(start, int) and start > cap:
            raise MisconfigurationException(
                f"`max_micro_batch_size={cap}` is below the training dataloader's batch_size={start}, the micro-batch "
                f"the run starts with: the first batches would already exceed the cap. Build the dataloader with "
                f"batch_size <= {cap} (and `Trainer(accumulate_grad_batches=...)` for the same batch per step), or "
                "raise the cap."
            )

    def _cap_scheduler(self) -> None:
        """Bound the scheduler (built or given) by what one epoch of the training data can fill.

        A step cannot hold more examples than the data set: a larger planned batch would train at the data set's
        size while the learning rate was scaled for the plan.
        """
        assert self.scheduler is not None
        cap = max(self.data_cap, self.initial_batch_size)  # a run that starts above it cannot grow, but may run
        if self.scheduler.max_batch_size is None or self.scheduler.max_batch_size > cap:
            self.scheduler.max_batch_size = cap
        if self.data_cap <= self.initial_batch_size:
            self._tell_cap()

    def _tell_cap(self) -> None:
        if not self._cap_told:
            self._cap_told = True
            assert self.sampler is not None
            rank_zero_info(
                f"NoiseScaleMonitor: the batch size stops at {self.data_cap} examples per step, what one epoch of the "
                f"training data ({self.sampler.dataset_size} examples over {self._world_size} ranks) can fill."
            )

    def _build_scheduler(self, horizon_examples: float | None) -> BatchSizeScheduler:
        if self.scheduler is not None:
            if self.scheduler.batch_size != self.batch_size:
                raise MisconfigurationException(
                    f"The BatchSizeScheduler starts at {self.scheduler.batch_size} examples per step, but the run "
                    f"trains at {self.batch_size} (micro-batch {self.micro_batch_size} × accumulation "
                    f"{self.accumulate_grad_batches} × {self._world_size} ranks). Make them agree."
                )
            return self.scheduler
        if self.max_batch_size is not None and self.max_batch_size < self.initial_batch_size:
            raise MisconfigurationException(
                f"`max_batch_size={self.max_batch_size}` is below the run's starting batch size "
                f"{self.initial_batch_size} (micro-batch × accumulation × ranks). Raise it, or start smaller."
            )
        bound = max(self.data_cap, self.initial_batch_size)
        if self.max_batch_size is not None:
            bound = min(bound, self.max_batch_size)
        multiple = 8 * self._world_size
        if bound < multiple:
            multiple = self._world_size
        if self.min_examples_between_changes is not None:
            wait = self.min_examples_between_changes
        else:  # half the moving average's horizon: most of what it remembers was measured after the last change
            horizon = horizon_examples or DEFAULT_HORIZON_STEPS * self.initial_batch_size
            wait = 0.5 * horizon
        return BatchSizeScheduler(
            self.initial_batch_size,
            policy=self.policy,
            factor=self.factor,
            max_batch_size=bound,
            multiple=multiple,
            min_examples_between_changes=wait,
        )

    def _effective(self, micro_batch_size: int, accumulate: int | None = None) -> int:
        return micro_batch_size * (accumulate or self.accumulate_grad_batches) * self._world_size

    # -- per step -------------------------------------------------------------------------------------------------

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning sets the epoch of samplers, not of batch samplers: do it for ours."""
        if self.sampler is not None and self.sampler.epoch != trainer.current_epoch:
            self.sampler.set_epoch(trainer.current_epoch)
            self._consumed = 0
            self._sync_lengths(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Put a pending change in force at its batch: a step boundary common to the old and new accumulation."""
        source = self.monitor.source if self.monitor is not None else None
        change = self.pending
        if change is None or (trainer.current_epoch, batch_idx) != (change.epoch, change.batch):
            return
        self.pending = None
        previous = self.batch_size
        self.batch_size = change.batch_size
        self.micro_batch_size = change.micro_batch_size
        self.accumulate_grad_batches = trainer.accumulate_grad_batches = change.accumulate_grad_batches
        if source is not None:
            source.loss_divisor = change.accumulate_grad_batches  # type: ignore[attr-defined]
        self._lr_from = self.current_lr_scale
        self._lr_to = lr_scale(self.rule, self.batch_size, self.initial_batch_size)
        self._lr_steps = 0
        self.changes.append(
            {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx, **asdict(change)}
        )
        self._timer = None
        rank_zero_info(
            f"NoiseScaleMonitor: batch size {previous} -> {self.batch_size} at step {trainer.global_step} (micro-batch "
            f"{self.micro_batch_size} × accumulation {self.accumulate_grad_batches} × {self._world_size} ranks; "
            f"learning rate × {self._lr_to:.4g}, rule `{self.rule}`): {change.reason}."
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the batches trained on (the position a checkpoint resumes from); place mid-epoch validation."""
        self._consumed = batch_idx + 1
        self._place_validation(trainer, batch_idx)

    def _place_validation(self, trainer: pl.Trainer, batch_idx: int) -> None:
        """Validate after each ``val_check_interval`` fraction of the epoch's *examples*, whatever the batch sizes.

        Lightning validates when ``(batch_idx + 1) % val_check_batch == 0``, with ``val_check_batch`` worked out
        once from the epoch's length in batches, which a change of batch size mid-epoch makes wrong (a validation
        falls on no batch, or on the wrong one). Set after each batch, just before Lightning's check: the batch
        itself when it completes a fraction of the epoch's examples, else a count that no batch index matches.
        """
        interval = trainer.val_check_interval
        if (
            self.sampler is None
            or not isinstance(interval, float)
            or validates_by_time(trainer)
            or trainer.check_val_every_n_epoch is None
        ):
            return
        total = self.sampler.examples_through(len(self.sampler) - 1)
        period = interval * total
        before = self.sampler.examples_through(batch_idx - 1) / period
        through = self.sampler.examples_through(batch_idx) / period
        completes = math.floor(through + 1e-9) > math.floor(before + 1e-9)
        trainer.val_check_batch = batch_idx + 1 if completes else batch_idx + 2

    def on_estimates_logged(self, trainer: pl.Trainer, estimates: Mapping[str, float]) -> None:
        """The monitor logged (every rank is here, as the decision's collective needs): decide."""
        self.decide(trainer, estimates)

    def decide(self, trainer: pl.Trainer, estimates: Mapping[str, float]) -> None:
        """At a logging step (every rank): ask the scheduler and plan its change on every rank alike."""
        assert self.sampler is not None
        assert self.scheduler is not None
        self._observe_step_time(trainer)
        change: BatchSizeChange | None = None
        if self.pending is None:
            change = self.scheduler.update(
                estimates[tags.B_SIMPLE],
                estimates[tags.B_SIMPLE_LOWER],
                estimates[tags.B_SIMPLE_UPPER],
                estimates[tags.EXAMPLES],
            )
        # One small collective at every logging step, decision or not: the ranks agree on whether and where to
        # change even if their floating-point estimates were to differ in the last bit.
        vote = torch.tensor([0 if change is None else change.batch_size, self.sampler.next_batch], dtype=torch.float64)
        if self._world_size > 1:
            vote = trainer.strategy.reduce(vote.to(trainer.strategy.root_device), reduce_op="max").cpu()
        requested, earliest = int(vote[0]), int(vote[1])
        if requested == 0 or self.pending is not None:
            return
        # Never above what one epoch of the data can fill (a given scheduler may ask for more than its bound).
        cap = max(self.data_cap, self.initial_batch_size)
        new_batch_size = min(requested, cap)
        if requested > cap or (change is not None and new_batch_size == cap and change.target > cap):
            self._tell_cap()
        if change is None:  # another rank decided: take its decision (keeps the schedulers in step)
            self.scheduler.accept(new_batch_size, estimates[tags.EXAMPLES])
        if new_batch_size == self.batch_size:  # the cap leaves nothing to change
            self.scheduler.batch_size = self.batch_size
            return
        micro, accumulate = split_batch_size(new_batch_size, self._world_size, self.max_micro_batch_size)
        # The change lands on a batch that starts an optimizer step under both accumulations, not drawn yet by
        # any rank's dataloader (workers prefetch).
        align = math.lcm(self.accumulate_grad_batches, accumulate)
        at = self.sampler.resize(micro, at_batch=math.ceil(earliest / align) * align)
        epoch, batch = trainer.current_epoch, at
        if at >= len(self.sampler):
            epoch, batch = epoch + 1, 0
        reason = change.reason if change is not None else "decided on another rank"
        self.pending = _PendingChange(
            epoch, batch, self._effective(micro, accumulate), micro, accumulate, reason=reason
        )
        self.scheduler.batch_size = self.pending.batch_size  # what the split can run: never above the request
        self._sync_lengths(trainer)

    def _observe_step_time(self, trainer: pl.Trainer) -> None:
        """Mean wall-clock time per step since the last logging step (``goodput`` policy), at a steady batch."""
        now, step = time.perf_counter(), trainer.global_step
        if self._timer is not None and self.scheduler is not None and step > self._timer[1]:
            self.scheduler.observe_step_time(self.batch_size, now - self._timer[0], step - self._timer[1])
        self._timer = (now, step)

    def _sync_lengths(self, trainer: pl.Trainer) -> None:
        """Tell Lightning's loops how many batches this epoch now has (it caches the dataloader's length)."""
        assert self.sampler is not None
        length = len(self.sampler)
        trainer.fit_loop.max_batches = length
        set_train_fetcher_length(trainer, length)
        # Validation "every fraction of an epoch" was turned into batches from the starting length (as Lightning's
        # `FitLoop.setup_data` does); an epoch-end validation would otherwise never come.
        interval = trainer.val_check_interval
        if isinstance(interval, float) and not validates_by_time(trainer):
            trainer.val_check_batch = max(1, int(length * interval))

    # -- the learning rate ------------------------------------------------------------------------------------------

    @property
    def current_lr_scale(self) -> float:
        """The multiplier applied to every learning rate in the optimizer step now (warm-up included)."""
        if self.lr_warmup_steps == 0 or self._lr_steps >= self.lr_warmup_steps:
            return self._lr_to
        progress = (self._lr_steps + 1) / (self.lr_warmup_steps + 1)
        return self._lr_from + (self._lr_to - self._lr_from) * progress

    def _scale_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        scale = self.current_lr_scale
        self._saved_lrs.append([group["lr"] for group in optimizer.param_groups])
        if scale != 1.0:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * scale

    def _unscale_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The exact values from before the step: LR schedulers see (and checkpoints keep) the unscaled rates.
        for group, lr in zip(optimizer.param_groups, self._saved_lrs.pop(), strict=True):
            group["lr"] = lr
        if optimizer is self._optimizers[0]:
            self._lr_steps += 1

    def logged(self) -> dict[str, float]:
        """The quantities logged with the estimates."""
        lr = math.nan
        if self._optimizers:
            lr = self._optimizers[0].param_groups[0]["lr"]
            # Lightning calls the monitor from within the optimizer step (the closure) unless AMP runs the closure
            # first: the rate is scaled already in the first case only.
            if not self._saved_lrs:
                lr *= self.current_lr_scale
        return {
            tags.LR: lr,
            tags.LR_SCALE: self.current_lr_scale,
            tags.ACCUMULATE_GRAD_BATCHES: float(self.accumulate_grad_batches),
            tags.MICRO_BATCH_SIZE: float(self.micro_batch_size),
            tags.BATCH_SIZE_TARGET: float(self.batch_size if self.pending is None else self.pending.batch_size),
            tags.BATCH_SIZE_CHANGES: float(len(self.changes)),
        }

    # -- end and checkpointing --------------------------------------------------------------------------------------

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: sizes, LR scale, position, pending change.

        Empty when the monitor built this callback (``grow_batch_size=True``): the monitor's checkpoint holds it
        (under ``"growth"``), as it always has, so checkpoints of either kind load.
        """
        if self._owned_by_monitor:
            return {}
        return self.growth_state()

    def growth_state(self) -> dict[str, Any]:
        """The state :meth:`state_dict` checkpoints (also when the monitor checkpoints it)."""
        return {
            "initial_batch_size": self.initial_batch_size,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "pending": None if self.pending is None else asdict(self.pending),
            "changes": list(self.changes),
            "lr": {"from": self._lr_from, "to": self._lr_to, "steps": self._lr_steps},
            "consumed": self._consumed,
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state until ``on_train_start`` builds the sampler it belongs to."""
        if state_dict:
            self._restored = state_dict

    def _load(self, state: dict[str, Any], trainer: pl.Trainer, horizon_examples: float | None) -> None:
        assert self.sampler is not None
        self.initial_batch_size = int(state["initial_batch_size"])
        self.batch_size = int(state["batch_size"])
        self.micro_batch_size = int(state["micro_batch_size"])
        self.accumulate_grad_batches = int(state["accumulate_grad_batches"])
        self.pending = None if state["pending"] is None else _PendingChange(**state["pending"])
        self.changes = list(state["changes"])
        self._lr_from, self._lr_to, self._lr_steps = state["lr"]["from"], state["lr"]["to"], state["lr"]["steps"]
        if not self._scheduler_given:
            self.scheduler = self._build_scheduler(horizon_examples)
        assert self.scheduler is not None
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["sampler"] is not None:
            self.sampler.load_state_dict(state["sampler"])
        if self.sampler.epoch == trainer.current_epoch:
            self._consumed = int(state["consumed"])
            self.sampler.start_at(self._consumed)
        else:  # the checkpoint closed an epoch: the next one starts from its first batch
            self.sampler.set_epoch(trainer.current_epoch)
            self._consumed = 0


_RESIZABLE_HELP = (
    "Build it as `DataLoader(dataset, batch_size=..., shuffle=...)` over a map-style data set (one with `__len__` "
    "and `__getitem__`), or pass `batch_sampler=lightning_gns.ResizableBatchSampler(len(dataset), ...)`."
)


def _make_resizable(trainer: pl.Trainer) -> ResizableBatchSampler:
    """Swap the fit loop's training dataloader for an equivalent one with a :class:`ResizableBatchSampler`."""
    loaders = train_dataloaders(trainer)
    if len(loaders) != 1:
        raise MisconfigurationException(
            f"grow_batch_size=True needs exactly one training dataloader, but the run has {len(loaders)}. Combine "
            "your data into one data set."
        )
    loader = loaders[0]
    if type(loader) is not DataLoader:
        raise MisconfigurationException(
            f"grow_batch_size=True cannot resize a {type(loader).__name__}: it needs a torch DataLoader. "
            + _RESIZABLE_HELP
        )
    dataset = loader.dataset
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        size = -1
    if size < 0 or isinstance(dataset, torch.utils.data.IterableDataset):
        raise MisconfigurationException(
            "grow_batch_size=True cannot resize a dataloader over an IterableDataset or a data set without a length: "
            "the batches are drawn by index. " + _RESIZABLE_HELP
        )
    shuffle, seed, batch_size, drop_last = _sampling_of(loader, size)
    rank = trainer.global_rank if trainer.world_size > 1 else 0
    sampler = ResizableBatchSampler(
        size, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, num_replicas=trainer.world_size, rank=rank
    )
    keep = (
        "num_workers",
        "collate_fn",
        "pin_memory",
        "timeout",
        "worker_init_fn",
        "multiprocessing_context",
        "generator",
        "persistent_workers",
        "pin_memory_device",
        "in_order",
    )
    kwargs = {name: getattr(loader, name) for name in keep if hasattr(loader, name)}
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    resizable = DataLoader(dataset, batch_sampler=sampler, **kwargs)
    # The iterator Lightning made before this hook (workers included) is shut down and replaced.
    replace_train_dataloaders(trainer, [resizable])
    return sampler


def _data_cap(sampler: ResizableBatchSampler) -> int:
    """The largest effective batch one epoch can fill: the data set (all ranks), a multiple of the world size.

    With ``drop_last`` that is the largest full batch; without it too (the last batch takes what is left, but the
    effective batch size is micro-batch × accumulation × ranks).
    """
    return sampler.dataset_size // sampler.num_replicas * sampler.num_replicas


def _sampling_of(loader: DataLoader, size: int) -> tuple[bool, int, int, bool]:
    """(shuffle, seed, batch size, drop_last) of a dataloader we know how to re-create."""
    global_seed = int(os.getenv("PL_GLOBAL_SEED", 0))  # what Lightning seeds its DistributedSampler with
    batch_sampler = loader.batch_sampler
    if isinstance(batch_sampler, ResizableBatchSampler):
        return batch_sampler.shuffle, batch_sampler.seed, batch_sampler.batch_size, batch_sampler.drop_last
    if type(batch_sampler) is not BatchSampler or batch_sampler.batch_size is None:
        raise MisconfigurationException(
            f"grow_batch_size=True cannot resize a dataloader whose batch sampler is "
            f"{type(batch_sampler).__name__}. " + _RESIZABLE_HELP
        )
    inner = batch_sampler.sampler
    if type(inner) is SequentialSampler:
        shuffle, seed = False, global_seed
    elif type(inner) is RandomSampler and not inner.replacement and inner.num_samples == size:
        shuffle, seed = True, global_seed
    elif type(inner) is DistributedSampler:
        shuffle, seed = inner.shuffle, inner.seed
    else:
        raise MisconfigurationException(
            f"grow_batch_size=True cannot resize a dataloader sampling with {type(inner).__name__} (only sequential "
            "or shuffled epochs without replacement can be served exactly once at a changing batch size). "
            + _RESIZABLE_HELP
        )
    return shuffle, seed, batch_sampler.batch_size, batch_sampler.drop_last


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_growth_options(
    grow: bool,
    policy: str,
    max_batch_size: int | None,
    max_micro_batch_size: int | None,
    min_examples_between_changes: float | None,
) -> None:
    """The batch-size growth options, checked when the callback (or the monitor) is built, not at fit start."""
    if policy not in _GROWTH_POLICIES:
        raise MisconfigurationException(
            f"Expected `growth_policy` to be one of {_GROWTH_POLICIES}, but got {policy!r}."
        )
    for name, value in (("max_batch_size", max_batch_size), ("max_micro_batch_size", max_micro_batch_size)):
        if value is not None and not (_is_int(value) and value >= 1):
            raise MisconfigurationException(f"Expected `{name}` to be an int >= 1 or None, but got {value!r}.")
    wait = min_examples_between_changes
    if wait is not None and not (_is_number(wait) and 0 <= wait < math.inf):
        raise MisconfigurationException(
            f"Expected `min_examples_between_changes` to be a finite number >= 0 or None (half the smoothing "
            f"horizon), but got {wait!r}."
        )
    if not grow and (max_micro_batch_size is not None or wait is not None or policy != "b_crit"):
        raise MisconfigurationException(
            "`growth_policy`, `max_micro_batch_size` and `min_examples_between_changes` act only with "
            "`grow_batch_size=True`: turn it on, or drop them."
        )
