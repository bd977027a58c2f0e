"""The generic fallback: per-example gradients of any module with :mod:`torch.func`.

For a module without a norm rule, the engine keeps the inputs of each call and the
gradient that flows into its outputs, and replays the module's own forward one example
at a time under :func:`torch.func.vmap`: the vector-Jacobian product of example ``i``'s
output with its output gradient, taken with respect to the module's parameters, is that
example's gradient. This materialises per-example gradients, so it costs memory
``N × (number of parameters)``: a norm rule is always cheaper.

The batch dimension is 0 for every output and for the positional tensor arguments whose
first dimension matches the first one's (the others, like keyword tensors, are shared by
all examples: a shared ``[T, T]`` mask with ``T = N`` would be mistaken for a batched one).
:class:`torch.nn.MultiheadAttention` is special-cased: its ``batch_first=False`` layout,
``key_padding_mask`` and 3-D ``attn_mask`` are batched.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns._compat.pytree import tree_leaves
from lightning_gns.sources.rules.linear import param_weight, weighted_sum_sq


@dataclass(frozen=True)
class BatchLayout:
    """Where the batch dimension sits in a module call's arguments and outputs.

    Attributes:
        args: positional arguments, with batched tensors reshaped as needed.
        kwargs: keyword arguments, likewise.
        arg_dims: the batch dim of each batched positional argument, by position.
        kwarg_dims: the batch dim of each batched keyword argument, by name.
        output_dims: the batch dim of each output tensor, in ``tree_leaves`` order.
        pre_shaped: names of keyword arguments whose per-example slice already has the
            batch-of-one layout that the module expects (no ``unsqueeze`` in the replay).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    arg_dims: dict[int, int]
    kwarg_dims: dict[str, int]
    output_dims: tuple[int, ...]
    pre_shaped: frozenset[str] = field(default_factory=frozenset)

    @property
    def batch_size(self) -> int:
        """The number of examples, read from the first batched argument."""
        for index, dim in self.arg_dims.items():
            return int(self.args[index].shape[dim])
        for name, dim in self.kwarg_dims.items():
            return int(self.kwargs[name].shape[dim])
        raise ValueError("The call has no batched tensor argument, so it has no examples to measure.")


def batch_layout(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], num_outputs: int) -> BatchLayout:
    """Find the batch dimension of a module call's arguments and outputs.

    Args:
        module: the module that was called.
        args: its positional arguments.
        kwargs: its keyword arguments.
        num_outputs: how many tensors its output holds.

    Returns:
        The layout that :func:`per_example_grads` replays the call with.

    Raises:
        ValueError: if a :class:`~torch.nn.MultiheadAttention` got unbatched inputs.

    Example::

        >>> layout = batch_layout(nn.Linear(3, 2), (torch.zeros(5, 3),), {}, num_outputs=1)
        >>> layout.arg_dims, layout.batch_size
        ({0: 0}, 5)
    """
    if isinstance(module, nn.MultiheadAttention):
        return _multihead_attention_layout(module, args, kwargs, num_outputs)
    tensors = [(i, value) for i, value in enumerate(args) if isinstance(value, Tensor) and value.dim() > 0]
    # The first tensor argument sets N; a later one of another length (a shared mask) is not batched.
    batch = tensors[0][1].shape[0] if tensors else None
    arg_dims = {i: 0 for i, value in tensors if value.shape[0] == batch}
    return BatchLayout(args, dict(kwargs), arg_dims, {}, (0,) * num_outputs)


def _multihead_attention_layout(
    module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any], num_outputs: int
) -> BatchLayout:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    named = dict(bound.arguments)
    query = named["query"]
    if query.dim() != 3:
        raise ValueError(
            f"Per-example norms need batched attention inputs, but MultiheadAttention got a query of shape "
            f"{tuple(query.shape)}. Feed [N, L, E] (batch_first=True) or [L, N, E] tensors."
        )
    seq_dim = 0 if module.batch_first else 1
    kwarg_dims = {name: seq_dim for name in ("query", "key", "value")}
    pre_shaped: set[str] = set()
    if isinstance(named.get("key_padding_mask"), Tensor):
        kwarg_dims["key_padding_mask"] = 0
    attn_mask = named.get("attn_mask")
    if isinstance(attn_mask, Tensor) and attn_mask.dim() == 3:
        # A 3-D mask is [N·heads, L, S]: split the batch out so each example keeps its heads.
        batch = int(query.shape[seq_dim])
        named["attn_mask"] = attn_mask.reshape(batch, -1, *attn_mask.shape[1:])
        kwarg_dims["attn_mask"] = 0
        pre_shaped.add("attn_mask")
    return BatchLayout((), named, {}, kwarg_dims, (seq_dim, 0)[:num_outputs], frozenset(pre_shaped))


