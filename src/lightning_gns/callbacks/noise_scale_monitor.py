r"""``NoiseScaleMonitor``: the gradient noise scale of a Lightning run, logged while it trains."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_gns import tags
from lightning_gns._compat.amp import grad_scaler_scale
from lightning_gns._compat.dynamo import compiled_parts
from lightning_gns._compat.lightning import batches_that_stepped, ddp_comm_state, replace_ddp_comm_hook
from lightning_gns.callbacks.batch_size_growth import BatchSizeGrowth, LRScaling, check_growth_options
from lightning_gns.callbacks.estimates import EstimatesFollower
from lightning_gns.functional.noise_scale import _check_confidence
from lightning_gns.functional.smoothing import NoiseScaleEMA, ema_compute, ema_init, ema_update
from lightning_gns.metric import GradientNoiseScale
from lightning_gns.scheduler import BatchSizeScheduler, GrowthPolicy
from lightning_gns.sources.accumulation import AccumulationSource
from lightning_gns.sources.base import GradientSource, StepNorms, average_over_ranks
from lightning_gns.sources.ddp import DDPSource
from lightning_gns.sources.loss_reduction import LossReduction, infer_loss_reduction
from lightning_gns.sources.per_example import PerExampleSource
from lightning_gns.sources.per_example_norms import compiled_model_refusal
from lightning_gns.sources.preconditioning import AdamPreconditioner, is_adam_family

SourceName = Literal["auto", "ddp", "accumulation", "per_example"]
_SOURCES = ("auto", "ddp", "accumulation", "per_example")
_LOSS_REDUCTIONS = ("auto", "mean", "sum")


# The hparams the monitor writes to every logger, read back by `lightning-gns report` (names in `tags`).
SOURCE_HPARAM = tags.SOURCE_HPARAM
LR_SCALING_HPARAM = tags.LR_SCALING_HPARAM

# Consecutive skipped steps (a whole logging period of them) after which the frozen estimates are warned about:
# an AMP overflow now and then is routine and stays quiet.
FROZEN_AFTER_STEPS = 10


class NoiseScaleMonitor(Callback):
    r"""Measure and log the gradient noise scale :math:`B_{simple} = \operatorname{tr}(\Sigma)/|G|^2` while training.

    Add it to a ``Trainer`` and every optimizer step feeds one pair of squared gradient norms, taken at a small
    and a big batch size, into a bias-corrected moving average (horizon in examples) and into a
    :class:`~lightning_gns.GradientNoiseScale` metric over the whole run. The norms come from a *source*:

    ================  ============================  ===============================  ==========================
    source            B_small                       B_big                            needs
    ================  ============================  ===============================  ==========================
    ``ddp``           per-rank batch × accumulation  world size × that                 ≥ 2 DDP processes
    ``accumulation``  micro-batch                   micro-batch × accumulation × world  accumulate_grad_batches ≥ 2
    ``per_example``   1                             the batch (× accumulation × world)  any run
    ================  ============================  ===============================  ==========================

    ``"auto"`` picks ``accumulation`` whenever ``accumulate_grad_batches >= 2`` (under DDP too: of the three
    levels, micro-batch, rank and global, the micro-batches of all ranks against the all-reduced gradient are the
    most precise pair, as precise as the best linear combination of all three), else ``ddp`` with 2+ processes,
    else ``per_example``; it says which in the log.
    Norms are read before gradient clipping, after AMP's loss scale is taken out; steps whose gradients are not
    finite, and steps without a backward pass (every ``training_step`` of the step returned ``None``), are
    skipped and counted. When a whole logging period of at least 10 steps was skipped (a NaN loss that poisoned
    the weights) it warns once, until the run recovers, that the logged estimates are frozen. tr Σ and |G|² are
    those of the gradient of the *mean* loss over examples, whether the training loss is a mean or a sum
    (``loss_reduction``).

    Logged every ``log_every_n_steps`` (the Trainer's by default), under ``log_key_prefix`` (default ``gns/``):

    ========================  ===================================================================
    key                       value
    ========================  ===================================================================
    ``b_simple``              smoothed tr Σ / smoothed |G|²; NaN while undefined (|G|² ≤ 0)
    ``b_simple_lower/upper``  its ``confidence`` interval (Fieller); upper is inf while |G|² is unresolved
    ``b_simple_std``          delta-method standard error
    ``trace_sigma``           smoothed estimate of tr Σ
    ``grad_sq_norm``          smoothed estimate of |G|²
    ``b_crit``                suggested batch size: ``b_crit_factor`` × B_simple (B_simple has been found
                              0.2–5× a sweep's critical batch size; see docs/batch_size_benchmark.md)
    ``batch_size``            the step's big batch (examples per optimizer step, all ranks)
    ``examples``              examples seen by the optimizer steps so far (all ranks)
    ``num_skipped``           steps left out so far: gradients not finite, or nothing to measure
    ``steps_since_estimate``  optimizer steps since the last one that carried an estimate (0 when the
                              latest did): how stale the values above are
    ``horizon_examples``      the moving average's horizon in examples
    ``preconditioned``        1 when the values above are those of the preconditioned noise scale, else 0
    ========================  ===================================================================

    With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` it also writes a custom-scalars layout showing
    B_simple inside its band, and |G|² with tr Σ.

    Args:
        source: where the two gradient norms come from; see the table.
        horizon_examples: time constant of the moving average, in examples. ``None``: 100 steps' worth at the
            first step's batch size (kept fixed afterwards, so a growing batch keeps the same history).
        confidence: coverage of the logged interval.
        log_every_n_steps: logging period in optimizer steps; ``None`` uses the Trainer's.
        log_key_prefix: prefix of every logged key.
        prog_bar: also show B_simple in the progress bar.
        b_crit_factor: ``b_crit`` = this × B_simple.
        per_example_include: with the ``per_example`` source, measure only these module types (for example
            ``(nn.LayerNorm,)``, the cheapest signal that tracks the whole model); ``None`` measures all.
        per_example_fuse_weight_grads: with the ``per_example`` source, the weight and bias gradients of a
            convolution (and of a Linear on long sequences) are the sums of the per-example gradients its rule
            builds anyway, handed to autograd instead of being computed a second time (about half the source's
            cost on a CNN, a quarter on a small transformer; same ``.grad`` to float rounding). ``False`` leaves
            every gradient to autograd, for code that reads a layer's ``requires_grad`` inside its forward.
        finite_population: the batches of an epoch are drawn without replacement from the training set's
            :math:`N` examples, which biases the :math:`|G|^2` estimate by :math:`-\operatorname{tr}(S^2)/N`; with
            this on (and a training set with a length) the bias is taken out, so that the logged :math:`|G|^2` and
            B_simple are those of the full data. It matters once B_simple is not small against :math:`N`.
        per_layer: also measure each layer on its own (``per_example`` source) and log
            ``{prefix}layer/<qualified name>/b_simple``; :attr:`layer_metric` holds the run averages.
        grow_batch_size: grow the batch size as the noise scale grows (``docs/batch_size.md``): a shortcut that
            builds a :class:`~lightning_gns.BatchSizeGrowth` callback from the ``growth:`` options below and adds
            it to the Trainer's callbacks (``monitor.growth``); the same callback can be added by hand. The training
            dataloader is made resizable; at logging steps a :class:`~lightning_gns.BatchSizeScheduler` decides the
            effective batch size (micro-batch × accumulation × world size), which changes at the next
            optimizer-step boundary, mid-epoch included, with every example of an epoch served once. Also logs
            ``lr``, ``lr_scale``, ``accumulate_grad_batches``, ``micro_batch_size``, ``batch_size_target`` and
            ``batch_size_changes``.
        max_batch_size: growth: the largest effective batch size (``None``: no bound).
        max_micro_batch_size: growth: the most examples one forward/backward pass may hold (the memory cap); beyond
            it accumulation grows. ``None``: no cap (set one on an accelerator, e.g. from Lightning's
            ``BatchSizeFinder``).
        growth_policy: growth: ``"b_crit"`` (target ``b_crit_factor`` × B_simple), ``"sqrt"`` or ``"goodput"``
            (see :class:`~lightning_gns.BatchSizeScheduler`).
        lr_scaling: growth: how the learning rate follows the batch size: ``"linear"`` (SGD), ``"sqrt"`` (Adam
            family), ``"none"``, or ``"auto"`` (by optimizer type). It scales what the optimizer's LR schedulers
            set, inside the optimizer step.
        lr_warmup_steps: growth: reach a new learning-rate scale linearly over this many optimizer steps.
        min_examples_between_changes: growth: examples to train on between two changes (``None``: half the
            smoothing horizon).
        batch_size_scheduler: growth: a fully configured scheduler (overrides ``growth_policy``,
            ``max_batch_size`` and ``min_examples_between_changes``); its ``initial_batch_size`` must be the
            run's.
        preconditioned: measure the noise scale of the gradient as an Adam-family optimizer uses it, divided
            elementwise by :math:`\sqrt{\hat v}+\epsilon` (the optimizer's second moment before the step), which
            is the one that tracks the critical batch size under Adam (AdaptDL/Pollux). ``"auto"``: for Adam,
            AdamW, NAdam and the like, plain B_simple for other optimizers. The optimizer has no second moment
            before its first step, so with preconditioning that step is not measured (the logged statistics
            never mix the two kinds). ``True`` with an optimizer that has no ``exp_avg_sq`` raises.
        loss_reduction: how the loss that ``training_step`` returns reduces over the micro-batch's examples:
            ``"mean"`` (the default of every torch loss) or ``"sum"``; the logged tr Σ and |G|² are in the mean
            convention either way. ``"auto"`` reads it off the loss's autograd graph at the first backward pass
            (``.sum()``, ``.mean()``, a torch loss's ``reduction``, under constant factors) and assumes a mean,
            saying so, when it cannot tell; a declared value that the graph contradicts is kept, with a warning.

    Raises:
        MisconfigurationException: for an unknown source or invalid option, at ``setup`` when the run cannot
            support the chosen source, at ``on_fit_start`` for ``preconditioned=True`` without an Adam-family
            optimizer, and at the first optimizer step of a fit when it can carry no estimate (one example per
            step under ``per_example``) (the message says what to change).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_gns import NoiseScaleMonitor
        >>> trainer = Trainer(callbacks=[NoiseScaleMonitor()], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        source: SourceName = "auto",
        horizon_examples: float | None = None,
        confidence: float = 0.9,
        log_every_n_steps: int | None = None,
        log_key_prefix: str = tags.DEFAULT_PREFIX,
        prog_bar: bool = False,
        b_crit_factor: float = 1.0,
        per_example_include: tuple[type[torch.nn.Module], ...] | None = None,
        per_example_fuse_weight_grads: bool = True,
        finite_population: bool = True,
        per_layer: bool = False,
        grow_batch_size: bool = False,
        max_batch_size: int | None = None,
        max_micro_batch_size: int | None = None,
        growth_policy: GrowthPolicy = "b_crit",
        lr_scaling: LRScaling = "auto",
        lr_warmup_steps: int = 0,
        min_examples_between_changes: float | None = None,
        batch_size_scheduler: BatchSizeScheduler | None = None,
        preconditioned: bool | Literal["auto"] = "auto",
        loss_reduction: LossReduction | Literal["auto"] = "auto",
    ) -> None:
        if source not in _SOURCES:
            raise MisconfigurationException(f"Expected `source` to be one of {_SOURCES}, but got {source!r}.")
        if loss_reduction not in _LOSS_REDUCTIONS:
            raise MisconfigurationException(
                f"Expected `loss_reduction` to be one of {_LOSS_REDUCTIONS} (how the training loss reduces over a "
                f"micro-batch's examples), but got {loss_reduction!r}."
            )
        if horizon_examples is not None and not (_is_number(horizon_examples) and 0 < horizon_examples < math.inf):
            raise MisconfigurationException(
                f"Expected `horizon_examples` to be a finite number > 0 (examples of history), or None for 100 steps' "
                f"worth; got {horizon_examples!r}."
            )
        if log_every_n_steps is not None and not (_is_int(log_every_n_steps) and log_every_n_steps >= 1):
            raise MisconfigurationException(
                f"Expected `log_every_n_steps` to be an int >= 1 (optimizer steps), or None for the Trainer's; got "
                f"{log_every_n_steps!r}."
            )
        if not (_is_number(b_crit_factor) and 0 < b_crit_factor < math.inf):
            raise MisconfigurationException(
                f"Expected `b_crit_factor` to be a finite number > 0, got {b_crit_factor!r}."
            )
        check_growth_options(
            grow_batch_size, growth_policy, max_batch_size, max_micro_batch_size, min_examples_between_changes
        )
        if preconditioned not in (True, False, "auto"):
            raise MisconfigurationException(
                f"Expected `preconditioned` to be True, False or 'auto', but got {preconditioned!r}."
            )
        try:
            _check_confidence(confidence)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self.source_name: SourceName = source
        self.horizon_examples = horizon_examples
        self.confidence = confidence
        self.log_every_n_steps = log_every_n_steps
        self.log_key_prefix = log_key_prefix
        self.prog_bar = prog_bar
        self.b_crit_factor = b_crit_factor
        self.per_example_include = per_example_include
        self.per_example_fuse_weight_grads = per_example_fuse_weight_grads
        self.finite_population = finite_population
        self.per_layer = per_layer
        self.grow_batch_size = grow_batch_size
        # Callbacks that act on the estimates (batch-size growth): asked for their logged values at logging steps.
        self._followers: list[EstimatesFollower] = []
        self.growth: BatchSizeGrowth | None = None
        # The growth this monitor built (`grow_batch_size=True`): it joins the Trainer's callbacks at setup, and
        # its state is checkpointed inside the monitor's, as before it was a callback of its own.
        self._owned_growth: BatchSizeGrowth | None = None
        if grow_batch_size:
            self._owned_growth = self.growth = BatchSizeGrowth(
                max_batch_size=max_batch_size,
                max_micro_batch_size=max_micro_batch_size,
                growth_policy=growth_policy,
                lr_scaling=lr_scaling,
                lr_warmup_steps=lr_warmup_steps,
                min_examples_between_changes=min_examples_between_changes,
                batch_size_scheduler=batch_size_scheduler,
                b_crit_factor=b_crit_factor,
                monitor=self,
            )
            self._owned_growth._owned_by_monitor = True
        elif batch_size_scheduler is not None or max_batch_size is not None:
            raise MisconfigurationException(
                "`batch_size_scheduler` and `max_batch_size` act only with `grow_batch_size=True`: turn it on, or "
                "drop them."
            )
        self.preconditioned = preconditioned
        self.loss_reduction = loss_reduction
        # Checked against the loss's graph at the first backward pass of each fit.
        self._loss_reduction_checked = False
        # Set at fit start when the preconditioned noise scale is measured; None: plain B_simple.
        self._preconditioner: AdamPreconditioner | None = None
        self._restored_preconditioned: bool | None = None
        self.layer_metric: GradientNoiseScale | None = None
        self._layer_ema: NoiseScaleEMA | None = None
        self._pending_layers: list[StepNorms] = []
        self.population_size: int | None = None

        self.metric = GradientNoiseScale(confidence=confidence, sync_on_compute=False)
        self._source: GradientSource | None = None
        self._ema: NoiseScaleEMA | None = None
        self._num_skipped = torch.zeros(())
        self._examples_seen = torch.zeros((), dtype=torch.float64)
        # Steps since the last one with an estimate, on the device (read at logging steps only), and what the
        # last logging step read of it, with the steps folded since: enough to tell a recovery from a long run.
        self._steps_since_estimate = torch.zeros(())
        self._since_at_log = 0.0
        self._folded_since_log = 0
        self._warned_frozen = False
        # The first measured step of a fresh fit is checked for an estimate at all (a resumed one may start on an
        # epoch's short last batch, which is skipped like any).
        self._first_step_checked = False
        self._last_batch_big: Tensor | None = None
        self._batch_examples = 0
        self._num_train_loaders = 1
        self._comm_hook: Callable[..., Any] | None = None
        self._pending: list[StepNorms] = []
        self._world_size = 1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(source=self.source_name, log_key_prefix=self.log_key_prefix)

    @property
    def source(self) -> GradientSource | None:
        """The gradient source in use (resolved at ``setup``)."""
        return self._source

    def follow(self, follower: EstimatesFollower) -> None:
        """Have ``follower`` log with the monitor and see its estimates at every logging step (once per follower).

        A :class:`~lightning_gns.BatchSizeGrowth` registers itself at ``setup``; ``monitor.growth`` is then it.
        """
        if not any(f is follower for f in self._followers):
            self._followers.append(follower)
        if isinstance(follower, BatchSizeGrowth):
            self.growth = follower

    @property
    def is_preconditioned(self) -> bool:
        """Whether the measured (and logged) noise scale is the preconditioned one; resolved at fit start."""
        return self._preconditioner is not None

    @property
    def estimates(self) -> Mapping[str, Tensor]:
        """The latest smoothed estimates (the logged quantities, as tensors), read-only; empty before a step."""
        if self._ema is None:
            return MappingProxyType({})
        out = ema_compute(self._ema, self.confidence)
        out["b_crit"] = out["b_simple"] * self.b_crit_factor
        if self._last_batch_big is not None:
            out["batch_size"] = self._last_batch_big
        out["examples"] = self._examples_seen
        return MappingProxyType(out)

    # -- wiring ---------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Fresh state tensors: `ddp_spawn` pickles the callback into shared memory, where in-place updates of one
        # rank would be seen by all.
        self.metric.reset()
        self._first_step_checked = False
        self._warned_frozen = False
        self._loss_reduction_checked = False
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "NoiseScaleMonitor supports automatic optimization only: with manual optimization the steps and "
                "backward passes of each optimizer are yours to define. Set `self.automatic_optimization = True`, "
                "or feed `lightning_gns.GradientNoiseScale` yourself."
            )
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy | SingleDeviceStrategy):
            raise MisconfigurationException(
                f"NoiseScaleMonitor supports single-device and DDP strategies, not {type(strategy).__name__}: "
                "sharded gradients would give a partial norm. Use `strategy='ddp'`."
            )
        world = self._world_size = trainer.world_size
        accumulate = trainer.accumulate_grad_batches
        growth = self._owned_growth
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        if growth is not None and not any(c is growth for c in callbacks):
            # Right after the monitor: Lightning calls its setup in this same round of hooks.
            callbacks.insert(next(i for i, c in enumerate(callbacks) if c is self) + 1, growth)
        name = self._resolve_source(world, accumulate)
        if self.source_name == "auto":
            rank_zero_info(
                f"NoiseScaleMonitor: using the `{name}` gradient source (world size {world}, "
                f"accumulate_grad_batches {accumulate})."
            )
        if self.per_layer and name != "per_example":
            raise MisconfigurationException(
                f"`per_layer=True` needs the per_example source (per-layer norms of every example), but the run "
                f"uses `{name}`. Pass `source='per_example'`, or drop `per_layer`."
            )
        if name == "per_example":
            _refuse_compiled(pl_module, chosen=self.source_name == "auto")
        self._source = self._build_source(name, trainer, world, accumulate)
        if not self._source.attaches_at_train_start:
            self._source.attach(pl_module)
        if self.per_layer and self._source.layer_names:
            self.layer_metric = GradientNoiseScale(
                group_shape=(len(self._source.layer_names),), confidence=self.confidence, sync_on_compute=False
            )

    def _resolve_source(self, world: int, accumulate: int) -> str:
        if self.source_name == "ddp" and world < 2:
            raise MisconfigurationException(
                f"source='ddp' needs at least 2 processes, but this run has world size {world}. Train with "
                "`strategy='ddp', devices=2` (or more), or pick source='accumulation' (with "
                "accumulate_grad_batches >= 2) or source='per_example'."
            )
        if self.source_name == "accumulation" and accumulate < 2:
            raise MisconfigurationException(
                f"source='accumulation' needs `Trainer(accumulate_grad_batches=...)` >= 2, but it is {accumulate}. "
                "Raise it, or pick source='per_example' (any run) or source='ddp' (2+ processes)."
            )
        if self.source_name != "auto":
            return self.source_name
        # Accumulation first, also under DDP: its tr(Σ) estimate is 1.5-4× tighter than the ddp source's
        # (tests/test_three_levels.py), at the same ≤ 3% cost.
        if accumulate >= 2:
            return "accumulation"
        if world >= 2:
            return "ddp"
        return "per_example"

    def _build_source(self, name: str, trainer: pl.Trainer, world: int, accumulate: int) -> GradientSource:
        # "auto" is settled at the first backward pass, before the source uses it.
        reduction: LossReduction = "sum" if self.loss_reduction == "sum" else "mean"
        if name == "accumulation":
            return AccumulationSource(loss_divisor=accumulate, world_size=world, loss_reduction=reduction)
        if name == "per_example":
            return PerExampleSource(
                loss_divisor=accumulate,
                world_size=world,
                include=self.per_example_include,
                per_layer=self.per_layer,
                fuse_weight_grads=self.per_example_fuse_weight_grads,
                loss_reduction=reduction,
            )
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            raise MisconfigurationException("source='ddp' needs a DDP strategy: `Trainer(strategy='ddp', ...)`.")
        # Lightning registers the strategy's comm hook itself on CUDA only; compose with what the user set there.
        source = DDPSource(world_size=world, loss_divisor=accumulate, loss_reduction=reduction)
        source.inner_hook = replace_ddp_comm_hook(strategy, source.comm_hook)
        # Off CUDA the monitor registers the hook itself once DDP has wrapped the model (at train start).
        self._comm_hook = source.comm_hook if strategy.root_device.type != "cuda" else None
        return source

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._setup_preconditioner(trainer)

    def _setup_preconditioner(self, trainer: pl.Trainer) -> None:
        """Resolve ``preconditioned`` against the optimizer (configured by now) and hand it to the source."""
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None
        adam = optimizer is not None and is_adam_family(optimizer)
        if self.preconditioned is True and not adam:
            name = "no optimizer" if optimizer is None else type(optimizer).__name__
            raise MisconfigurationException(
                f"`preconditioned=True` divides the gradients by the optimizer's √v̂ + ε (its `exp_avg_sq`), which "
                f"{name} does not have. Use an Adam-family optimizer (Adam, AdamW, NAdam), or pass "
                "`preconditioned=False` (or 'auto', which measures the plain noise scale for such optimizers)."
            )
        wanted = self.preconditioned is True or (self.preconditioned == "auto" and adam)
        self._preconditioner = AdamPreconditioner(optimizer) if wanted and optimizer is not None else None
        if self._source is not None:
            self._source.preconditioner = self._preconditioner
        if self._restored_preconditioned is not None and self._restored_preconditioned != wanted:
            rank_zero_warn(
                "NoiseScaleMonitor: the checkpoint's statistics are of the "
                f"{'preconditioned' if self._restored_preconditioned else 'plain'} noise scale and this run measures "
                f"the {'preconditioned' if wanted else 'plain'} one: the smoothed statistics start afresh.",
                category=RuntimeWarning,
            )
            self._ema, self._layer_ema = None, None
            self.metric.reset()
            if self.layer_metric is not None:
                self.layer_metric.reset()
        if wanted:
            rank_zero_info(
                f"NoiseScaleMonitor: measuring the preconditioned noise scale (gradients divided by "
                f"{type(optimizer).__name__}'s √v̂ + ε before the norms); `{self.log_key_prefix}preconditioned` = 1. "
                "Steps before the optimizer holds a second moment (its first) are not measured."
            )
        elif self.preconditioned == "auto" and optimizer is not None:
            rank_zero_info(
                f"NoiseScaleMonitor: {type(optimizer).__name__} is not Adam-family: measuring the plain noise scale."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._source is not None and self._source.attaches_at_train_start:
            self._source.attach(pl_module)
        strategy = trainer.strategy
        if self._comm_hook is not None and isinstance(strategy, DDPStrategy):
            ddp_model = strategy.model
            assert isinstance(ddp_model, DistributedDataParallel)  # DDPStrategy.setup wrapped it
            ddp_model.register_comm_hook(ddp_comm_state(strategy), self._comm_hook)
        self._num_train_loaders = len(_leaves(trainer.train_dataloader))
        if self.finite_population:
            self.population_size = _training_set_size(trainer)
        if not trainer.loggers:
            rank_zero_warn(
                "NoiseScaleMonitor has no logger to write to; the estimates are still available in "
                "`monitor.estimates`. Pass a logger to the Trainer to see the curves.",
                category=RuntimeWarning,
            )
        # What the numbers mean, for whoever reads the logs later (`lightning-gns report` does).
        described: dict[str, Any] = {SOURCE_HPARAM: self._source.name if self._source is not None else "none"}
        for follower in self._followers:
            described.update(follower.hparams())
        for logger in trainer.loggers:
            logger.log_hyperparams(described)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(self._tensorboard_layout())
                if trainer.is_global_zero and os.path.isdir(logger.log_dir):
                    # TensorBoardLogger writes hparams.yaml once, before this hook: bring it up to date.
                    hparams_file = os.path.join(logger.log_dir, TensorBoardLogger.NAME_HPARAMS_FILE)
                    save_hparams_to_yaml(hparams_file, logger.hparams)

    def _tensorboard_layout(self) -> dict[str, dict[str, list[Any]]]:
        def keys(*names: str) -> list[str]:
            return [f"{self.log_key_prefix}{name}" for name in names]

        charts: dict[str, list[Any]] = {
            "B_simple (with its band)": ["Margin", keys(tags.B_SIMPLE, tags.B_SIMPLE_LOWER, tags.B_SIMPLE_UPPER)],
            "B_crit suggestion and batch size": ["Multiline", keys(tags.B_CRIT, tags.BATCH_SIZE)],
            "|G|² and tr(Σ)": ["Multiline", keys(tags.GRAD_SQ_NORM, tags.TRACE_SIGMA)],
        }
        for follower in self._followers:
            charts.update(follower.tensorboard_charts(self.log_key_prefix))
        return {"gradient noise scale": charts}

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer.world_size)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._source is not None:
            self._source.detach()

    # -- per step -------------------------------------------------------------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_examples = _examples_in(batch, trainer.train_dataloader)
        if self._source is not None:
            self._source.batch_start(self._batch_examples)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._loss_reduction_checked or self._source is None:
            return
        self._loss_reduction_checked = True
        self._source.loss_reduction = self._check_loss_reduction(trainer, loss)

    def _check_loss_reduction(self, trainer: pl.Trainer, loss: Tensor) -> LossReduction:
        """The loss reduction the source is to undo: the declared one, else the one the loss's graph shows."""
        scale = _loss_scale(trainer)
        # Once per fit: reading the constants of the graph (and the AMP scale) may sync with the device.
        detected, found = infer_loss_reduction(
            loss,
            loss_divisor=trainer.accumulate_grad_batches,
            num_examples=self._batch_examples or None,
            loss_scale=1.0 if scale is None else float(scale),
        )
        if self.loss_reduction != "auto":
            if detected is not None and detected != self.loss_reduction:
                rank_zero_warn(
                    f"NoiseScaleMonitor: `loss_reduction={self.loss_reduction!r}` is declared, but the loss's "
                    f"autograd graph ends in a {detected} over the examples ({found.node}). The declared value is "
                    f"used: if the loss is a {detected}, tr Σ and |G|² are off by the batch size squared. Pass "
                    f"`loss_reduction={detected!r}` (or 'auto').",
                    category=RuntimeWarning,
                )
            return self.loss_reduction
        if detected is None:
            rank_zero_info(
                f"NoiseScaleMonitor: could not tell from the loss's autograd graph (it ends in {found.node}) whether "
                "the training loss is a mean or a sum over the examples; assuming a mean. Pass "
                "`NoiseScaleMonitor(loss_reduction='sum')` if it is a sum, or 'mean' to say so."
            )
            return "mean"
        if detected == "sum":
            rank_zero_info(
                "NoiseScaleMonitor: the training loss is a sum over the examples (read off its graph); tr Σ and |G|² "
                "are reported for the mean loss."
            )
        return detected

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._source is None:
            return
        if self._num_train_loaders > 1:
            self._check_examples_measured(self._source, trainer.global_step)
        self._source.micro_batch_done(self._batch_examples)

    def _check_examples_measured(self, source: GradientSource, step: int) -> None:
        """With several training dataloaders, the per-example hooks must have seen every example of the batch.

        A ``training_step`` that calls the model once per loader hands each layer two batches of the same size in
        one backward pass; the hooks add example i of one loader to example i of the other (they cannot tell them
        from a layer called twice on the same examples), which would make the norms wrong.
        """
        seen = source.pending_examples()
        if seen is None or seen in (0, self._batch_examples):
            return
        raise MisconfigurationException(
            f"NoiseScaleMonitor: the run has {self._num_train_loaders} training dataloaders, and the per-example "
            f"hooks saw {seen} examples of {self._batch_examples} in the batch at step {step}: the model was called "
            "once per loader, and per-example norms would pair example i of one loader with example i of another. "
            "In `training_step`, concatenate the loaders' batches into one forward pass, or use a source that does "
            "not need per-example gradients: `Trainer(accumulate_grad_batches=2)` or more (the `accumulation` "
            "source) or DDP with 2+ processes (`ddp`)."
        )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._source is None:
            return
        norms = self._source.step_norms(grad_scale=_loss_scale(trainer))
        if self._preconditioner is not None and not self._preconditioner_ready():
            # No second moment yet, so the norms were not preconditioned: leave the step out (every rank alike, the
            # optimizer state is replicated; nothing is pending before it). Only its examples count.
            self._examples_seen = self._examples_seen + norms.batch_big.to(self._examples_seen.device)
            return
        self._pending.append(norms)
        if self._source.last_layer_norms is not None:
            self._pending_layers.append(self._source.last_layer_norms)
        # Under DDP the rank-local halves of the estimates are averaged over ranks in one all-reduce per logging
        # period rather than one per step (a per-step collective cost 10-20% of a small model's step on gloo).
        # Every rank takes the same steps, so every rank reaches the collective together.
        if trainer.world_size == 1 or self._should_log(trainer):
            self._flush(trainer.world_size)
        if self._should_log(trainer):
            self._log(trainer, pl_module)

    def _preconditioner_ready(self) -> bool:
        """Whether the optimizer holds a second moment (the norms of this step were preconditioned)."""
        assert self._preconditioner is not None
        if self._preconditioner.ready:
            return True
        if self._preconditioner.stepped:
            # It has stepped and holds no `exp_avg_sq`: an optimizer that only looked like Adam.
            name = type(self._preconditioner.optimizer).__name__
            if self.preconditioned is True:
                raise MisconfigurationException(
                    f"`preconditioned=True`, but the state of {name} holds no `exp_avg_sq` after its first step. "
                    "Use an Adam-family optimizer, or pass `preconditioned=False`."
                )
            rank_zero_info(f"NoiseScaleMonitor: {name} keeps no `exp_avg_sq`: measuring the plain noise scale.")
            self._preconditioner = None
            if self._source is not None:
                self._source.preconditioner = None
        return False

    def _flush(self, world_size: int) -> None:
        """Fold the pending steps, averaged over ranks, into the moving average and the metric."""
        steps, self._pending = average_over_ranks(self._pending, world_size), []
        for norms in steps:
            self._fold(norms)
        layer_steps, self._pending_layers = average_over_ranks(self._pending_layers, world_size), []
        for norms in layer_steps:
            self._fold_layers(_estimable(norms))

    def _fold_layers(self, norms: StepNorms) -> None:
        assert self.layer_metric is not None
        if self._layer_ema is None:
            self._layer_ema = ema_init(tuple(norms.sq_norm_big.shape), device=norms.sq_norm_big.device)
            self.layer_metric.to(norms.sq_norm_big.device)
        if self.horizon_examples is None:  # only steps without data so far (see `_fold`): counted, no average
            self.layer_metric.update(*norms, population_size=self.population_size)
            return
        self._layer_ema, _ = ema_update(
            self._layer_ema,
            *norms,
            horizon=self.horizon_examples,
            elapsed=norms.batch_big[0],
            population_size=self.population_size,
        )
        self.layer_metric.update(*norms, population_size=self.population_size)

    def _fold(self, norms: StepNorms) -> None:
        if self.horizon_examples is None:
            # Fixed once, from the first step: a batch size that grows later keeps the same history in examples.
            first = float(norms.batch_big)  # one host sync, once per run (and per leading step with no data)
            if first > 0:
                self.horizon_examples = tags.DEFAULT_HORIZON_STEPS * first
        device = norms.sq_norm_big.device
        if self._ema is None:
            self._ema = ema_init(dtype=torch.float32, device=device)
        if self._ema.weight.device != device:  # first step, or first step after a restore
            self._ema = NoiseScaleEMA(*(t.to(device) for t in self._ema))
            self._num_skipped = self._num_skipped.to(device)
            self._examples_seen = self._examples_seen.to(device)
            self._steps_since_estimate = self._steps_since_estimate.to(device)
            self.metric.to(device)
        if not self._first_step_checked:
            self._first_step_checked = self._check_first_step(norms)
        usable = _estimable(norms)
        self.metric.update(
            usable.sq_norm_small, usable.sq_norm_big, usable.batch_small, usable.batch_big, self.population_size
        )
        # A step with no data (big batch 0) adds no examples and leaves the last batch size as it was.
        last = self._last_batch_big
        self._last_batch_big = (
            norms.batch_big if last is None else torch.where(norms.batch_big > 0, norms.batch_big, last)
        )
        if self.horizon_examples is None:  # no step with data yet: this one is skipped, and there is no horizon
            self._num_skipped = self._num_skipped + 1
            return
        self._ema, skipped = ema_update(
            self._ema,
            usable.sq_norm_small,
            usable.sq_norm_big,
            usable.batch_small,
            usable.batch_big,
            horizon=self.horizon_examples,
            elapsed=norms.batch_big,
            population_size=self.population_size,
        )
        self._num_skipped = self._num_skipped + skipped
        self._examples_seen = self._examples_seen + norms.batch_big
        self._steps_since_estimate = torch.where(skipped, self._steps_since_estimate + 1, 0.0)
        self._folded_since_log += 1

    def _check_first_step(self, norms: StepNorms) -> bool:
        """Refuse a fit whose steps cannot carry an estimate, rather than skip every step without a word.

        Returns whether the check was made: a step with no data (no backward pass) leaves it to the next one.
        """
        small, big = torch.stack([norms.batch_small, norms.batch_big]).double().tolist()  # once per fit
        if big == 0:
            return False
        if big > small:
            return True
        source = self._source.name if self._source is not None else "?"
        raise MisconfigurationException(
            f"NoiseScaleMonitor: the first optimizer step holds {big:g} example(s) in its big batch against "
            f"{small:g} in its small one (`{source}` source): one example per optimizer step has no batch-level "
            "spread to measure, so every step would be skipped and `b_simple` stay NaN. Train with batch_size >= 2, "
            "or accumulate_grad_batches >= 2 (which selects the `accumulation` source), or DDP on 2+ devices."
        )

    def _should_log(self, trainer: pl.Trainer) -> bool:
        # Lightning sets `Trainer.log_every_n_steps` at run time, hence unknown to type checkers.
        every = self.log_every_n_steps or trainer.log_every_n_steps  # type: ignore[attr-defined]
        return (trainer.global_step + 1) % every == 0

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        estimates = self.estimates
        keys = tags.ESTIMATES
        # The only host sync of the monitor, once per logging period.
        counts = [self._num_skipped.double(), self._steps_since_estimate.to(self._num_skipped).double()]
        values = torch.stack([estimates[k].double() for k in keys] + counts).tolist()
        names = (*keys, *tags.COUNTS)
        metrics = {f"{self.log_key_prefix}{k}": v for k, v in zip(names, values, strict=True)}
        self._warn_if_frozen(values[-1])
        if self.horizon_examples is not None:
            metrics[f"{self.log_key_prefix}{tags.HORIZON_EXAMPLES}"] = float(self.horizon_examples)
        metrics[f"{self.log_key_prefix}{tags.PRECONDITIONED}"] = float(self.is_preconditioned)
        if self._layer_ema is not None and self._source is not None:
            layer_b_simple = ema_compute(self._layer_ema, self.confidence)["b_simple"].tolist()
            for name, value in zip(self._source.layer_names, layer_b_simple, strict=True):
                metrics[f"{self.log_key_prefix}{tags.layer_b_simple(name)}"] = value
        for follower in self._followers:
            metrics.update({f"{self.log_key_prefix}{k}": v for k, v in follower.logged().items()})
        step = batches_that_stepped(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.prog_bar:
            key = f"{self.log_key_prefix}{tags.B_SIMPLE}"
            pl_module.log(key, metrics[key], prog_bar=True, logger=False)
        # Every rank is here (logging steps are shared), as a follower's collective needs.
        logged = MappingProxyType({k: metrics[f"{self.log_key_prefix}{k}"] for k in keys})
        for follower in self._followers:
            follower.on_estimates_logged(trainer, logged)

    def _warn_if_frozen(self, since: float) -> None:
        """Warn once when a whole logging period (of 10+ steps) was skipped; again only after a recovery."""
        folded, self._folded_since_log = self._folded_since_log, 0
        if since < self._since_at_log + folded:  # a step with an estimate reset the count since the last log
            self._warned_frozen = False
        self._since_at_log = since
        if self._warned_frozen or since < max(FROZEN_AFTER_STEPS, folded):
            return
        self._warned_frozen = True
        rank_zero_warn(
            f"NoiseScaleMonitor: the last {since:.0f} optimizer steps were all skipped because their gradients were "
            "not finite: the loss is NaN or inf (a learning rate too high, bad data, an overflow; with AMP, a loss "
            "scale that keeps overflowing), and once NaN reaches the weights every later step is too. The logged "
            f"`{self.log_key_prefix}` estimates are frozen at the last finite step "
            f"(`{self.log_key_prefix}steps_since_estimate` counts the steps since). Check the loss; "
            "`Trainer(detect_anomaly=True)` shows where a NaN first appears.",
            category=RuntimeWarning,
        )

    # -- checkpointing --------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        # Checkpoints are written with every rank taking part (Lightning requires it), so this collective is met.
        self._flush(self._world_size)
        return {
            "horizon_examples": self.horizon_examples,
            "ema": None if self._ema is None else {k: v.detach().cpu() for k, v in self._ema._asdict().items()},
            "metric": {name: getattr(self.metric, name).detach().cpu() for name in self.metric._state_names()},
            "num_skipped": self._num_skipped.detach().cpu(),
            "steps_since_estimate": self._steps_since_estimate.detach().cpu(),
            "examples_seen": self._examples_seen.detach().cpu(),
            "preconditioned": self.is_preconditioned if self._ema is not None else None,
            "layer_ema": None
            if self._layer_ema is None
            else {k: v.detach().cpu() for k, v in self._layer_ema._asdict().items()},
            "layer_metric": None
            if self.layer_metric is None
            else {name: getattr(self.layer_metric, name).detach().cpu() for name in self.layer_metric._state_names()},
            "growth": None if self._owned_growth is None else self._owned_growth.growth_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.horizon_examples = state_dict["horizon_examples"]
        ema = state_dict["ema"]
        self._ema = None if ema is None else NoiseScaleEMA(**ema)
        for name, value in state_dict["metric"].items():
            setattr(self.metric, name, value.clone())
        self._num_skipped = state_dict["num_skipped"].clone()
        self._examples_seen = state_dict["examples_seen"].clone()
        self._steps_since_estimate = state_dict.get("steps_since_estimate", torch.zeros(())).clone()
        self._since_at_log, self._folded_since_log = float(self._steps_since_estimate), 0
        self._first_step_checked = True
        # A checkpoint from before the run average weighted steps by their examples: its steps get the mean batch.
        legacy = "sum_weight" not in state_dict["metric"]
        steps_taken = (self.metric.num_steps + self._num_skipped).clamp(min=1.0)
        if legacy:
            self.metric._adopt_unit_weights(self._examples_seen.to(steps_taken) / steps_taken)
        self._restored_preconditioned = state_dict.get("preconditioned")
        layer_ema = state_dict.get("layer_ema")
        self._layer_ema = None if layer_ema is None else NoiseScaleEMA(**layer_ema)
        if state_dict.get("growth") is not None and self._owned_growth is not None:
            self._owned_growth._restored = state_dict["growth"]
        if state_dict.get("layer_metric") is not None and self.layer_metric is not None:
            for name, value in state_dict["layer_metric"].items():
                setattr(self.layer_metric, name, value.clone())
            if legacy:
                self.layer_metric._adopt_unit_weights(self._examples_seen.to(steps_taken) / steps_taken)


def _estimable(norms: StepNorms) -> StepNorms:
    """The step as the estimators can take it, a step without an estimate marked non-finite.

    A step whose big batch is no bigger than its small one carries no estimate (a one-example batch under the
    ``per_example`` source, such as an epoch's last): it goes in as a non-finite step, skipped and counted, rather
    than stopping the run.
    """
    degenerate = norms.batch_big <= norms.batch_small
    nan = torch.full_like(norms.sq_norm_big, float("nan"))
    return StepNorms(
        torch.where(degenerate, nan, norms.sq_norm_small),
        torch.where(degenerate, nan, norms.sq_norm_big),
        norms.batch_small,
        torch.where(degenerate, norms.batch_small + 1, norms.batch_big),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_compiled(pl_module: pl.LightningModule, chosen: bool) -> None:
    """Stop before training when the per_example source would measure a compiled model.

    TorchDynamo traces the forward hooks of the per-example engine into its graph or runs compiled code around
    them, so the per-example norms of a compiled part come out wrong or not at all; the other two sources read
    parameter gradients and DDP buckets, which a compiled forward leaves as they are.
    """
    parts = compiled_parts(pl_module)
    if not parts:
        return
    how = "`source='auto'` picked `per_example` (one device, no accumulation), which" if chosen else "`per_example`"
    raise MisconfigurationException(
        f"NoiseScaleMonitor: {how} {compiled_model_refusal(parts)} "
        "Use a source that reads parameter gradients: `Trainer(accumulate_grad_batches=2)` or more (the "
        "`accumulation` source, picked by 'auto'), or DDP with 2+ processes (the `ddp` source); or measure an "
        "uncompiled model."
    )


def _leaves(loaders: Any) -> list[Any]:
    """The dataloaders of ``trainer.train_dataloader`` (one, or a dict/list of them, nested), in batch order."""
    if isinstance(loaders, Mapping):
        return [leaf for value in loaders.values() for leaf in _leaves(value)]
    if isinstance(loaders, list | tuple):
        return [leaf for value in loaders for leaf in _leaves(value)]
    return [loaders]


def _batch_parts(loaders: Any, batch: Any) -> list[Any]:
    """The batch of each dataloader in a combined batch, which Lightning shapes like the loaders' container."""
    if isinstance(loaders, Mapping):
        return [part for key, value in loaders.items() for part in _batch_parts(value, batch[key])]
    if isinstance(loaders, list | tuple):
        return [part for value, sub in zip(loaders, batch, strict=True) for part in _batch_parts(value, sub)]
    return [batch]


def _examples_in(batch: Any, loaders: Any) -> int:
    """The examples of a training batch: with several dataloaders, those of every loader's batch together."""
    if not isinstance(loaders, Mapping | list | tuple):
        return extract_batch_size(batch)
    # "max_size" mode hands None for a loader that ran out.
    return sum(extract_batch_size(part) for part in _batch_parts(loaders, batch) if part is not None)


def _training_set_size(trainer: pl.Trainer) -> int | None:
    """The number of training examples, if the training set has a length (an IterableDataset has none).

    With several training dataloaders, the examples of all their data sets. That is the population the batches
    are drawn from when every loader's share of a batch is its share of the data (then the finite-population
    correction holds for the union); otherwise no correction is applied.
    """
    loaders = _leaves(trainer.train_dataloader)
    try:
        sizes = [len(loader.dataset) for loader in loaders]
    except (TypeError, AttributeError):
        rank_zero_info("NoiseScaleMonitor: the training set has no length; no finite-population correction.")
        return None
    if len(loaders) > 1:
        shares = [getattr(loader, "batch_size", None) for loader in loaders]
        known = [b for b in shares if isinstance(b, int)]
        proportional = len(known) == len(loaders) and all(
            abs(b * sum(sizes) - n * sum(known)) <= 0.01 * n * sum(known) for b, n in zip(known, sizes, strict=True)
        )
        if not proportional:
            rank_zero_info(
                f"NoiseScaleMonitor: the {len(loaders)} training dataloaders' batch sizes ({shares}) are not in "
                f"proportion to their data sets ({sizes}); no finite-population correction."
            )
            return None
    size = sum(sizes)
    return size if size >= 2 else None


def _loss_scale(trainer: pl.Trainer) -> Tensor | None:
    """The GradScaler's current scale as a tensor (no sync), or None when gradients are not scaled."""
    return grad_scaler_scale(getattr(trainer.precision_plugin, "scaler", None))
