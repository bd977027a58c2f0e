"""Norm rule for :class:`torch.nn.MultiheadAttention`.

MultiheadAttention is four linear maps around an attention core: the q/k/v input
projections (rows of ``in_proj_weight``, or three separate weights) and ``out_proj``,
whose weight the module uses without calling ``out_proj``. Each is measured with the
linear ghost-norm kernel, which needs each map's input and output gradient: the inputs
are the projections' inputs and the attention output ``ctx``; the output gradients are
those of the projected ``q, k, v`` and of the module's output. Examples never mix inside
attention, so batched gradients hold every example's own; nothing is replayed per example.

Two ways to get ``ctx`` and the projections' gradients:

- :class:`MultiheadAttentionCapture`, the fast one: a :class:`~torch.overrides.TorchFunctionMode`
  active only during the module's forward runs ``F.multi_head_attention_forward`` itself with
  the same operations (projections, :func:`~torch.nn.functional.scaled_dot_product_attention`
  with the module's masks and dropout, output projection) and keeps the intermediate tensors,
  so the real backward hands over their gradients: no recomputation, and attention dropout is
  measured exactly, as is a gradient that flows through the returned attention weights. It
  covers every call without ``add_bias_kv``/``add_zero_attn`` and hands those back to PyTorch
  untouched.
- :func:`multihead_attention_sq_norm`, the registered rule, for calls that ran without a
  capture: it recomputes the projections and the attention core from the saved inputs,
  batched, and backpropagates the output gradient through them once. It returns ``None``
  (the engine then replays the module with :mod:`torch.func`) for ``add_bias_kv``,
  ``add_zero_attn``, attention dropout in training mode, or a gradient through the returned
  attention weights.

Both honour masks (``attn_mask``, ``key_padding_mask``, ``is_causal``), ``batch_first`` either
way, ``kdim``/``vdim``, biases on or off, frozen parts, and elementwise weights on the squared
gradient entries (a preconditioner's :math:`P^2`, by parameter name: ``in_proj_weight`` or
``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), with which the
sequence kernels materialise the per-example projection gradients.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_gns._compat.nn import mha_shape_check
from lightning_gns.sources.rules.linear import accumulation_dtype, param_weight, sum_outer_sq_norm, weighted_sum_sq

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_FUNCTIONAL_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def multihead_attention_sq_norm(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_outputs: Sequence[Tensor | None],
    *,
    weights: Mapping[str, Tensor] | None = None,
) -> Tensor | None:
    """Per-example squared gradient norm of a :class:`torch.nn.MultiheadAttention` call, by recomputation.

    Args:
        module: the attention layer.
        args: the positional arguments of the call.
        kwargs: the keyword arguments of the call.
        grad_outputs: the gradients of ``(attn_output, attn_weights)``; ``None`` where none flowed.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable parameters, or ``None`` when the call
        uses a feature this rule does not cover (see the module docstring).

    Raises:
        TypeError: if ``module`` is not a MultiheadAttention.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> mha = nn.MultiheadAttention(4, 2, batch_first=True)
        >>> x = torch.randn(3, 5, 4)
        >>> out, _ = mha(x, x, x, need_weights=False)
        >>> sq = multihead_attention_sq_norm(mha, (x, x, x), {"need_weights": False}, (torch.ones_like(out), None))
        >>> exact = [sum(g.square().sum() for g in torch.autograd.grad(mha(xi, xi, xi)[0].sum(), mha.parameters()))
        ...          for xi in x.split(1)]
        >>> torch.allclose(sq, torch.stack(exact), rtol=1e-4)
        True
    """
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"`multihead_attention_sq_norm` expects nn.MultiheadAttention, got `{type(module).__name__}`.")
    bound = _SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    call = bound.arguments
    grad_output = grad_outputs[0] if grad_outputs else None
    grad_weights = grad_outputs[1] if len(grad_outputs) > 1 else None
    query, key, value = call["query"], call["key"], call["value"]
    if (
        grad_output is None
        or grad_weights is not None
        or module.bias_k is not None
        or module.bias_v is not None
        or module.add_zero_attn
        or (module.training and module.dropout > 0.0)
        or query.dim() != 3
    ):
        return None
    dtype = accumulation_dtype(grad_output)
    roles = _roles_by_input(query, key, value)
    if not module.batch_first:
        query, key, value, grad_output = (t.transpose(0, 1) for t in (query, key, value, grad_output))
    query, key, value, grad_output = (t.to(dtype) for t in (query, key, value, grad_output))
    inputs = (query, key, value)
    batch, tgt_len, embed_dim = query.shape
    mask, is_causal = _attention_mask(call, batch, module.num_heads, tgt_len, key.shape[1], dtype)
    projection = _ProjectionWeights(module)
    out_weight = module.out_proj.weight
    with torch.no_grad():
        projections = [projection.project(inputs[group[0]], group, dtype) for group in roles]
    with torch.enable_grad():
        projections = [p.requires_grad_() for p in projections]
        q, k, v = (_split_heads(p, module.num_heads, seq_first=False) for p in _per_role(projections, roles, embed_dim))
        context = _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal), False)
        grads: Sequence[Tensor | None] = [None] * len(projections)
        if projection.any_trainable:
            grads = torch.autograd.grad(context, projections, grad_output @ out_weight.to(dtype))
    in_proj = projection.sq_norm(roles, [inputs[group[0]] for group in roles], grads, embed_dim, weights)
    return in_proj + _out_proj_sq_norm(module, context.detach(), grad_output, weights)


@dataclass
class CapturedAttention:
    """What one MultiheadAttention forward kept for its per-example norms (all seq-first, ``[T, N, ·]``).

    Attributes:
        roles: the q/k/v roles (0, 1, 2) grouped by the input tensor they project.
        inputs: the detached input of each group.
        projections: the live projection of each group; their gradients are the q/k/v gradients.
        context: the detached attention output that ``out_proj`` multiplies.
    """

    roles: list[list[int]]
    inputs: list[Tensor]
    projections: list[Tensor]
    context: Tensor

    def sq_norm(
        self,
        module: nn.Module,
        grad_output: Tensor | None,
        projection_grads: Sequence[Tensor | None],
        weights: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Per-example squared norms from the gradients of the module's output and of the projections.

        Args:
            module: the attention layer whose forward was captured.
            grad_output: the gradient of the module's ``attn_output``, in the module's layout (``None``
                when only the attention weights were used).
            projection_grads: the gradient of each of :attr:`projections` (``None`` where none flowed).
            weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

        Returns:
            ``[N]`` squared norms over the layer's trainable parameters.

        Raises:
            TypeError: if ``module`` is not a MultiheadAttention.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"Expected nn.MultiheadAttention, got `{type(module).__name__}`.")
        dtype = accumulation_dtype(self.context)
        grads = [None if g is None else g.transpose(0, 1).to(dtype) for g in projection_grads]
        inputs = [x.transpose(0, 1).to(dtype) for x in self.inputs]
        result = _ProjectionWeights(module).sq_norm(self.roles, inputs, grads, module.embed_dim, weights)
        if grad_output is not None:
            grad_output = (grad_output if module.batch_first else grad_output.transpose(0, 1)).to(dtype)
            context = self.context.transpose(0, 1).to(dtype)
            result = result + _out_proj_sq_norm(module, context, grad_output, weights)
        return result


class MultiheadAttentionCapture(TorchFunctionMode):
    """Runs one MultiheadAttention forward with the same operations, keeping what its norms need.

    Enter it just before the module's forward and leave it just after (the engine does so from
    forward hooks); it intercepts the module's call of ``F.multi_head_attention_forward`` and sets
    :attr:`captured`, or leaves the call to PyTorch (and :attr:`captured` ``None``) when the call
    is not covered. Every other torch function passes through unchanged.

    Args:
        module: the attention layer about to run.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> mha = nn.MultiheadAttention(4, 2, batch_first=True)
        >>> x = torch.randn(3, 5, 4)
        >>> with MultiheadAttentionCapture(mha) as capture:
        ...     out, _ = mha(x, x, x, need_weights=False)
        >>> torch.allclose(out, mha(x, x, x, need_weights=False)[0], atol=1e-6)
        True
        >>> grads = torch.autograd.grad(out.sum(), [out, *capture.captured.projections])
        >>> sq = capture.captured.sq_norm(mha, grads[0], grads[1:])
        >>> exact = [sum(g.square().sum() for g in torch.autograd.grad(mha(xi, xi, xi)[0].sum(), mha.parameters()))
        ...          for xi in x.split(1)]
        >>> torch.allclose(sq, torch.stack(exact), rtol=1e-4)
        True
    """

    def __init__(self, module: nn.MultiheadAttention) -> None:
        super().__init__()
        self.module = module
        self.captured: CapturedAttention | None = None

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and self.captured is None:
            result = _capturing_forward(self.module, args, kwargs)
            if result is not None:
                output, self.captured = result
                return output
        return func(*args, **kwargs)


def _capturing_forward(
    module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Tensor, Tensor | None], CapturedAttention] | None:
    """``F.multi_head_attention_forward`` for the covered calls, with the intermediate tensors kept."""
    call = _FUNCTIONAL_SIGNATURE.bind(*args, **kwargs)
    call.apply_defaults()
    c = call.arguments
    query, key, value = c["query"], c["key"], c["value"]
    separate = bool(c["use_separate_proj_weight"])
    own_weights = (
        c["out_proj_weight"] is module.out_proj.weight
        and c["out_proj_bias"] is module.out_proj.bias
        and c["in_proj_bias"] is module.in_proj_bias
        and (
            (not separate and c["in_proj_weight"] is module.in_proj_weight)
            or (
                separate
                and c["q_proj_weight"] is module.q_proj_weight
                and c["k_proj_weight"] is module.k_proj_weight
                and c["v_proj_weight"] is module.v_proj_weight
            )
        )
    )
    if not (
        own_weights
        and c["bias_k"] is None
        and c["bias_v"] is None
        and not c["add_zero_attn"]
        and c["static_k"] is None
        and c["static_v"] is None
        and query.dim() == 3
        and c["num_heads"] == module.num_heads
        and not (c["is_causal"] and c["attn_mask"] is None)  # PyTorch raises for this one: let it
    ):
        return None
    if not _valid_shapes(c, separate):
        return None  # PyTorch's own function raises its own error for it
    tgt_len, batch, embed_dim = query.shape
    heads = module.num_heads
    roles = _roles_by_input(query, key, value)
    mask, is_causal = _attention_mask(c, batch, heads, tgt_len, key.shape[0], query.dtype)
    weights = _ProjectionWeights(module)
    projections = [weights.project((query, key, value)[group[0]], group, None) for group in roles]
    q, k, v = (_split_heads(p, heads, seq_first=True) for p in _per_role(projections, roles, embed_dim))
    dropout_p = float(c["dropout_p"]) if c["training"] else 0.0
    weights_out = None
    if c["need_weights"]:
        # The explicit path of F.multi_head_attention_forward: the (dropped-out) weights are an output.
        scores = (q * (1.0 / q.shape[-1]) ** 0.5) @ k.transpose(-2, -1)
        probs = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        attended = probs @ v
        weights_out = probs.mean(dim=1) if c["average_attn_weights"] else probs
    else:
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    context = _merge_heads(attended, seq_first=True)
    output = F.linear(context, c["out_proj_weight"], c["out_proj_bias"])
    inputs = [(query, key, value)[group[0]].detach() for group in roles]
    return (output, weights_out), CapturedAttention(roles, inputs, projections, context.detach())


def _valid_shapes(call: dict[str, Any], separate: bool) -> bool:
    query, key, value = call["query"], call["key"], call["value"]
    check = mha_shape_check()
    try:
        if check is not None:
            check(query, key, value, call["key_padding_mask"], call["attn_mask"], call["num_heads"])
    except (AssertionError, RuntimeError):
        return False
    same_kv = key.shape[:2] == value.shape[:2] if separate else key.shape == value.shape
    return (
        same_kv
        and query.shape[1] == key.shape[1]
        and query.shape[-1] == call["embed_dim_to_check"]
        and query.shape[-1] % call["num_heads"] == 0
    )


class _ProjectionWeights:
    """The q/k/v projection weights of a layer, packed or separate, and how to use them per input group."""

    def __init__(self, module: nn.MultiheadAttention) -> None:
        packed = module.in_proj_weight
        self.packed = packed
        self.roles: tuple[Tensor, ...] = (
            packed.chunk(3)
            if packed is not None
            else tuple(_present(w) for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
        )
        self.bias = module.in_proj_bias
        self.bias_roles: tuple[Tensor, ...] = self.bias.chunk(3) if self.bias is not None else ()
        self.bias_trainable = self.bias is not None and self.bias.requires_grad
        self.any_trainable = self.bias_trainable or any(w.requires_grad for w in self.roles)

    def project(self, inputs: Tensor, group: list[int], dtype: torch.dtype | None) -> Tensor:
        weight = _stack([self.roles[r] for r in group], self.packed, group)
        bias = None if self.bias is None else _stack([self.bias_roles[r] for r in group], self.bias, group)
        if dtype is not None:
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        return F.linear(inputs, weight, bias)

    def sq_norm(
        self,
        roles: list[list[int]],
        inputs: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        embed_dim: int,
        weights: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Squared norms of the projection weights and bias; inputs and grads batch-first."""
        result = inputs[0].new_zeros(inputs[0].shape[0])
        dtype = result.dtype
        weight_blocks, weight_packed = self._weight_blocks(weights, dtype)
        bias_weight = param_weight(weights, "in_proj_bias", dtype)
        for group, x, g in zip(roles, inputs, grads, strict=True):
            if g is None:
                continue
            # Roles fed the same tensor share one ghost norm: their weight blocks are distinct rows, so
            # stacking them adds the blocks' squared norms. Frozen blocks among them must not count.
            frozen = [slot for slot, r in enumerate(group) if not self.roles[r].requires_grad]
            if len(frozen) < len(group):
                weight = (
                    None if weight_blocks is None else _stack([weight_blocks[r] for r in group], weight_packed, group)
                )
                result = result + sum_outer_sq_norm(_zero_slots(g, frozen, embed_dim) if frozen else g, x, weight)
            if self.bias_trainable:
                group_bias_weight = None
                if bias_weight is not None:
                    group_bias_weight = _stack([bias_weight.chunk(3)[r] for r in group], bias_weight, group)
                result = result + weighted_sum_sq(g.sum(1), group_bias_weight)
        return result

    def _weight_blocks(
        self, weights: Mapping[str, Tensor] | None, dtype: torch.dtype
    ) -> tuple[tuple[Tensor, ...] | None, Tensor | None]:
        """The q/k/v blocks of the projection weight's weights, and the packed tensor they are views of."""
        packed = param_weight(weights, "in_proj_weight", dtype)
        if packed is not None:
            return packed.chunk(3), packed
        separate = [param_weight(weights, f"{role}_proj_weight", dtype) for role in "qkv"]
        if all(w is None for w in separate):
            return None, None
        # A block without a weight has weight 1 (a frozen block's rows are zeroed anyway).
        blocks = tuple(
            torch.ones_like(block, dtype=dtype) if w is None else w
            for w, block in zip(separate, self.roles, strict=True)
        )
        return blocks, None