@dataclass(frozen=True)
class RngSnapshot:
    """The random generators' state at one point of a forward, to replay its random ops (dropout masks).

    Under :func:`torch.func.vmap` with ``randomness="different"``, a random op on one example's slice draws
    the batch's numbers in one go, in the same order as the batched op: restoring the state the forward's
    first random op started from gives the replay the forward's own masks.
    """

    cpu: Tensor
    device: torch.device
    device_state: Tensor | None

    @classmethod
    def take(cls, device: torch.device) -> RngSnapshot:
        """The CPU generator's state, and that of ``device``'s generator when it is a CUDA device."""
        state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, state)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run with the generators set to this state; their state before is put back afterwards."""
        devices = [self.device] if self.device_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.set_rng_state(self.cpu)
            if self.device_state is not None:
                torch.cuda.set_rng_state(self.device_state, self.device)
            yield


def per_example_grads(
    module: nn.Module,
    params: dict[str, Tensor],
    layout: BatchLayout,
    grad_outputs: Sequence[Tensor | None],
    randomness: str = "error",
    outputs: Sequence[Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-example gradients of some of a module's parameters, by replaying its forward per example.

    Args:
        module: the module.
        params: the parameters to differentiate, by their name relative to ``module``.
        layout: the call's arguments and batch dims, from :func:`batch_layout`.
        grad_outputs: the gradient that flowed into each output tensor (``None`` where none did).
        randomness: :func:`torch.func.vmap`'s treatment of random ops: ``"error"``, or ``"different"`` to
            replay them (with the generators set to the state the forward drew from, see :class:`RngSnapshot`).
        outputs: the output tensors the forward returned (batch dim 0), to check the replay against: a replay
            that computes other outputs (other dropout masks) raises instead of giving wrong gradients.

    Returns:
        ``{name: Tensor[N, *param.shape]}``.

    Raises:
        RuntimeError: if the replayed outputs differ from ``outputs``.

    Example::

        >>> layer = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> layout = batch_layout(layer, (x,), {}, num_outputs=1)
        >>> per_example_grads(layer, dict(layer.named_parameters()), layout, [torch.ones(2, 1)])["weight"]
        tensor([[[1., 2.]],
        <BLANKLINE>
                [[3., 4.]]])
    """
    # Everything else is detached so the replay builds no graph outside torch.func's own.
    frozen = {name: value.detach() for name, value in module.named_parameters()}
    frozen.update({name: value.detach() for name, value in module.named_buffers()})
    wanted = {name: value.detach() for name, value in params.items()}
    batched_args = {str(i): layout.args[i] for i in layout.arg_dims}
    batched_kwargs = {name: layout.kwargs[name] for name in layout.kwarg_dims}
    given = {i: g for i, g in enumerate(grad_outputs) if g is not None}
    output_dims = {i: layout.output_dims[i] for i in given}

    def example_dot(
        weights: dict[str, Tensor], args_i: dict[str, Tensor], kwargs_i: dict[str, Tensor], grads_i: dict[int, Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        args = list(layout.args)
        for key, value in args_i.items():
            args[int(key)] = value.unsqueeze(layout.arg_dims[int(key)])
        kwargs = dict(layout.kwargs)
        for name, value in kwargs_i.items():
            kwargs[name] = value if name in layout.pre_shaped else value.unsqueeze(layout.kwarg_dims[name])
        output = functional_call(module, {**frozen, **weights}, tuple(args), kwargs)
        leaves = [leaf for leaf in tree_leaves(output) if isinstance(leaf, Tensor)]
        total = torch.zeros((), dtype=torch.float32, device=leaves[0].device)
        for index, grad_i in grads_i.items():
            total = total + (leaves[index].float() * grad_i.unsqueeze(output_dims[index]).float()).sum()
        return total, [leaf.detach() for leaf in leaves]

    in_dims = (None, {k: layout.arg_dims[int(k)] for k in batched_args}, dict(layout.kwarg_dims), output_dims)
    per_example = vmap(grad(example_dot, has_aux=True), in_dims=in_dims, randomness=randomness)
    with warnings.catch_warnings():
        # vmap loops over ops it has no batching rule for (e.g. CPU flash attention) and says so on every
        # call; the fallback's cost is already announced once per module type.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        grads, replayed = per_example(wanted, batched_args, batched_kwargs, given)
    if outputs is not None:
        _check_replay(replayed, outputs, layout.output_dims)
    return grads


def _check_replay(replayed: Sequence[Tensor], outputs: Sequence[Tensor], output_dims: Sequence[int]) -> None:
    for index, (again, original) in enumerate(zip(replayed, outputs, strict=False)):
        if output_dims[index] != 0:
            continue
        again = again.reshape(original.shape).to(original.dtype)
        scale = original.abs().max().item() if original.numel() else 0.0
        if not torch.allclose(again, original, rtol=1e-3, atol=1e-3 * scale + 1e-12):
            raise RuntimeError(
                "its replay computed other outputs than the forward (its random ops drew other numbers, e.g. "
                "dropout on a layout whose batch dim is not first)."
            )


def sq_norm_of_grads(grads: dict[str, Tensor], weights: Mapping[str, Tensor] | None = None) -> Tensor:
    """Sum of squared entries of per-example gradients, per example, optionally weighted entrywise.

    Args:
        grads: ``{name: Tensor[N, ...]}``, as :func:`per_example_grads` returns.
        weights: ``{name: Tensor[...]}``, the weight of each squared entry (a preconditioner's :math:`P^2`, the
            parameter's shape); a name without one has weight 1.

    Returns:
        ``[N]`` squared norms, in float32 (float64 if the gradients are float64).

    Example::

        >>> sq_norm_of_grads({"w": torch.ones(2, 3), "scale": torch.ones(2)})  # a scalar parameter gives [N]
        tensor([4., 4.])
        >>> sq_norm_of_grads({"w": torch.ones(2, 3)}, {"w": torch.tensor([1.0, 0.0, 2.0])})
        tensor([3., 3.])
    """
    values = list(grads.values())
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    total = values[0].new_zeros(values[0].shape[0], dtype=dtype)
    for name, value in grads.items():
        total = total + weighted_sum_sq(value.to(dtype), param_weight(weights, name, dtype))
    return total
