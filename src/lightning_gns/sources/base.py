"""What every gradient source shares: the per-step result, the protocol, and the cross-rank average."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gns.sources.loss_reduction import LossReduction, check_loss_reduction
from lightning_gns.sources.preconditioning import Preconditioner, weighted_grad_sq_norms

__all__ = ["GradientSource", "StepNorms", "average_over_ranks", "global_grad_sq_norm", "no_data_step"]


class StepNorms(NamedTuple):
    """One optimizer step's squared norms of the gradient averaged over a small and a big batch.

    As a source returns it, ``sq_norm_small`` and ``batch_small`` are this rank's (averaged over its small
    batches: micro-batches or examples) and ``batch_big`` is this rank's examples × world size; ``sq_norm_big`` is
    the all-reduced gradient's, the same on every rank. :func:`average_over_ranks` turns a run of steps into the
    global values (the small norms of all ranks averaged, which is what makes the estimate precise) with one
    collective for the whole run. Everything is a tensor on the gradients' device.
    """

    sq_norm_small: Tensor
    sq_norm_big: Tensor
    batch_small: Tensor
    batch_big: Tensor


def no_data_step(device: torch.device | str | None = None, shape: tuple[int, ...] = ()) -> StepNorms:
    """The result of a step that had no gradient to measure (every ``training_step`` of it returned ``None``).

    Its norms are NaN and its big batch 0: the monitor skips it and counts it in ``num_skipped``, and adds no
    examples for it.
    """
    nan = torch.full(shape, float("nan"), device=device)
    return StepNorms(nan, nan.clone(), torch.ones(shape, device=device), torch.zeros(shape, device=device))


def global_grad_sq_norm(params: Iterable[nn.Parameter], preconditioner: Preconditioner | None = None) -> Tensor:
    """Squared norm of the ``.grad`` of ``params`` (float32 accumulation), each weighted by its preconditioner.

    Without a preconditioner: one fused kernel per dtype group.
    """
    norms = weighted_grad_sq_norms(params, preconditioner)
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).sum()


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class GradientSource(abc.ABC):
    r"""Where the small- and the big-batch gradient of a step come from.

    A source is attached to the model before training, told when each micro-batch's backward is done, and asked
    once per optimizer step for a :class:`StepNorms`, after all backward passes of the step (and the gradient
    all-reduce) and before gradient clipping. Sources know nothing of Lightning: the callback wires them.

    With a :attr:`preconditioner` every squared norm (small and big) is that of the preconditioned gradient,
    :math:`\sum_j P_j^2 g_j^2`; it can be set or changed between optimizer steps.

    Whatever :attr:`loss_reduction` the loss has, the norms are reported in one convention: those of the gradient
    of the *mean* loss over the examples of the batch (what tr Σ and |G|² are defined with). It can be set before
    the first backward pass (the monitor detects it there).

    A step whose micro-batches all skipped their backward pass (``training_step`` returned ``None``) gives
    :func:`no_data_step`, never an error.

    Args:
        world_size: number of data-parallel ranks.
        preconditioner: the elementwise :math:`P^2` of each parameter
            (:class:`~lightning_gns.sources.preconditioning.AdamPreconditioner`), or ``None`` for plain norms.
        loss_reduction: ``"mean"`` if each micro-batch's loss is the mean over its examples (the default of every
            torch loss), ``"sum"`` if it is their sum; before any division by the accumulation steps.
    """

    name: str = "source"
    attaches_at_train_start: bool = False
    """Whether :meth:`attach` must wait for the training loop (DDP: the model is wrapped only then)."""

    def __init__(
        self, world_size: int = 1, preconditioner: Preconditioner | None = None, loss_reduction: LossReduction = "mean"
    ) -> None:
        self.world_size = world_size
        self.preconditioner = preconditioner
        self.loss_reduction = check_loss_reduction(loss_reduction)
        self._model: nn.Module | None = None
        self.layer_names: list[str] = []
        """The layers whose norms :attr:`last_layer_norms` keeps apart (empty: the source keeps none)."""
        self.last_layer_norms: StepNorms | None = None
        """The last step's norms per layer (shape ``[len(layer_names)]`` each), or ``None``."""

    def attach(self, model: nn.Module) -> None:
        """Start watching ``model`` (the module whose parameters the optimizer steps)."""
        if self._model is not None:
            raise RuntimeError(f"The {self.name} source is already attached; call `detach()` first.")
        self._model = model

    def detach(self) -> None:
        """Stop watching and remove every hook; safe to call twice."""
        self._model = None

    def batch_start(self, num_examples: int | None = None) -> None:  # noqa: B027  # optional: most keep nothing
        """Called before each micro-batch's forward pass (of ``num_examples`` examples, when known).

        Whatever an earlier forward left pending is stale now.
        """

    def pending_examples(self) -> int | None:
        """The examples the source measured one by one since the last :meth:`micro_batch_done`, or ``None``.

        ``None`` for a source that does not see examples apart (only the per-example source does).
        """
        return None

    @abc.abstractmethod
    def micro_batch_done(self, num_examples: int) -> None:
        """Called after each backward pass (one micro-batch of ``num_examples`` examples on this rank)."""

    @abc.abstractmethod
    def step_norms(self, grad_scale: Tensor | None = None) -> StepNorms:
        """The squared norms of this optimizer step; resets the per-step accumulators.

        Args:
            grad_scale: the loss scale the gradients still carry (AMP with a GradScaler, before unscaling of the
                quantities the source captured itself), or ``None``.
        """


def average_over_ranks(steps: list[StepNorms], world_size: int) -> list[StepNorms]:
    """The rank-local parts of several steps averaged over ranks, in one all-reduce.

    Every rank must call it at the same point with the same number of steps (the callback does so at logging
    steps, which all ranks share): it is a collective. With one rank it returns ``steps`` unchanged.
    """
    if world_size == 1 or not steps or not (dist.is_available() and dist.is_initialized()):
        return steps
    local = torch.stack([torch.stack([s.sq_norm_small, s.batch_small, s.batch_big]) for s in steps])
    dist.all_reduce(local)
    local /= world_size
    return [
        StepNorms(row[0], step.sq_norm_big, row[1], row[2]) for row, step in zip(local.unbind(), steps, strict=True)
    ]
