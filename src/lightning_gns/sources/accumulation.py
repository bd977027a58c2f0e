"""The ``accumulation`` source: each micro-batch's fresh gradient against the accumulated one."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns.sources.base import GradientSource, StepNorms, _trainable, global_grad_sq_norm
from lightning_gns.sources.preconditioning import Preconditioner, weighted_sq_norm

__all__ = ["AccumulationSource"]


class AccumulationSource(GradientSource):
    """Micro-batch gradients (B_small) against the gradient accumulated over the step (B_big).

    A tensor hook on every trainable parameter sees the micro-batch's gradient before it is added into
    ``.grad`` (a difference of ``.grad`` snapshots would be wrong under DDP's ``no_sync``) and keeps only its
    norm: no parameter-sized buffer. Under DDP the hooks see the rank's local gradient, the accumulated ``.grad``
    is the all-reduced one, and the micro-batch norms are averaged over ranks: B_big is then the global batch.

    Frameworks divide the loss by the number of accumulation steps (Lightning does): ``loss_divisor`` undoes it.
    With a ``preconditioner`` each parameter's squared entries are weighted by its :math:`P^2` (a temporary of
    the parameter's size while the hook runs).

    Args:
        loss_divisor: what each micro-batch's loss was divided by (Lightning: ``accumulate_grad_batches``).
        world_size: number of data-parallel ranks.
        preconditioner: the elementwise :math:`P^2` of each parameter, or ``None`` for plain norms.
    """

    name = "accumulation"

    def __init__(self, loss_divisor: int, world_size: int = 1, preconditioner: Preconditioner | None = None) -> None:
        super().__init__(world_size, preconditioner)
        if loss_divisor < 1:
            raise ValueError(f"Expected `loss_divisor` >= 1 (accumulate_grad_batches), got {loss_divisor}.")
        self.loss_divisor = loss_divisor
        self._handles: list[RemovableHandle] = []
        self._params: list[nn.Parameter] = []
        # The squared norms of every parameter's micro-batch gradients since the last step; their sum is all the
        # step needs (summed once, at the step: fewer small kernels than a sum per micro-batch).
        self._micro_parts: list[Tensor] = []
        self._parts_done = 0
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
        self._parts_done = len(self._micro_parts)
        self._num_micro += 1
        self._examples += num_examples

    def step_norms(self, grad_scale: Tensor | None = None) -> StepNorms:
        """This rank's micro-batch norms (averaged over its micro-batches) and the accumulated gradient's norm."""
        if self._num_micro == 0:
            raise RuntimeError("No backward pass was seen since the last optimizer step.")
        # Each micro-batch's gradient carries 1/loss_divisor; `.grad` carries num_micro/loss_divisor of a mean.
        micro_mean = torch.stack(self._micro_parts[: self._parts_done]).sum() * (self.loss_divisor**2 / self._num_micro)
        if grad_scale is not None:
            micro_mean = micro_mean / grad_scale.float() ** 2
        big = (
            global_grad_sq_norm(self._params, self.preconditioner).to(micro_mean.device)
            * (self.loss_divisor / self._num_micro) ** 2
        )
        examples, num_micro = float(self._examples), self._num_micro
        self._micro_parts, self._parts_done, self._num_micro, self._examples = [], 0, 0, 0
        return StepNorms(
            micro_mean,
            big,
            torch.full_like(big, examples / num_micro),
            torch.full_like(big, examples * self.world_size),
        )
