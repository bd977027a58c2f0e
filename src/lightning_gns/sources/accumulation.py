"""The ``accumulation`` source: each micro-batch's fresh gradient against the accumulated one."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns.sources.base import GradientSource, StepNorms, _trainable, global_grad_sq_norm, no_data_step
from lightning_gns.sources.loss_reduction import LossReduction
from lightning_gns.sources.preconditioning import Preconditioner, weighted_sq_norm

__all__ = ["AccumulationSource"]


class AccumulationSource(GradientSource):
    r"""Micro-batch gradients (B_small) against the gradient accumulated over the step (B_big).

    A tensor hook on every trainable parameter sees the micro-batch's gradient before it is added into
    ``.grad`` (a difference of ``.grad`` snapshots would be wrong under DDP's ``no_sync``) and keeps only its
    norm: no parameter-sized buffer. Under DDP the hooks see the rank's local gradient, the accumulated ``.grad``
    is the all-reduced one, and the micro-batch norms are averaged over ranks: B_big is then the global batch.

    Frameworks divide the loss by the number of accumulation steps (Lightning does): ``loss_divisor`` undoes it.
    A sum-reduced loss (``loss_reduction="sum"``) is brought to the mean convention per micro-batch (its gradient
    divided by its examples) and over the step (the accumulated gradient divided by the step's examples, exact
    with an uneven last micro-batch); B_small is then the harmonic mean of the micro-batch sizes, with which the
    average of their squared norms estimates :math:`|G|^2 + \operatorname{tr}\Sigma / B_{small}`.
    With a ``preconditioner`` each parameter's squared entries are weighted by its :math:`P^2` (a temporary of
    the parameter's size while the hook runs).

    Args:
        loss_divisor: what each micro-batch's loss was divided by (Lightning: ``accumulate_grad_batches``).
        world_size: number of data-parallel ranks.
        preconditioner: the elementwise :math:`P^2` of each parameter, or ``None`` for plain norms.
        loss_reduction: ``"mean"`` or ``"sum"``: how each micro-batch's loss reduces over its examples.
    """

    name = "accumulation"

    def __init__(
        self,
        loss_divisor: int,
        world_size: int = 1,
        preconditioner: Preconditioner | None = None,
        loss_reduction: LossReduction = "mean",
    ) -> None:
        super().__init__(world_size, preconditioner, loss_reduction)
        if loss_divisor < 1:
            raise ValueError(f"Expected `loss_divisor` >= 1 (accumulate_grad_batches), got {loss_divisor}.")
        self.loss_divisor = loss_divisor
        self._handles: list[RemovableHandle] = []
        self._params: list[nn.Parameter] = []
        # The squared norms of every parameter's micro-batch gradients since the last step; their sum is all the
        # step needs (summed once, at the step: fewer small kernels than a sum per micro-batch).
        self._micro_parts: list[Tensor] = []
        self._parts_done = 0
        # Each finished micro-batch: (its first part, its examples).
        self._micro: list[tuple[int, int]] = []
        self._num_micro = 0
        self._examples = 0

    def attach(self, model: nn.Module) -> None:
        """Hook every trainable parameter of ``model``."""
        super().attach(model)
        self._params = _trainable(model)
        self._handles = [p.register_hook(partial(self._on_grad, p)) for p in self._params]

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().detach()

    def _on_grad(self, param: nn.Parameter, grad: Tensor) -> None:
        # Only the squared norm is kept: the gradient itself flows on into `.grad` untouched.
        sq_weight = None if self.preconditioner is None else self.preconditioner(param)
        self._micro_parts.append(weighted_sq_norm(grad, sq_weight).float())

    def micro_batch_done(self, num_examples: int) -> None:
        """Count the finished micro-batch (if its backward reached any parameter) into the step."""
        if len(self._micro_parts) == self._parts_done:
            return
        self._micro.append((self._parts_done, num_examples))
        self._parts_done = len(self._micro_parts)
        self._num_micro += 1
        self._examples += num_examples

    def step_norms(self, grad_scale: Tensor | None = None) -> StepNorms:
        """This rank's micro-batch norms (averaged over its micro-batches) and the accumulated gradient's norm."""
        if self._num_micro == 0:
            # Every training_step of the step returned None: nothing to measure, the step is skipped.
            self._micro_parts, self._parts_done, self._micro = [], 0, []
            return no_data_step(self._params[0].device if self._params else None)
        sizes = [n for _, n in self._micro]
        # Each micro-batch's gradient carries 1/loss_divisor, and with a sum-reduced loss its n examples too.
        micro_mean = self._micro_sq_norm_sum() * (self.loss_divisor**2 / self._num_micro)
        if grad_scale is not None:
            micro_mean = micro_mean / grad_scale.float() ** 2
        # `.grad` carries num_micro/loss_divisor of a mean (mean-reduced), all examples/loss_divisor (sum-reduced).
        big_divisor = self._examples if self.loss_reduction == "sum" else self._num_micro
        big = (
            global_grad_sq_norm(self._params, self.preconditioner).to(micro_mean.device)
            * (self.loss_divisor / big_divisor) ** 2
        )
        examples = float(self._examples)
        # Sum-reduced: the micro-batch means are exact and `.grad` is the mean over all examples, so the harmonic
        # mean is the small batch. Mean-reduced, `.grad` is the plain average of the micro-batch means, which on
        # uneven micro-batches is not the mean over the step's examples; with the arithmetic mean for B_small the
        # |G|² estimate stays unbiased (tr Σ is off on such a step by Σ(1/n)·examples/num_micro²).
        if self.loss_reduction == "sum":
            batch_small = len(sizes) / sum(1.0 / n for n in sizes)
        else:
            batch_small = examples / self._num_micro
        self._micro_parts, self._parts_done, self._micro, self._num_micro, self._examples = [], 0, [], 0, 0
        return StepNorms(
            micro_mean,
            big,
            torch.full_like(big, batch_small),
            torch.full_like(big, examples * self.world_size),
        )

    def _micro_sq_norm_sum(self) -> Tensor:
        """The micro-batches' squared norms summed, each divided by its examples squared for a sum-reduced loss."""
        if self.loss_reduction == "mean":
            return torch.stack(self._micro_parts[: self._parts_done]).sum()
        # One sum per distinct micro-batch size (one, except on a short last micro-batch), not per micro-batch.
        by_size: dict[int, list[Tensor]] = {}
        ends = [start for start, _ in self._micro[1:]] + [self._parts_done]
        for (start, n), end in zip(self._micro, ends, strict=True):
            by_size.setdefault(n, []).extend(self._micro_parts[start:end])
        return torch.stack([torch.stack(parts).sum() / n**2 for n, parts in by_size.items()]).sum()
