r"""Norm rule for :class:`torch.nn.Linear` and the kernel that the convolution rule shares.

The per-example weight gradient of a linear map applied at ``T`` positions is
``G_i = Σ_t g_{i,t} a_{i,t}ᵀ`` (output gradient times input). Its squared Frobenius norm
can be taken without building ``G_i`` ("ghost norm"):

.. math::

    \|G_i\|_F^2 = \sum_{t,s} (a_{i,t} \cdot a_{i,s}) (g_{i,t} \cdot g_{i,s})

which costs ``T²(K + L)`` per example instead of ``T·K·L``. :func:`sum_outer_sq_norm`
picks the cheaper of the two per call from the shapes alone (no host sync).

**Weighted (preconditioned) norms.** With an elementwise weight :math:`W = P^2` on the
entries of the weight gradient, a single position (``T = 1``, a 2-D input) keeps a cheap
exact form, since :math:`G_i = g_i a_i^T` is an outer product:

.. math::

    \sum_{l,k} W_{lk}\, g_{il}^2 a_{ik}^2 = \big((g_i^{\odot 2})^T W\big) \cdot a_i^{\odot 2}

(one ``[N, L] @ [L, K]`` product). With several positions the Gram form has no weighted
counterpart of lower cost, so ``G_i`` is materialised (in chunks) and weighted.

**Handing autograd the sum.** The batch weight gradient is ``Σ_i G_i``. When the ``G_i`` of
a sequence layer are built anyway, their sum replaces autograd's own weight-gradient
product, which costs as much as building them: what remains is one pass over the ``G_i``.
:func:`linear_fuses_weight_grads` decides this at the forward, from the shapes: long
sequences against the layer's width (``K·L < T²(K+L) / c``, ``c`` measured on CPU), and
:func:`linear_sq_norm_and_grads` returns the norms with the sums (see
:mod:`~lightning_gns.sources.rules.fused`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype that norms are accumulated in: float64 stays float64, anything else becomes float32.

    Args:
        tensor: an activation or gradient.

    Returns:
        ``torch.float64`` for float64 input, else ``torch.float32``.
    """
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def sum_outer_sq_norm(grad_output: Tensor, activation: Tensor, weight: Tensor | None = None) -> Tensor:
    """Squared Frobenius norm of ``Σ_t g_t a_tᵀ`` for each row of a batch, optionally weighted entrywise.

    Chooses per call between the Gram form (cost ``T²·(K+L)``) and materialising the
    ``[M, L, K]`` product (cost ``T·K·L``), like nanoGNS does for sequence layers. Rows are
    processed in chunks that keep either temporary under 128 MiB of float32. With a
    ``weight`` the result is ``Σ_lk W_lk (Σ_t g_tl a_tk)²``: exact and cheap for ``T = 1``,
    materialised for ``T > 1`` (see the module docstring).

    Args:
        grad_output: ``[M, T, L]`` output gradients.
        activation: ``[M, T, K]`` inputs, in the same dtype as ``grad_output``.
        weight: ``None``, or the elementwise weight ``[L, K]``, or ``[G, L, K]`` for rows that come in
            blocks of ``G`` (row ``r`` weighted by ``weight[r % G]``; ``M`` a multiple of ``G``).

    Returns:
        ``[M]`` squared norms.

    Example::

        >>> g, a = torch.ones(2, 3, 4), torch.ones(2, 3, 5)
        >>> sum_outer_sq_norm(g, a)  # every entry of Σ_t g_t a_tᵀ is 3, and there are 20
        tensor([180., 180.])
        >>> sum_outer_sq_norm(g, a, weight=torch.full((4, 5), 0.5))
        tensor([90., 90.])
    """
    batch, steps = activation.shape[0], activation.shape[1]
    in_features, out_features = activation.shape[2], grad_output.shape[2]
    if weight is not None:
        return _weighted_sum_outer_sq_norm(grad_output, activation, weight)
    if steps == 1:
        return grad_output.square().sum((1, 2)) * activation.square().sum((1, 2))
    gram = steps * (in_features + out_features) < in_features * out_features
    per_example = 2 * steps * steps if gram else in_features * out_features
    chunk = max(1, _CHUNK_ELEMENTS // per_example)
    if chunk >= batch:
        return _gram_sq_norm(grad_output, activation) if gram else _outer_sq_norm(grad_output, activation)
    # Bound the temporary: [chunk, T, T] Grams or [chunk, L, K] per-example gradients at a time.
    kernel = _gram_sq_norm if gram else _outer_sq_norm
    return torch.cat([kernel(grad_output[i : i + chunk], activation[i : i + chunk]) for i in range(0, batch, chunk)])


_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of float32 temporaries per chunk


def _weighted_sum_outer_sq_norm(grad_output: Tensor, activation: Tensor, weight: Tensor) -> Tensor:
    batch, steps = activation.shape[0], activation.shape[1]
    in_features, out_features = activation.shape[2], grad_output.shape[2]
    blocks = weight.reshape(-1, out_features, in_features).to(grad_output.dtype)
    groups = blocks.shape[0]
    if batch % groups:
        raise ValueError(f"Expected the rows ({batch}) to be a multiple of the weight's {groups} blocks.")
    if steps == 1:
        # Rank one: Σ_lk W_lk g_l² a_k² = ((g²)ᵀ W) · a², per block of rows.
        g2 = grad_output.reshape(-1, groups, out_features).square().transpose(0, 1)  # [G, M/G, L]
        a2 = activation.reshape(-1, groups, in_features).square().transpose(0, 1)  # [G, M/G, K]
        return (torch.bmm(g2, blocks) * a2).sum(-1).transpose(0, 1).reshape(batch)
    chunk = max(1, _CHUNK_ELEMENTS // (in_features * out_features)) // groups * groups or groups
    parts = []
    for i in range(0, batch, chunk):
        outer = torch.bmm(grad_output[i : i + chunk].transpose(1, 2), activation[i : i + chunk])  # [c, L, K]
        parts.append((outer.square().reshape(-1, groups, out_features, in_features) * blocks).sum((2, 3)).reshape(-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def param_weight(weights: Mapping[str, Tensor] | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """The elementwise weight of one parameter, by its name in the module, in ``dtype``; ``None`` if it has none.

    Args:
        weights: the weights a rule was given, or ``None``.
        name: the parameter's name relative to the module (``"weight"``, ``"out_proj.bias"``).
        dtype: the accumulation dtype.

    Returns:
        The weight, or ``None`` (weight 1).
    """
    if weights is None or name not in weights:
        return None
    return weights[name].to(dtype)


def weighted_sum_sq(tensor: Tensor, weight: Tensor | None) -> Tensor:
    """``Σ_j w_j x_{ij}²`` over all but the batch dim (plain when ``weight`` is ``None``), ``weight`` broadcasting.

    Args:
        tensor: ``[N, *shape]``.
        weight: ``[*shape]`` or ``None``.

    Returns:
        ``[N]``.

    Example::

        >>> weighted_sum_sq(torch.ones(2, 3), torch.tensor([1.0, 2.0, 3.0]))
        tensor([6., 6.])
    """
    squared = tensor.square()
    if weight is not None:
        squared = squared * weight
    return squared.reshape(tensor.shape[0], -1).sum(1)


def _gram_sq_norm(grad_output: Tensor, activation: Tensor) -> Tensor:
    gram_a = torch.bmm(activation, activation.transpose(1, 2))
    gram_g = torch.bmm(grad_output, grad_output.transpose(1, 2))
    return (gram_a * gram_g).sum((1, 2))


def _outer_sq_norm(grad_output: Tensor, activation: Tensor) -> Tensor:
    return torch.bmm(grad_output.transpose(1, 2), activation).square().sum((1, 2))


# Building the per-example gradients (cache-sized chunks) and summing them for autograd costs about this many
# multiply-adds of the Gram form per entry of G_i: measured on CPU (2 cores, MKL) for T = 8..256, K, L = 64..768.
# On CUDA an estimate from the flop-to-byte ratio of current GPUs (unmeasured here): the Gram form is cheaper there.
_FUSED_COST = {"cpu": 20.0, "cuda": 150.0}
_FUSED_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per chunk of per-example gradients: stays in cache


def linear_fuses_weight_grads(module: nn.Module, activation: Tensor, weighted: bool = False) -> bool:
    """Whether building the per-example gradients and handing autograd their sum beats the Gram form.

    Decided at the forward from the input's shape, so that autograd can be told not to
    compute the weight gradient itself. Only sequence inputs (``[N, *, K]`` with more than
    one position) qualify: a single position has the cheap rank-one form. Weighted
    (preconditioned) norms of a sequence build the per-example gradients in any case, so
    they always fuse.

    Args:
        module: the linear layer.
        activation: its input.
        weighted: the norms will be weighted (a preconditioner).

    Returns:
        ``True`` to fuse.

    Example::

        >>> layer = nn.Linear(128, 512)
        >>> linear_fuses_weight_grads(layer, torch.ones(8, 64, 128))  # 64 positions: fused
        True
        >>> linear_fuses_weight_grads(layer, torch.ones(8, 4, 128))  # 4 positions: the Gram form is cheaper
        False
    """
    if not isinstance(module, nn.Linear) or activation.dim() < 3:
        return False
    cost = _FUSED_COST.get(activation.device.type)
    steps = activation[0, ..., 0].numel()
    if steps < 2:
        return False
    if weighted:
        return True
    if cost is None:
        return False
    in_features, out_features = module.in_features, module.out_features
    return cost * in_features * out_features < steps * steps * (in_features + out_features)


def linear_batch_grads(
    module: nn.Module, inputs: Tensor, grad_output: Tensor, weight: bool, bias: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The batch gradients of a Linear's weight and bias (those asked for), as autograd computes them.

    The fallback of :class:`~lightning_gns.sources.rules.fused.FusedParamGrads` for a Linear.

    Args:
        module: the linear layer.
        inputs: ``[N, *, K]``.
        grad_output: ``[N, *, L]``.
        weight: compute the weight's.
        bias: compute the bias's.

    Returns:
        The weight's and the bias's gradients, ``None`` where not asked for.

    Example::

        >>> layer = nn.Linear(2, 1)
        >>> linear_batch_grads(layer, torch.ones(3, 4, 2), torch.ones(3, 4, 1), True, True)
        (tensor([[12., 12.]]), tensor([12.]))
    """
    grad = grad_output.reshape(-1, grad_output.shape[-1])
    weight_grad = grad.t().mm(inputs.reshape(-1, inputs.shape[-1])) if weight else None
    bias_grad = grad.sum(0) if bias else None
    return weight_grad, bias_grad


def linear_input_grad(module: nn.Module, inputs: Tensor, grad_output: Tensor) -> Tensor:
    """The gradient of a Linear's input, from the live weight (differentiable with respect to it).

    Args:
        module: the linear layer.
        inputs: ``[N, *, K]`` (only its shape is used).
        grad_output: ``[N, *, L]``.

    Returns:
        ``[N, *, K]``.

    Example::

        >>> layer = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        >>> linear_input_grad(layer, torch.zeros(3, 2), torch.ones(3, 1))
        tensor([[ 1., -2.],
                [ 1., -2.],
                [ 1., -2.]], grad_fn=<ViewBackward0>)
    """
    grad = grad_output.reshape(-1, grad_output.shape[-1])
    weight = module.weight
    assert isinstance(weight, Tensor)  # a Linear's
    return grad.mm(weight).reshape(inputs.shape)


def linear_sq_norm_and_grads(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, *, weights: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`linear_sq_norm` from the per-example gradients, and their sums: the batch gradients.

    Builds ``G_i`` in chunks that stay in cache (whatever :func:`sum_outer_sq_norm` would
    pick), for a layer whose weight gradient autograd was told not to compute
    (:func:`linear_fuses_weight_grads`). With ``weights`` only the norms are weighted: the
    sums are the plain batch gradients.

    Args:
        module: the linear layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, *, K]``.
        grad_output: the gradient flowing into its output, ``[N, *, L]``.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms, and the weight's and the bias's batch gradients (``None`` for a
        frozen one), in the accumulation dtype.

    Raises:
        ValueError: if the input has no batch dimension.

    Example::

        >>> layer = nn.Linear(1, 1)
        >>> x = torch.tensor([[[1.0], [2.0]], [[0.0], [3.0]]])  # two sequences of two positions
        >>> linear_sq_norm_and_grads(layer, (x,), torch.ones(2, 2, 1))  # G_i = 3 and 3, biases 2 and 2
        (tensor([13., 13.]), tensor([[6.]]), tensor([4.]))
    """
    activation, grad = _as_sequences(module, inputs[0], grad_output)
    dtype, batch = grad.dtype, grad.shape[0]
    result = grad.new_zeros(batch)
    weight, bias = module.weight, module.bias
    weight_grad = bias_grad = None
    if isinstance(weight, Tensor) and weight.requires_grad:
        act = activation.reshape(batch, -1, activation.shape[-1]).to(dtype)
        sq_weight = param_weight(weights, "weight", dtype)
        chunk = max(1, _FUSED_CHUNK_ELEMENTS // weight.numel())
        norms = []
        for start in range(0, batch, chunk):
            outer = torch.bmm(grad[start : start + chunk].transpose(1, 2), act[start : start + chunk])  # [c, L, K]
            if sq_weight is None:
                norms.append(torch.linalg.vector_norm(outer, dim=(1, 2)).square())
            else:
                norms.append((outer.square() * sq_weight).sum((1, 2)))
            summed = outer.sum(0)
            weight_grad = summed if weight_grad is None else weight_grad.add_(summed)
        result = result + (norms[0] if len(norms) == 1 else torch.cat(norms))
    if isinstance(bias, Tensor) and bias.requires_grad:
        per_example = grad.sum(1)
        result = result + weighted_sum_sq(per_example, param_weight(weights, "bias", dtype))
        bias_grad = per_example.sum(0)
    return result, weight_grad, bias_grad


def _as_sequences(module: nn.Module, activation: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    """The input (checked for a batch dimension) and the output gradient as ``[N, T, L]``, accumulation dtype."""
    if activation.dim() < 2:
        raise ValueError(
            f"Per-example norms need a batch dimension, but `{type(module).__name__}` got an input of shape "
            f"{tuple(activation.shape)}. Feed batched inputs of shape [N, *, in_features]."
        )
    batch = grad_output.shape[0]
    return activation, grad_output.reshape(batch, -1, grad_output.shape[-1]).to(accumulation_dtype(grad_output))


def linear_sq_norm(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, *, weights: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Per-example squared gradient norm of a :class:`torch.nn.Linear` (weight and bias).

    Inputs of shape ``[N, K]`` or ``[N, *, K]``; for the latter every example is the whole
    slice ``[*, K]`` (a sequence), so the gradient is summed over ``*`` before squaring.

    Args:
        module: the linear layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, *, K]``.
        grad_output: the gradient flowing into its output, ``[N, *, L]``.
        weights: elementwise weights of the squared gradient entries by parameter name (``"weight"``,
            ``"bias"``; a preconditioner's :math:`P^2`), or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable parameters.

    Raises:
        ValueError: if the input has no batch dimension.

    Example::

        >>> layer = nn.Linear(3, 2)
        >>> linear_sq_norm(layer, (torch.ones(4, 3),), torch.ones(4, 2))  # |g|²|a|² + |g|² = 2·3 + 2
        tensor([8., 8., 8., 8.])
    """
    activation, grad = _as_sequences(module, inputs[0], grad_output)
    dtype, batch = grad.dtype, grad.shape[0]
    result = grad.new_zeros(batch)
    weight, bias = module.weight, module.bias
    if isinstance(weight, Tensor) and weight.requires_grad:
        act = activation.reshape(batch, -1, activation.shape[-1]).to(dtype)
        result = result + sum_outer_sq_norm(grad, act, param_weight(weights, "weight", dtype))
    if isinstance(bias, Tensor) and bias.requires_grad:
        result = result + weighted_sum_sq(grad.sum(1), param_weight(weights, "bias", dtype))
    return result