def _out_proj_sq_norm(
    module: nn.MultiheadAttention, context: Tensor, grad_output: Tensor, weights: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Squared norms of ``out_proj``'s weight and bias; context and grad batch-first."""
    result = grad_output.new_zeros(grad_output.shape[0])
    dtype = result.dtype
    if module.out_proj.weight.requires_grad:
        result = result + sum_outer_sq_norm(grad_output, context, param_weight(weights, "out_proj.weight", dtype))
    bias = module.out_proj.bias
    if bias is not None and bias.requires_grad:
        result = result + weighted_sum_sq(grad_output.sum(1), param_weight(weights, "out_proj.bias", dtype))
    return result


def _roles_by_input(query: Tensor, key: Tensor, value: Tensor) -> list[list[int]]:
    """Group the q/k/v roles by input identity: self-attention projects one tensor once."""
    groups: list[list[int]] = []
    tensors = (query, key, value)
    for role, tensor in enumerate(tensors):
        for group in groups:
            if tensors[group[0]] is tensor:
                group.append(role)
                break
        else:
            groups.append([role])
    return groups


def _per_role(projections: list[Tensor], roles: list[list[int]], embed_dim: int) -> list[Tensor]:
    per_role = [Tensor()] * 3
    for projection, group in zip(projections, roles, strict=True):
        for slot, role in enumerate(group):
            per_role[role] = projection[..., slot * embed_dim : (slot + 1) * embed_dim]
    return per_role


def _split_heads(projected: Tensor, heads: int, seq_first: bool) -> Tensor:
    """``[N, T, E]`` (or ``[T, N, E]``) to ``[N, heads, T, E / heads]``."""
    split = projected.unflatten(-1, (heads, projected.shape[-1] // heads))
    return split.permute(1, 2, 0, 3) if seq_first else split.transpose(1, 2)


def _merge_heads(attended: Tensor, seq_first: bool) -> Tensor:
    """``[N, heads, T, d]`` back to ``[T, N, heads·d]`` (or ``[N, T, heads·d]``)."""
    batch, heads, steps, head_dim = attended.shape
    if seq_first:
        return attended.permute(2, 0, 1, 3).reshape(steps, batch, heads * head_dim)
    return attended.transpose(1, 2).reshape(batch, steps, heads * head_dim)


def _stack(blocks: list[Tensor], packed: Tensor | None, roles: list[int]) -> Tensor:
    """The weight (or bias) rows of some roles, as a view of the packed parameter where they are contiguous."""
    if packed is not None and roles == list(range(roles[0], roles[0] + len(roles))):
        rows = blocks[0].shape[0]
        return packed[roles[0] * rows : (roles[0] + len(roles)) * rows]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _present(weight: Tensor | None) -> Tensor:
    if weight is None:  # MultiheadAttention sets either the packed weight or all three separate ones
        raise TypeError("MultiheadAttention has neither `in_proj_weight` nor separate q/k/v projection weights.")
    return weight


def _zero_slots(grad: Tensor, slots: list[int], width: int) -> Tensor:
    grad = grad.clone()
    for slot in slots:
        grad[..., slot * width : (slot + 1) * width] = 0
    return grad


def _canonical(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # MultiheadAttention's boolean masks mark positions to *exclude*; floats are added.
    if mask is None or torch.is_floating_point(mask):
        return None if mask is None else mask.to(dtype)
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _attention_mask(
    call: dict[str, Any], batch: int, heads: int, tgt_len: int, src_len: int, dtype: torch.dtype
) -> tuple[Tensor | None, bool]:
    """The additive mask (broadcastable to ``[N, heads, L, S]``) and causal flag, as MHA's own forward makes them."""
    key_padding_mask = _canonical(call["key_padding_mask"], dtype)
    is_causal = bool(call["is_causal"])
    if is_causal and key_padding_mask is None and not call["need_weights"]:
        return None, True
    attn_mask = _canonical(call["attn_mask"], dtype)
    if attn_mask is not None:
        attn_mask = (
            attn_mask.view(1, 1, tgt_len, src_len)
            if attn_mask.dim() == 2
            else attn_mask.view(batch, heads, tgt_len, src_len)
        )
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, src_len)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    return attn_mask, False
