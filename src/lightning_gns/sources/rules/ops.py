r"""Op-level norm rules: exact per-example norms for parameters that a module uses through tensor ops.

A module nobody registered a rule for (Hugging Face's ``Conv1D``, every RMSNorm variant, a
layer-scale gamma, a learned position parameter or class token) still uses its own parameters
through a handful of tensor ops. :class:`ParamOpCapture` is a
:class:`~torch.overrides.TorchFunctionMode` that the engine enters for the forward of such a
module only. It watches the ops that take one of the module's own parameters, records what each
needs, and hangs a hook on the op's output; when that output's gradient ``g`` arrives in
backward, the op's rule gives each example's gradient of the parameter:

==========================================  =====================================================
op                                          per-example gradient of the parameter
==========================================  =====================================================
``F.linear(x, W, b)``                       ``W``: :math:`\sum_t g_t x_t^T` (ghost norm, never
                                            built when used once); ``b``: :math:`\sum_t g_t`
``torch.addmm(b, x, W)``, ``x @ W``         ``W``: :math:`\sum_t x_t g_t^T`; ``b``: :math:`\sum_t g_t`
``x * p``, ``p * x`` (broadcast)            :math:`g \odot x`, summed over the broadcast dims
``x + p``, ``x - p``, ``p.expand(N, ...)``  :math:`\pm g`, summed over the broadcast dims
``F.embedding(ids, W)``                     the rows of ``g`` added into the ids' rows
``F.layer_norm``, ``F.rms_norm``            weight: :math:`g \odot \hat x` summed; bias: ``g`` summed
==========================================  =====================================================

A parameter first transformed on its own (``1 + w``, ``w.float()``, ``w.view(1, -1, 1, 1)``,
``w * 0.5``) is followed through those ops, and its gradient pulled back through them.

The batch is dim 0 of the module's first input (``N``). An operand counts as batched when it has
the op output's rank and ``N`` along dim 0; a matrix operand with ``N·T`` rows counts when it
is the module's own contiguous batch-first input flattened (``x.view(-1, K)``, as ``Conv1D``
does). Anything else that meets a watched parameter (an op without a rule, a batched-looking
parameter, an operand whose batch layout is not known) marks the call unsupported, and the
engine measures it with the :mod:`torch.func` fallback instead: never a silently wrong number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_gns._compat.autograd import as_non_view
from lightning_gns.sources.rules.embedding import embedding_ids_sq_norm
from lightning_gns.sources.rules.fallback import RngSnapshot
from lightning_gns.sources.rules.linear import accumulation_dtype, sum_outer_sq_norm, weighted_sum_sq

__all__ = ["OpCall", "ParamOpCapture"]

Pullback = Callable[[Tensor], Tensor]
"""Maps per-example gradients of a derived tensor, ``[N, *derived.shape]``, to those of its parameter."""


@dataclass(eq=False)
class _Use:
    """One use of a parameter by one op: how to get its per-example gradient from the op's output gradient."""

    name: str
    pullback: Pullback | None
    # (grad_output, record) -> [N, *derived.shape] per-example gradient of the tensor the op used.
    per_example: Callable[[Tensor], Tensor]
    # (grad_output, weight or None) -> [N] squared norm without building the gradient; None where there is none.
    sq_norm: Callable[[Tensor, Tensor | None], Tensor] | None = None


@dataclass(eq=False)
class _Record:
    """One hooked op output and the parameter uses it carries."""

    uses: list[_Use]
    device_type: str = "cpu"
    grad: Tensor | None = None


