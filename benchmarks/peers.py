"""Per-example gradient squared norms computed by the peers: BackPACK, Opacus and ``torch.func``.

Every method is a *factory* ``(model, loss_fn) -> Step``. The step runs the forward and backward pass of a batch
with a mean-reduced loss, leaves the batch gradient in each parameter's ``.grad`` (so an optimizer can step), and
returns ``[N]`` squared norms ``|g_i|²`` of the per-example gradients ``g_i = ∇ℓ_i`` summed over all trainable
parameters, or ``None`` when it measures none. A mean loss hands the backward ``g_i / N``; each peer's output is
rescaled here so that all of them report ``|g_i|²``.

A peer that cannot handle a layer either raises (reported as *unsupported*) or skips the layer's parameters; a step
lists the parameters it did not cover in ``Step.skipped`` so that a wrong total is explained, and
:func:`exact_sq_norms` gives the reference to check against.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]
StepFn = Callable[[Tensor, Tensor], Tensor | None]


@dataclass
class Step:
    """What a method factory hands the harness.

    Attributes:
        fn: ``(inputs, targets) -> [N] squared norms or None``; runs forward and backward, fills ``.grad``.
        skipped: names of trainable parameters the method leaves out of its norms (filled by the first call).
        close: undoes what the factory attached to the model (hooks, wrappers), or ``None``.
        reference: the method whose step time this one is divided by (the same work without the
            measurement, e.g. the same micro-batches for a method that accumulates).
    """

    fn: StepFn
    skipped: list[str] = field(default_factory=list)
    close: Callable[[], None] | None = None
    reference: str = "plain"


MethodFactory = Callable[[nn.Module, LossFn], Step | StepFn]


def as_step(made: Step | StepFn) -> Step:
    """Wrap a bare step function returned by a factory into a :class:`Step`."""
    return made if isinstance(made, Step) else Step(made)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def plain(model: nn.Module, loss_fn: LossFn) -> Step:
    """The reference training step: forward and backward, no per-example quantity."""

    def fn(inputs: Tensor, targets: Tensor) -> None:
        loss_fn(model(inputs), targets).backward()

    return Step(fn)


def _per_example_grads_fn(
    model: nn.Module, loss_fn: LossFn
) -> Callable[[dict[str, Tensor], Tensor, Tensor], dict[str, Tensor]]:
    buffers = dict(model.named_buffers())

    def example_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        # A batch of one: the mean loss of that batch is the example's own loss ℓ_i (its tokens' mean).
        return loss_fn(functional_call(model, (params, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

    return vmap(grad(example_loss), in_dims=(None, 0, 0))


def _sq_norms(per_example: dict[str, Tensor]) -> Tensor:
    return torch.stack([g.pow(2).flatten(1).sum(1) for g in per_example.values()]).sum(0)


def torch_func(model: nn.Module, loss_fn: LossFn) -> Step:
    """``torch.func.vmap(grad(...))`` over ``functional_call``: every per-example gradient is materialised.

    The batch gradient is the mean of the per-example gradients, so no second backward pass is needed.
    """
    per_example_grads = _per_example_grads_fn(model, loss_fn)
    params = _trainable(model)

    def fn(inputs: Tensor, targets: Tensor) -> Tensor:
        grads = per_example_grads({n: p.detach() for n, p in params.items()}, inputs, targets)
        for name, p in params.items():
            p.grad = grads[name].mean(0)
        return _sq_norms(grads)

    return Step(fn)


def exact_sq_norms_per_param(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Reference per-parameter ``|g_i|²`` from ``torch.func`` in float64 on a copy of ``model``.

    Args:
        model: the model; it is not modified.
        loss_fn: mean-reduced ``(output, target) -> scalar`` loss.
        inputs: the batch's inputs (floating ones are promoted to float64).
        targets: the batch's targets.

    Returns:
        For each trainable parameter's name, ``[N]`` float64 squared norms of its per-example gradients.
    """
    reference = copy.deepcopy(model).double()
    per_example_grads = _per_example_grads_fn(reference, loss_fn)
    if inputs.is_floating_point():
        inputs = inputs.double()
    params = {n: p.detach() for n, p in _trainable(reference).items()}
    grads = per_example_grads(params, inputs, targets)
    return {name: g.pow(2).flatten(1).sum(1) for name, g in grads.items()}


