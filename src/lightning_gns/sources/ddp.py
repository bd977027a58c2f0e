"""The ``ddp`` source: each rank's gradient against the all-reduced one, read inside the DDP comm hook."""

# No `from __future__ import annotations`: DDP checks the comm hook's annotations as real objects.
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from lightning_gns.sources.base import GradientSource, StepNorms, _trainable, global_grad_sq_norm, no_data_step
from lightning_gns.sources.loss_reduction import LossReduction
from lightning_gns.sources.preconditioning import Preconditioner, weighted_sq_norm

__all__ = ["DDPSource", "IncompleteReductionWarning"]

CommHook = Callable[[Any, dist.GradBucket], "torch.futures.Future[torch.Tensor]"]


class IncompleteReductionWarning(RuntimeWarning):
    """DDP did not all-reduce every gradient bucket of a step: the step is not measured."""


class DDPSource(GradientSource):
    """A rank's local gradient (B_small = per-rank batch) against the all-reduced one (B_big = world × that).

    The local squared norm of every gradient bucket is taken in a DDP communication hook, just before the
    all-reduce, which then runs as before (the user's own hook if there was one, else DDP's default): no copy of
    any gradient, no extra pass. The all-reduced norm is read from ``.grad`` at the optimizer step. The local
    norms are averaged over ranks later, many steps in one all-reduce (:func:`average_over_ranks`).

    With gradient accumulation the hook fires once per step on the accumulated local gradient, so B_small is
    the rank's whole share of the step; the loss divisor cancels out except on a short last window, which
    ``loss_divisor`` corrects. With ``loss_reduction="sum"`` the local gradient is the sum over the rank's examples
    (and DDP averages it over ranks): both norms are divided by the rank's examples squared (exact when every rank
    has as many examples, as a ``DistributedSampler`` gives them).

    A step in which DDP did not reduce its last bucket (buckets are reduced in order, so one of them never became
    ready: a parameter that got no gradient, without ``find_unused_parameters=True``) would give a partial norm:
    it is skipped (:func:`~lightning_gns.sources.base.no_data_step`) with one warning naming the likely cause, and
    DDP raises its own error at the next forward pass.

    With a ``preconditioner`` the bucket's norm is taken per parameter (``bucket.parameters()`` and their views
    in ``bucket.gradients()``), each weighted by its :math:`P^2`; the optimizer state it comes from is the same
    on every rank.

    Args:
        world_size: number of data-parallel ranks (at least 2).
        loss_divisor: what each micro-batch's loss was divided by (Lightning: ``accumulate_grad_batches``).
        inner_hook: the communication hook to compose with (the user's), or ``None`` for DDP's all-reduce.
        preconditioner: the elementwise :math:`P^2` of each parameter, or ``None`` for plain norms.
        loss_reduction: ``"mean"`` or ``"sum"``: how each micro-batch's loss reduces over the rank's examples.
    """

    name = "ddp"
    attaches_at_train_start = True

    def __init__(
        self,
        world_size: int,
        loss_divisor: int = 1,
        inner_hook: CommHook | None = None,
        preconditioner: Preconditioner | None = None,
        loss_reduction: LossReduction = "mean",
    ) -> None:
        if world_size < 2:
            raise ValueError(f"The ddp source needs at least 2 ranks, got world_size={world_size}.")
        super().__init__(world_size, preconditioner, loss_reduction)
        self.loss_divisor = loss_divisor
        self.inner_hook = inner_hook
        self._params: list[nn.Parameter] = []
        self._bucket_norms: list[Tensor] = []
        self._saw_last_bucket = False
        self._warned_incomplete = False
        self._num_micro = 0
        self._examples = 0

    def attach(self, model: nn.Module) -> None:
        """Remember the parameters; the comm hook itself is registered by whoever owns the DDP wrapper."""
        super().attach(model)
        self._params = _trainable(model)

    def comm_hook(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """DDP communication hook: note the bucket's local squared norm, then all-reduce as the inner hook does."""
        if self.preconditioner is None:
            self._bucket_norms.append(torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).square())
        else:
            parts = [
                weighted_sq_norm(grad, self.preconditioner(param)).float()
                for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True)
            ]
            self._bucket_norms.append(torch.stack(parts).sum())
        # DDP reduces the buckets in order: once the last one is here, every one was.
        self._saw_last_bucket = self._saw_last_bucket or bucket.is_last()
        if self.inner_hook is not None:
            return self.inner_hook(state, bucket)
        return allreduce_hook(state, bucket)  # type: ignore[arg-type]  # None is the default process group

    def micro_batch_done(self, num_examples: int) -> None:
        """Count the examples of this rank's step."""
        self._num_micro += 1
        self._examples += num_examples

    def step_norms(self, grad_scale: Tensor | None = None) -> StepNorms:
        """This rank's local norm and the all-reduced gradient's norm."""
        if not self._saw_last_bucket:
            # A partial norm (or none) would be a wrong number: skip the step and let DDP say what went wrong.
            self._warn_incomplete(len(self._bucket_norms))
            self._bucket_norms, self._num_micro, self._examples = [], 0, 0
            return no_data_step(self._params[0].device if self._params else None)
        # The local gradient carries 1/loss_divisor per micro-batch: num_micro means of a mean-reduced loss, the
        # sum over the rank's examples of a sum-reduced one.
        divisor = self._examples if self.loss_reduction == "sum" else self._num_micro
        correction = (self.loss_divisor / divisor) ** 2
        local = torch.stack(self._bucket_norms).sum() * correction
        if grad_scale is not None:
            local = local / grad_scale.float() ** 2
        big = global_grad_sq_norm(self._params, self.preconditioner).to(local.device) * correction
        examples = float(self._examples)
        self._bucket_norms, self._saw_last_bucket, self._num_micro, self._examples = [], False, 0, 0
        return StepNorms(local, big, torch.full_like(big, examples), torch.full_like(big, examples * self.world_size))

    def _warn_incomplete(self, num_buckets: int) -> None:
        if self._warned_incomplete or self._num_micro == 0:
            return  # told already, or no backward pass at all (training_step returned None): nothing to explain
        self._warned_incomplete = True
        warnings.warn(
            f"The ddp gradient source saw DDP all-reduce {num_buckets} gradient bucket(s) this step but not the last "
            "one, so its norms would be partial: the step is not measured (counted in `num_skipped`). The usual "
            "cause is a trainable parameter that received no gradient (a layer unused in the forward pass, or a "
            "branch not taken) while DDP runs without `find_unused_parameters`; DDP then raises its own error at "
            "the next forward pass. Use `Trainer(strategy=DDPStrategy(find_unused_parameters=True))` (or "
            "`strategy='ddp_find_unused_parameters_true'`), or freeze the unused parameters. If the model is not "
            "wrapped in DistributedDataParallel, or `comm_hook` is not registered on it, the source sees no bucket "
            "at all.",
            IncompleteReductionWarning,
            stacklevel=2,
        )
