"""The ``per_example`` source: every example's gradient norm (B_small = 1) against the batch's (B_big)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_gns.sources.base import GradientSource, StepNorms, _trainable, global_grad_sq_norm, no_data_step
from lightning_gns.sources.loss_reduction import LossReduction
from lightning_gns.sources.per_example_norms import PerExampleGradNorms
from lightning_gns.sources.preconditioning import Preconditioner, weighted_grad_sq_norms

__all__ = ["PerExampleSource"]


class PerExampleSource(GradientSource):
    r"""Per-example gradient squared norms from layer hooks against the step's accumulated gradient.

    Works on one device with no accumulation, which is where most runs start. The loss is a mean over the
    micro-batch's N examples (the default of every torch loss) or, with ``loss_reduction="sum"``, their sum,
    divided by ``loss_divisor`` for accumulation: the hooks see :math:`g_i/(N \cdot \text{loss\_divisor})` (or
    :math:`g_i/\text{loss\_divisor}`), which is undone here, and the step's ``.grad`` is brought to the mean over
    the step's examples the same way. With ``include`` only those
    module types are measured, and the big-batch norm is restricted to their parameters so that both norms
    describe the same gradient. With a ``preconditioner`` both are norms of the preconditioned gradient (the
    layer rules weight the per-example gradients entrywise without building them where a cheap exact form
    exists; see :mod:`~lightning_gns.sources.rules`).

    Args:
        loss_divisor: what each micro-batch's loss was divided by (Lightning: ``accumulate_grad_batches``).
        world_size: number of data-parallel ranks.
        include: module types to measure, or ``None`` for the whole model.
        strict: raise instead of warning when a module needs the slow fallback or escapes the hooks.
        per_layer: also keep each measured layer's norms apart (see :attr:`layer_names`,
            :attr:`last_layer_norms`).
        preconditioner: the elementwise :math:`P^2` of each parameter, or ``None`` for plain norms.
        fuse_weight_grads: hand autograd the weight and bias gradients of each convolution (and Linear on long
            sequences) as the sums of the per-example gradients the rule builds anyway, instead of having autograd
            compute them again
            (:class:`~lightning_gns.sources.per_example_norms.PerExampleGradNorms`); ``False`` leaves every
            parameter gradient to autograd.
        loss_reduction: ``"mean"`` or ``"sum"``: how each micro-batch's loss reduces over its examples.
    """

    name = "per_example"

    def __init__(
        self,
        loss_divisor: int = 1,
        world_size: int = 1,
        include: Sequence[type[nn.Module]] | None = None,
        strict: bool = False,
        per_layer: bool = False,
        preconditioner: Preconditioner | None = None,
        fuse_weight_grads: bool = True,
        loss_reduction: LossReduction = "mean",
    ) -> None:
        self._engine: PerExampleGradNorms | None = None
        super().__init__(world_size, preconditioner, loss_reduction)
        self.per_layer = per_layer
        self._layer_index = torch.zeros(0, dtype=torch.long)
        self._layer_params: list[nn.Parameter] = []
        self._layer_sum_sq: Tensor | None = None
        self.loss_divisor = loss_divisor
        self.include = include
        self.strict = strict
        self.fuse_weight_grads = fuse_weight_grads
        self._params: list[nn.Parameter] = []
        self._sum_sq: Tensor | None = None
        self._examples = 0
        self._num_micro = 0

    @property
    def preconditioner(self) -> Preconditioner | None:
        """The elementwise :math:`P^2` of each parameter (``None``: plain norms); the hooks use it too."""
        return self._preconditioner

    @preconditioner.setter
    def preconditioner(self, value: Preconditioner | None) -> None:
        self._preconditioner = value
        if self._engine is not None:
            self._engine.preconditioner = value

    def attach(self, model: nn.Module) -> None:
        """Hook the measured modules of ``model``."""
        super().attach(model)
        self._engine = PerExampleGradNorms(
            model,
            include=self.include,
            strict=self.strict,
            preconditioner=self.preconditioner,
            fuse_weight_grads=self.fuse_weight_grads,
        ).attach()
        # The big-batch norm covers exactly what the hooks measure, so both norms describe the same gradient.
        self._params = _trainable(model) if self.include is None else list(self._engine.measured_parameters)
        if self.per_layer:
            groups = self._engine.measured_groups
            self.layer_names = list(groups)
            self._layer_params = [p for params in groups.values() for p in params]
            self._layer_index = torch.tensor([i for i, params in enumerate(groups.values()) for _ in params])

    def detach(self) -> None:
        """Remove the hooks."""
        if self._engine is not None:
            self._engine.remove()
            self._engine = None
        super().detach()

    def batch_start(self, num_examples: int | None = None) -> None:
        """Forget the calls of a forward whose backward never ran, and tell the engine the batch size.

        A ``training_step`` that returned None leaves such calls; the batch size is what a batch-free output,
        like a position embedding's, is expanded to.
        """
        if self._engine is not None:
            self._engine.forget_pending()
            if num_examples is not None and num_examples > 0:
                self._engine.batch_size = num_examples

    def micro_batch_done(self, num_examples: int) -> None:
        """Fold the micro-batch's per-example norms (undoing the mean over its examples) into the step."""
        if self._engine is None:
            return
        for record in self._engine.pop():
            n = record.batch_size
            # The hooks saw g_i / (n · divisor) of a mean-reduced loss, g_i / divisor of a sum-reduced one.
            scale = (n * self.loss_divisor if self.loss_reduction == "mean" else self.loss_divisor) ** 2
            total = record.sq_norms.float().sum() * scale
            self._sum_sq = total if self._sum_sq is None else self._sum_sq + total
            if self.per_layer:
                zero = record.sq_norms.new_zeros(n)
                layers = torch.stack([record.by_module.get(name, zero) for name in self.layer_names]).float()
                layer_total = layers.sum(1) * scale
                self._layer_sum_sq = layer_total if self._layer_sum_sq is None else self._layer_sum_sq + layer_total
            self._examples += n
            self._num_micro += 1

    def pending_examples(self) -> int:
        """The examples of the backward passes the hooks measured since the last :meth:`micro_batch_done`."""
        if self._engine is None:
            return 0
        return sum(record.batch_size for record in self._engine.records)

    def step_norms(self, grad_scale: Tensor | None = None) -> StepNorms:
        """Mean per-example squared norm over this rank's examples, and the batch gradient's norm."""
        if self._sum_sq is None or self._examples == 0:
            # No backward reached a measured module since the last step (training_step returned None): skipped.
            device = self._params[0].device if self._params else None
            if self.per_layer:
                self.last_layer_norms = no_data_step(device, (len(self.layer_names),))
            self._sum_sq, self._layer_sum_sq, self._examples, self._num_micro = None, None, 0, 0
            return no_data_step(device)
        mean_sq = self._sum_sq / self._examples
        if grad_scale is not None:
            mean_sq = mean_sq / grad_scale.float() ** 2
        big = global_grad_sq_norm(self._params, self.preconditioner).to(mean_sq.device) * self._big_correction()
        examples = float(self._examples)
        if self.per_layer and self._layer_sum_sq is not None:
            self.last_layer_norms = self._layer_step_norms(grad_scale, examples)
        self._sum_sq, self._layer_sum_sq, self._examples, self._num_micro = None, None, 0, 0
        return StepNorms(mean_sq, big, torch.ones_like(big), torch.full_like(big, examples * self.world_size))

    def _big_correction(self) -> float:
        """What turns the squared norm of the step's ``.grad`` into that of the mean gradient over its examples."""
        # `.grad` sums the micro-batches' gradients, each divided by the divisor: num_micro means of a mean-reduced
        # loss, the sum over all examples of a sum-reduced one (under DDP averaged over ranks of equal batches).
        if self.loss_reduction == "sum":
            return (self.loss_divisor / self._examples) ** 2
        return (self.loss_divisor / self._num_micro) ** 2

    def _layer_step_norms(self, grad_scale: Tensor | None, examples: float) -> StepNorms:
        """Per-layer small and big norms of the step, shape ``(num_layers,)`` each."""
        assert self._layer_sum_sq is not None
        small = self._layer_sum_sq / examples
        if grad_scale is not None:
            small = small / grad_scale.float() ** 2
        # One fused norm per parameter, then summed per layer (parameters without a gradient add nothing).
        with_grad = [i for i, p in enumerate(self._layer_params) if p.grad is not None]
        big = torch.zeros_like(small)
        if with_grad:
            index = self._layer_index.to(small.device)[with_grad]
            sq_norms = weighted_grad_sq_norms([self._layer_params[i] for i in with_grad], self.preconditioner)
            big = big.index_add(0, index, torch.stack(sq_norms).to(small.device))
            big = big * self._big_correction()
        return StepNorms(small, big, torch.ones_like(small), torch.full_like(small, examples * self.world_size))