@dataclass(eq=False)
class OpCall:
    """The parameter uses of one module call, filled with their output gradients during backward.

    Attributes:
        batch_size: ``N``.
        records: the hooked op outputs, in forward order.
        param_shapes: each watched parameter's shape, by name.
        on_complete: called once every record has its gradient (set by the engine).
    """

    batch_size: int
    records: list[_Record] = field(default_factory=list)
    param_shapes: dict[str, torch.Size] = field(default_factory=dict)
    on_start: Callable[[OpCall], None] | None = None
    on_complete: Callable[[OpCall], None] | None = None
    fired: int = 0

    @property
    def device_type(self) -> str:
        """The device type of the recorded ops (of their gradients once they arrive)."""
        for record in self.records:
            if record.grad is not None:
                return record.grad.device.type
        return self.records[0].device_type if self.records else "cpu"

    @property
    def started(self) -> bool:
        """Whether at least one gradient arrived."""
        return self.fired > 0

    @property
    def complete(self) -> bool:
        """Whether every record has its gradient."""
        return self.fired == len(self.records)

    def receive(self, record: _Record, grad_output: Tensor) -> None:
        """Keep one op output's gradient; hand the call on once all have arrived."""
        first = self.fired == 0
        if record.grad is None:
            self.fired += 1
        record.grad = grad_output.detach()
        if first and self.on_start is not None:
            self.on_start(self)
        if self.complete and self.on_complete is not None:
            self.on_complete(self)

    def _uses_by_param(self) -> dict[str, list[tuple[_Use, Tensor]]]:
        by_param: dict[str, list[tuple[_Use, Tensor]]] = {}
        for record in self.records:
            if record.grad is not None:
                for use in record.uses:
                    by_param.setdefault(use.name, []).append((use, record.grad))
        return by_param

    def per_example_grads(self, names: Collection[str] | None = None) -> dict[str, Tensor]:
        """Each used parameter's per-example gradient, ``{name: [N, *param.shape]}``, summed over its uses.

        Args:
            names: build only these parameters' (default: all used).
        """
        grads: dict[str, Tensor] = {}
        for name, uses in self._uses_by_param().items():
            if names is not None and name not in names:
                continue
            total = None
            for use, grad_output in uses:
                value = use.per_example(grad_output)
                if use.pullback is not None:
                    value = use.pullback(value)
                value = value.reshape(self.batch_size, *self.param_shapes[name])
                total = value if total is None else total + value
            assert total is not None  # every listed parameter has a use
            grads[name] = total
        return grads

    def sq_norm(self, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """``[N]`` squared norms over the used parameters, optionally weighted entrywise (by parameter name)."""
        total: Tensor | None = None
        materialise: dict[str, list[tuple[_Use, Tensor]]] = {}
        for name, uses in self._uses_by_param().items():
            (use, grad_output), *rest = uses
            if not rest and use.pullback is None and use.sq_norm is not None:
                weight = None if weights is None else weights.get(name)
                part = use.sq_norm(grad_output, weight)
                total = part if total is None else total + part.to(total.dtype)
            else:
                materialise[name] = uses
        if materialise:
            for name, grad in self.per_example_grads(materialise).items():
                dtype = accumulation_dtype(grad)
                weight = None if weights is None or name not in weights else weights[name].to(dtype)
                part = weighted_sum_sq(grad.to(dtype), weight)
                total = part if total is None else total + part.to(total.dtype)
        if total is None:
            raise RuntimeError("No gradient reached any use of the module's parameters.")
        return total


class _Unsupported(Exception):
    """An op met a watched parameter in a way no rule covers."""


_CASTS = frozenset({"float", "double", "half", "bfloat16", "to", "type_as", "contiguous", "clone"})
_RESHAPES = frozenset({"view", "reshape", "unsqueeze", "squeeze", "flatten", "view_as", "reshape_as"})
_ELEMENTWISE = frozenset({"mul", "__mul__", "__rmul__", "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__"})
_IN_PLACE = frozenset({"mul_", "add_", "sub_", "__imul__", "__iadd__", "__isub__"})
_MATMULS = frozenset({"matmul", "__matmul__", "mm"})
# Functions that draw random numbers (the torch.func fallback must then replay the generator's state).
_RANDOM = frozenset(
    {
        "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
        "feature_dropout", "native_dropout", "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like",
        "randint", "randint_like", "randperm", "normal", "normal_", "uniform_", "exponential_", "multinomial",
    }
)  # fmt: skip


def _first_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


class ParamOpCapture(TorchFunctionMode):
    """Watch the ops that use a module's own parameters during one forward call.

    Args:
        params: the parameters to watch, by name relative to the module.
        batch_size: ``N``, the number of examples (dim 0 of the module's input).
        batch_input: the module's first positional tensor input (for recognising its flattened rows), or ``None``.

    After the forward, :attr:`unsupported` says why the call cannot be measured op by op (``None`` when it
    can), and :attr:`call` holds the recorded uses.

    Example::

        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> x = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
        >>> with ParamOpCapture({"w": w}, batch_size=2, batch_input=x) as capture:
        ...     y = x * (1 + w)
        >>> y.sum().backward()
        >>> capture.unsupported is None, capture.call.sq_norm()  # example i's gradient of w is x_i
        (True, tensor([2., 9.]))
    """

    def __init__(self, params: Mapping[str, Tensor], batch_size: int, batch_input: Tensor | None) -> None:
        super().__init__()
        self.call = OpCall(batch_size, param_shapes={name: p.shape for name, p in params.items()})
        self.unsupported: str | None = None
        # The generator state before the forward's first random op, for a replay by the torch.func fallback.
        self.rng: RngSnapshot | None = None
        self._batch_input = batch_input
        # id -> (parameter name, pullback or None): the parameters, and tensors derived from them alone.
        self._watched: dict[int, tuple[str, Pullback | None]] = {id(p): (name, None) for name, p in params.items()}
        self._alive: list[Tensor] = []  # derived tensors stay alive so their ids are not reused

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.rng is None and name in _RANDOM:
            self.rng = RngSnapshot.take(_first_device(args, kwargs))
        if self.unsupported is not None or not torch.is_grad_enabled() or not self._touches_watched(args, kwargs):
            return func(*args, **kwargs)
        try:
            return self._dispatch(name, func, args, kwargs)
        except _Unsupported as reason:
            self.unsupported = str(reason)
            return func(*args, **kwargs)

    # ------------------------------------------------------------------ classification

    def _touches_watched(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        watched = self._watched
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor):
                if id(value) in watched:
                    return True
            elif isinstance(value, list | tuple) and any(isinstance(v, Tensor) and id(v) in watched for v in value):
                return True
        return False

    def _watched_of(self, value: Any) -> tuple[str, Pullback | None] | None:
        return self._watched.get(id(value)) if isinstance(value, Tensor) else None

    def _batched(self, value: Any, rank: int) -> bool:
        n = self.call.batch_size
        return isinstance(value, Tensor) and value.dim() == rank and rank > 0 and value.shape[0] == n

    def _derive(self, result: Tensor, name: str, pullback: Pullback) -> Tensor:
        self._watched[id(result)] = (name, pullback)
        self._alive.append(result)
        return result

    def _hook(self, result: Tensor, uses: list[_Use]) -> Tensor:
        if not result.requires_grad:
            return result
        # A hook on a view is lost when a later in-place op rebases it; an alias that is not a view keeps it.
        result = as_non_view(result)
        record = _Record(uses, result.device.type)
        self.call.records.append(record)
        call = self.call
        result.register_hook(lambda grad: call.receive(record, grad))
        return result

    # ------------------------------------------------------------------ ops

    def _dispatch(self, name: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name == "linear":
            return self._linear(func, args, kwargs)
        if name == "addmm" or name in _MATMULS:
            return self._addmm(name, func, args, kwargs)
        if name == "embedding":
            return self._embedding(func, args, kwargs)
        if name in ("layer_norm", "rms_norm"):
            return self._norm_affine(name, func, args, kwargs)
        if name in ("expand", "expand_as"):
            return self._expand(func, args, kwargs)
        if name in _CASTS or name in _RESHAPES or name in ("t", "transpose", "neg", "__neg__", "div", "__truediv__"):
            return self._unary(name, func, args, kwargs)
        if name in _ELEMENTWISE or name in _IN_PLACE:
            return self._elementwise(name, func, args, kwargs)
        raise _Unsupported(f"`{name}` takes a parameter and has no op-level rule")

    def _unary(self, name: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        source = self._watched_of(args[0])
        if source is None or any(self._watched_of(v) for v in (*args[1:], *kwargs.values())):
            raise _Unsupported(f"`{name}` uses a parameter in a position no rule covers")
        if name in ("div", "__truediv__") and (len(args) != 2 or kwargs or isinstance(args[1], Tensor)):
            raise _Unsupported("a parameter divided by a tensor has no op-level rule")
        param, pullback = source
        tensor = args[0]
        result = func(*args, **kwargs)
        if not isinstance(result, Tensor) or (name == "to" and result.device != tensor.device):
            raise _Unsupported(f"`{name}` moved a parameter")
        n, shape = self.call.batch_size, tuple(tensor.shape)
        if name in _CASTS:
            local: Pullback = _identity
        elif name in _RESHAPES:

            def local(g: Tensor) -> Tensor:
                return g.reshape(n, *shape)
        elif name in ("neg", "__neg__"):
            local = _negate
        elif name in ("div", "__truediv__"):
            divisor = float(args[1])

            def local(g: Tensor) -> Tensor:
                return g / divisor
        else:  # t, transpose: swap the same dims back (shifted by the batch dim)
            dims = (0, 1) if name == "t" else tuple(int(d) % max(tensor.dim(), 1) for d in args[1:3])

            def local(g: Tensor) -> Tensor:
                return g.transpose(dims[0] + 1, dims[1] + 1) if tensor.dim() > 1 else g

        return self._derive(result, param, _compose(local, pullback))

    def _elementwise(self, name: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) != 2 or set(kwargs) - {"alpha"}:
            raise _Unsupported(f"`{name}` with these arguments has no op-level rule")
        first, second = self._watched_of(args[0]), self._watched_of(args[1])
        if first is not None and second is not None:
            raise _Unsupported(f"`{name}` of two parameters has no op-level rule")
        param_first = first is not None
        param, pullback = first if first is not None else second  # type: ignore[misc]
        tensor, other = (args[0], args[1]) if param_first else (args[1], args[0])
        in_place = name in _IN_PLACE
        if in_place and param_first:
            raise _Unsupported("an in-place op on a parameter has no op-level rule")
        is_mul = "mul" in name
        # The factor of the parameter's term: a + alpha·b, a - alpha·b, and __rsub__(a, b) = b - a.
        alpha = float(kwargs.get("alpha", 1))
        if is_mul:
            scale = 1.0
        elif name == "__rsub__":
            scale = -1.0 if param_first else 1.0
        elif "sub" in name:
            scale = 1.0 if param_first else -alpha
        else:
            scale = 1.0 if param_first else alpha
        # An in-place product overwrites the operand the parameter's gradient needs.
        factor = other.detach().clone() if in_place and is_mul and isinstance(other, Tensor) else other
        if isinstance(factor, Tensor):
            factor = factor.detach()
        result = func(*args, **kwargs)
        rank, n, shape = result.dim(), self.call.batch_size, tuple(tensor.shape)
        # With a batch of one, an operand of the output's rank and dim 0 of size one is the batch itself.
        other_batched = isinstance(other, Tensor) and other.dim() == rank and rank > 0 and other.shape[0] == n

        def term(g: Tensor) -> Tensor:
            dtype = accumulation_dtype(g)
            value = g.to(dtype) * factor.to(dtype) if is_mul and isinstance(factor, Tensor) else g.to(dtype)
            if is_mul and not isinstance(factor, Tensor):
                value = value * factor
            return _sum_to_example(value * scale if scale != 1 else value, n, shape)

        if not other_batched:
            if in_place:
                raise _Unsupported("an in-place op of a parameter on a shared tensor has no op-level rule")
            # The parameter combined with something every example shares: still a tensor of the parameter alone.
            return self._derive(result, param, _compose(term, pullback))
        if len(shape) == rank and shape[0] == n and n > 1:
            raise _Unsupported("a parameter with the batch size along dim 0 is not broadcast over the examples")
        return self._hook(result, [_Use(param, pullback, term)])

    def _expand(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        source = self._watched_of(args[0])
        if source is None:
            raise _Unsupported("`expand` uses a parameter in a position no rule covers")
        param, pullback = source
        tensor = args[0]
        result = func(*args, **kwargs)
        n, shape = self.call.batch_size, tuple(tensor.shape)
        if result.dim() == 0 or result.shape[0] != n or (tensor.dim() == result.dim() and tensor.shape[0] != 1):
            if result.dim() > 0 and result.shape[0] == n and n > 1:
                raise _Unsupported("a parameter expanded along a batch-sized dim it already has")

            def local(g: Tensor) -> Tensor:
                return _sum_to_example(g, n, shape)

            return self._derive(result, param, _compose(local, pullback))

        def per_example(g: Tensor) -> Tensor:
            return _sum_to_example(g.to(accumulation_dtype(g)), n, shape)

        return self._hook(result, [_Use(param, pullback, per_example)])

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as ``[N, T, K]``: batch-first, or the module's own contiguous input flattened to rows."""
        n = self.call.batch_size
        if x.dim() >= 2 and x.shape[0] == n:
            return x.reshape(n, -1, x.shape[-1])
        source = self._batch_input
        flattened = (
            x.dim() == 2
            and source is not None
            and source.dim() >= 2
            and source.shape[0] == n
            and source.is_contiguous()
            and x.is_contiguous()
            and x.data_ptr() == source.data_ptr()
            and x.numel() == source.numel()
        )
        if not flattened:
            raise _Unsupported(
                f"a parameter multiplies a [{', '.join(map(str, x.shape))}] input whose batch layout is not the "
                "module's batch-first input"
            )
        return x.reshape(n, -1, x.shape[-1])

    def _linear(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        names = ("input", "weight", "bias")
        bound = dict(zip(names, args, strict=False)) | kwargs
        x, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
        if self._watched_of(x) is not None or not isinstance(x, Tensor) or not isinstance(weight, Tensor):
            raise _Unsupported("`linear` uses a parameter as its input")
        result = func(*args, **kwargs)
        rows = self._rows(x).detach()
        uses = []
        weight_source = self._watched_of(weight)
        if weight_source is not None:
            uses.append(_outer_use(weight_source, rows, transposed=False))
        bias_source = self._watched_of(bias)
        if bias_source is not None:
            if not isinstance(bias, Tensor) or bias.dim() != 1:
                raise _Unsupported("`linear` with a bias that is not a vector")
            uses.append(_bias_use(bias_source, self.call.batch_size))
        return self._hook(result, uses)

    def _addmm(self, name: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name == "addmm":
            if len(args) != 3 or set(kwargs) - {"beta", "alpha"} or kwargs.get("beta", 1) != 1:
                raise _Unsupported("`addmm` with these arguments has no op-level rule")
            bias, x, weight = args
            alpha = kwargs.get("alpha", 1)
        else:
            if len(args) != 2 or kwargs:
                raise _Unsupported(f"`{name}` with these arguments has no op-level rule")
            bias, (x, weight), alpha = None, args, 1
        if self._watched_of(x) is not None or not isinstance(weight, Tensor) or weight.dim() != 2:
            raise _Unsupported(f"`{name}` uses a parameter on the left")
        result = func(*args, **kwargs)
        rows = self._rows(x).detach()
        uses = []
        weight_source = self._watched_of(weight)
        if weight_source is not None:
            uses.append(_outer_use(weight_source, rows, transposed=True, scale=float(alpha)))
        bias_source = self._watched_of(bias)
        if bias_source is not None:
            if not isinstance(bias, Tensor) or bias.dim() != 1:
                raise _Unsupported("`addmm` with a bias that is not a vector")
            uses.append(_bias_use(bias_source, self.call.batch_size))
        return self._hook(result, uses)

    def _embedding(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = dict(zip(names, args, strict=False)) | kwargs
        ids, weight = bound.get("input"), bound.get("weight")
        source = self._watched_of(weight)
        n = self.call.batch_size
        if source is None or source[1] is not None or not isinstance(ids, Tensor) or not isinstance(weight, Tensor):
            raise _Unsupported("`embedding` uses a parameter in a position no rule covers")
        if ids.dim() == 0 or ids.shape[0] != n or bound.get("max_norm") is not None:
            raise _Unsupported("`embedding` of ids that are not batch-first (or with max_norm)")
        result = func(*args, **kwargs)
        ids = ids.detach()
        padding_idx = bound.get("padding_idx")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        by_freq = bool(bound.get("scale_grad_by_freq", False))
        vocab, dim = int(weight.shape[0]), int(weight.shape[1])

        def sq_norm(g: Tensor, w: Tensor | None) -> Tensor:
            return embedding_ids_sq_norm(ids, g, vocab, padding_idx, by_freq, w)

        def per_example(g: Tensor) -> Tensor:
            dtype = accumulation_dtype(g)
            flat_ids = ids.reshape(n, -1)
            grad = g.reshape(n, -1, dim).to(dtype)
            if padding_idx is not None:
                grad = grad * (flat_ids != padding_idx).unsqueeze(-1)
            if by_freq:
                counts = torch.bincount(flat_ids.reshape(-1), minlength=vocab).to(dtype)
                grad = grad / counts[flat_ids].unsqueeze(-1)
            table = grad.new_zeros(n, vocab, dim)
            return table.scatter_add_(1, flat_ids.unsqueeze(-1).expand(-1, -1, dim), grad)

        return self._hook(result, [_Use(source[0], None, per_example, sq_norm)])

    def _norm_affine(self, name: str, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        names: tuple[str, ...] = ("input", "normalized_shape", "weight", "bias", "eps")
        if name == "rms_norm":
            names = ("input", "normalized_shape", "weight", "eps")
        bound = dict(zip(names, args, strict=False)) | kwargs
        x = bound.get("input")
        if not isinstance(x, Tensor) or self._watched_of(x) is not None:
            raise _Unsupported(f"`{name}` normalises a parameter")
        n = self.call.batch_size
        if x.dim() < 2 or x.shape[0] != n:
            raise _Unsupported(f"`{name}` of an input that is not batch-first")
        result = func(*args, **kwargs)
        shape = tuple(bound["normalized_shape"]) if not isinstance(bound["normalized_shape"], int) else None
        shape = shape if shape is not None else (int(bound["normalized_shape"]),)
        eps = bound.get("eps")
        saved = x.detach()

        def normalised(dtype: torch.dtype) -> Tensor:
            if name == "layer_norm":
                return F.layer_norm(saved.to(dtype), shape, eps=1e-5 if eps is None else eps)
            return F.rms_norm(saved.to(dtype), shape, eps=eps)

        uses = []
        weight, bias = bound.get("weight"), bound.get("bias")
        weight_source, bias_source = self._watched_of(weight), self._watched_of(bias)
        if weight_source is not None and isinstance(weight, Tensor):
            w_shape = tuple(weight.shape)

            def weight_grad(g: Tensor) -> Tensor:
                dtype = accumulation_dtype(g)
                return _sum_to_example(g.to(dtype) * normalised(dtype), n, w_shape)

            uses.append(_Use(weight_source[0], weight_source[1], weight_grad))
        if bias_source is not None and isinstance(bias, Tensor):
            b_shape = tuple(bias.shape)

            def bias_grad(g: Tensor) -> Tensor:
                return _sum_to_example(g.to(accumulation_dtype(g)), n, b_shape)

            uses.append(_Use(bias_source[0], bias_source[1], bias_grad))
        if not uses:
            raise _Unsupported(f"`{name}` uses a parameter in a position no rule covers")
        return self._hook(result, uses)


def _outer_use(source: tuple[str, Pullback | None], rows: Tensor, transposed: bool, scale: float = 1.0) -> _Use:
    """The weight of ``x Wᵀ`` (``linear``) or ``x W`` (``addmm``, ``matmul``): per example ``Σ_t g_t x_tᵀ``."""
    name, pullback = source
    n = rows.shape[0]

    def grad_rows(g: Tensor) -> tuple[Tensor, Tensor]:
        dtype = accumulation_dtype(g)
        return g.reshape(n, -1, g.shape[-1]).to(dtype), rows.to(dtype)

    def per_example(g: Tensor) -> Tensor:
        grads, acts = grad_rows(g)
        outer = torch.bmm(acts.transpose(1, 2), grads) if transposed else torch.bmm(grads.transpose(1, 2), acts)
        return outer * scale if scale != 1 else outer

    def sq_norm(g: Tensor, weight: Tensor | None) -> Tensor:
        grads, acts = grad_rows(g)
        if weight is not None:
            weight = weight.t() if transposed else weight
        value = sum_outer_sq_norm(grads, acts, weight)
        return value * scale**2 if scale != 1 else value

    return _Use(name, pullback, per_example, sq_norm if pullback is None else None)


def _bias_use(source: tuple[str, Pullback | None], n: int) -> _Use:
    def per_example(g: Tensor) -> Tensor:
        return g.reshape(n, -1, g.shape[-1]).to(accumulation_dtype(g)).sum(1)

    def sq_norm(g: Tensor, weight: Tensor | None) -> Tensor:
        summed = per_example(g)
        return weighted_sum_sq(summed, None if weight is None else weight.to(summed.dtype))

    return _Use(source[0], source[1], per_example, sq_norm if source[1] is None else None)


def _sum_to_example(value: Tensor, n: int, shape: tuple[int, ...]) -> Tensor:
    """Sum ``[N, *out]`` over the dims a tensor of ``shape`` was broadcast along, giving ``[N, *shape]``.

    ``shape`` is right-aligned with the output, whose dim 0 is the batch.
    """
    rank = value.dim()
    if len(shape) == rank and rank > 0:
        if shape[0] != 1 and shape[0] != n:
            raise ValueError(f"Expected dim 0 of {shape} to be 1 or {n}.")
        inner = shape[1:]
    else:
        inner = shape
    target = (n, *([1] * (rank - 1 - len(inner))), *inner)
    return value.sum_to_size(target).reshape(n, *shape) if math.prod(shape) else value.new_zeros(n, *shape)


def _identity(g: Tensor) -> Tensor:
    return g


def _negate(g: Tensor) -> Tensor:
    return -g


def _compose(local: Pullback, outer: Pullback | None) -> Pullback:
    if outer is None:
        return local
    return lambda g: outer(local(g))
