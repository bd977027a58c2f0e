"""Handing autograd the batch gradients of a layer's weight and bias that a norm rule has built already.

A norm rule that materialises the per-example gradients of a parameter (a convolution's
grouped or unfolded paths, a sequence Linear's per-example outer products) has the batch
gradient at the cost of one sum. The per-example engine then runs the layer's forward with
the ``requires_grad`` of its weight and bias switched off, so that autograd computes no
parameter gradient there, and passes the output through :class:`FusedParamGrads`, whose
backward hands autograd the rule's sums (left in a :class:`GradSlot`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BatchGrads", "FusedParamGrads", "GradSlot", "InputGrad"]

BatchGrads = Callable[[nn.Module, Tensor, Tensor, bool, bool], tuple[Tensor | None, Tensor | None]]
"""``(module, inputs, grad_output, weight, bias) -> (weight_grad, bias_grad)``: the batch gradients as autograd
computes them (those asked for; ``None`` for the others)."""

InputGrad = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``(module, inputs, grad_output) -> grad_inputs``, differentiable with respect to the layer's weight."""


class GradSlot:
    """Where the per-example engine leaves a layer's batch gradients for :class:`FusedParamGrads`.

    A rule that runs the whole backward of its layer (GroupNorm) sets ``whole_backward`` and
    leaves the input gradient in ``inputs`` (``None`` when the input needs none): the layer's
    own node then gets no gradient and does nothing. ``wants_inputs`` tells the rule whether
    the forward's input needs a gradient.
    """

    __slots__ = ("bias", "inputs", "wants_inputs", "weight", "whole_backward")

    def __init__(self, wants_inputs: bool = False) -> None:
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.inputs: Tensor | None = None
        self.wants_inputs = wants_inputs
        self.whole_backward = False


class FusedParamGrads(torch.autograd.Function):
    """Identity on a layer's output whose backward hands autograd the gradients of weight and bias.

    The layer ran with the ``requires_grad`` of its weight and bias switched off (CPU
    backends of convolutions compute the weight's gradient whenever the bias needs one, so
    both are). When the output's gradient arrives, the engine's hook builds the per-example
    gradients for their norms and leaves their sums in the slot, which this backward hands
    to the parameters. Whatever the slot lacks (the rule took a form that builds no
    per-example gradient; the engine may be gone, or a retained graph's second pass
    unmeasured), and everything when a graph of the backward is being built
    (``create_graph=True``), ``batch_grads`` computes as autograd would.

    A layer whose own backward saved its weight as it was during the forward (Linear saves a
    transposed view, which keeps ``requires_grad=False``) would then give an input gradient
    that does not depend on the weight, and a second-order backward (a gradient penalty)
    would miss that dependence. For such layers ``input_grad`` is given: when a graph of the
    backward is built, this backward computes the input gradient itself, from the live
    weight, and the layer's own node gets no gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        output: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        inputs: Tensor,
        module: nn.Module,
        slot: GradSlot,
        batch_grads: BatchGrads,
        input_grad: InputGrad | None = None,
    ) -> Tensor:
        """Pass ``output`` through; ``inputs`` are saved for the fallback (as autograd saves the layer's)."""
        ctx.module, ctx.slot, ctx.batch_grads, ctx.input_grad = module, slot, batch_grads, input_grad
        ctx.save_for_backward(inputs)
        # An alias rather than a view: in-place ops on the result (ReLU(inplace=True)) stay allowed.
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        """The output's gradient passes through; weight and bias get the slot's gradients or computed ones."""
        (inputs,) = ctx.saved_tensors
        slot: GradSlot = ctx.slot
        weight_grad, bias_grad, inputs_grad, whole = slot.weight, slot.bias, slot.inputs, slot.whole_backward
        slot.weight = slot.bias = slot.inputs = None
        slot.whole_backward = False
        double_backward = torch.is_grad_enabled()
        if double_backward:
            weight_grad = bias_grad = None
        need_weight = ctx.needs_input_grad[1] and weight_grad is None
        need_bias = ctx.needs_input_grad[2] and bias_grad is None
        if need_weight or need_bias:
            computed_weight, computed_bias = ctx.batch_grads(ctx.module, inputs, grad_output, need_weight, need_bias)
            weight_grad = computed_weight if need_weight else weight_grad
            bias_grad = computed_bias if need_bias else bias_grad
        if double_backward:
            if ctx.input_grad is None:
                return grad_output, weight_grad, bias_grad, None, None, None, None, None
            inputs_grad = ctx.input_grad(ctx.module, inputs, grad_output) if ctx.needs_input_grad[3] else None
            return None, weight_grad, bias_grad, inputs_grad, None, None, None, None
        if whole:
            # The rule ran the layer's whole backward: its own node gets nothing.
            return (
                None,
                weight_grad,
                bias_grad,
                inputs_grad if ctx.needs_input_grad[3] else None,
                None,
                None,
                None,
                None,
            )
        return grad_output, weight_grad, bias_grad, None, None, None, None, None