def exact_sq_norms(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor) -> Tensor:
    """Reference ``[N]`` float64 ``|g_i|²`` over all trainable parameters; see :func:`exact_sq_norms_per_param`."""
    return torch.stack(list(exact_sq_norms_per_param(model, loss_fn, inputs, targets).values())).sum(0)


def backpack_batch_l2(model: nn.Module, loss_fn: LossFn) -> Step:
    """BackPACK's ``BatchL2Grad``: ``Σ_params param.batch_l2``, times ``N²`` to undo the mean.

    BackPACK extends ``model`` in place (hooks on every module). It has no rule for some layers (GroupNorm,
    LayerNorm, ``nn.MultiheadAttention`` in 1.7) and leaves their parameters without ``batch_l2``, with only a
    warning: the total then misses them. Those parameters are listed in ``Step.skipped``.
    """
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    extend(model)
    params = _trainable(model)
    step = Step(lambda x, y: None)

    def fn(inputs: Tensor, targets: Tensor) -> Tensor:
        n = inputs.shape[0]
        loss = loss_fn(model(inputs), targets)
        with warnings.catch_warnings():
            # BackPACK warns, once per module and per call, about every module it has no extension for.
            warnings.simplefilter("ignore", UserWarning)
            with backpack(BatchL2Grad()):
                loss.backward()
        covered, skipped = [], []
        for name, p in params.items():
            batch_l2 = getattr(p, "batch_l2", None)
            if batch_l2 is not None and batch_l2.shape == (n,):
                covered.append(batch_l2)
            else:
                skipped.append(name)
            if batch_l2 is not None:
                del p.batch_l2  # type: ignore[attr-defined]  # so that a later step cannot read a stale value
        step.skipped[:] = skipped
        if not covered:
            return torch.zeros(n, device=inputs.device)
        return torch.stack(covered).sum(0) * n**2

    step.fn = fn
    return step


def opacus_grad_sample(model: nn.Module, loss_fn: LossFn) -> Step:
    """Opacus ``GradSampleModule``: per-sample gradients ``p.grad_sample``, squared and summed.

    With ``loss_reduction="mean"`` Opacus multiplies the backprops by the batch size it infers per module, so
    ``grad_sample`` holds ``∇ℓ_i``. A parameter whose ``grad_sample`` does not lead with the batch size (Opacus
    takes the first dimension of a module's input as the batch, which a position embedding indexed by
    ``arange(T)`` does not have) is listed in ``Step.skipped``.
    """
    from opacus import GradSampleModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = _trainable(model)
    step = Step(lambda x, y: None, close=wrapped.remove_hooks)

    def fn(inputs: Tensor, targets: Tensor) -> Tensor:
        n = inputs.shape[0]
        with warnings.catch_warnings():
            # Full backward hooks warn when the input needs no gradient, i.e. at every first layer.
            warnings.simplefilter("ignore", UserWarning)
            loss_fn(wrapped(inputs), targets).backward()
        covered, skipped = [], []
        for name, p in params.items():
            grad_sample = getattr(p, "grad_sample", None)
            if grad_sample is not None and grad_sample.shape[0] == n:
                covered.append(grad_sample.pow(2).flatten(1).sum(1))
            else:
                skipped.append(name)
            # Opacus accumulates grad_sample across backward passes until it is cleared.
            p.grad_sample = None  # type: ignore[attr-defined]
        step.skipped[:] = skipped
        if not covered:
            return torch.zeros(n, device=inputs.device)
        return torch.stack(covered).sum(0)

    step.fn = fn
    return step


PEERS: dict[str, MethodFactory] = {
    "plain": plain,
    "backpack": backpack_batch_l2,
    "opacus": opacus_grad_sample,
    "torch_func": torch_func,
}
