"""Norm rules for affine normalisation layers: LayerNorm, GroupNorm, InstanceNorm, RMSNorm, BatchNorm (eval).

For an affine normalisation ``y = x̂ ⊙ γ + β`` the per-example gradients are
``Σ g ⊙ x̂`` for the scale ``γ`` and ``Σ g`` for the shift ``β``, summed over the
positions that share one entry of ``γ`` (sequence positions for LayerNorm, spatial
positions for the channel-wise norms). The rules recompute ``x̂`` from the input with
the layer's own functional form, in float32 (or float64), without the affine part;
LayerNorm from the mean and reciprocal standard deviation its forward saved when the
engine can hand them over (:func:`layer_norm_sq_norm_from_stats`).
GroupNorm instead runs the layer's own backward kernel on the examples stacked along the
channels, from the statistics its forward saved when the engine can hand them over
(:func:`group_norm_sq_norm_from_stats`).

With elementwise weights :math:`W` on the squared gradient entries (a preconditioner's
:math:`P^2`) the sums above are squared entrywise and weighted by :math:`W` before they are
added up: exact, at the same cost.

BatchNorm that normalises with batch statistics couples the examples of a batch: their
gradients are then not per-example quantities, so the rule refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns._compat.autograd import saved_mean_rstd
from lightning_gns._compat.nn import BatchNormBase, InstanceNormBase, instance_norm_batched_dims
from lightning_gns.sources.rules.linear import accumulation_dtype, param_weight, weighted_sum_sq

Weights = Mapping[str, Tensor] | None


def batch_norm_uses_batch_statistics(module: BatchNormBase) -> bool:
    """Whether a BatchNorm layer normalises with the statistics of the current batch.

    Mirrors the test inside :meth:`torch.nn.modules.batchnorm._BatchNorm.forward`.

    Args:
        module: the BatchNorm layer.

    Returns:
        ``True`` in training mode, or in eval mode without running statistics.
    """
    return module.training or module.running_mean is None or module.running_var is None


def batch_norm_coupling_error(name: str, module: nn.Module) -> ValueError:
    """The error that explains why per-example norms refuse BatchNorm with batch statistics.

    Args:
        name: the qualified name of the layer (may be empty).
        module: the layer.

    Returns:
        The error to raise.
    """
    where = f"`{name}` ({type(module).__name__})" if name else f"`{type(module).__name__}`"
    return ValueError(
        f"Per-example gradient norms are not defined through {where} in training mode: BatchNorm "
        "normalises with the statistics of the whole batch, which couples the gradients of its examples. "
        "Replace it with GroupNorm or LayerNorm, put it in eval mode (running statistics), or measure the "
        "noise scale with the `ddp` or `accumulation` source instead of `per_example`."
    )


def _affine_sq_norm(
    module: nn.Module, normalized: Tensor, grad: Tensor, reduce_dims: tuple[int, ...], weights: Weights
) -> Tensor:
    """Squared norms of ``Σ g ⊙ x̂`` (weight) and ``Σ g`` (bias) summed over ``reduce_dims``, optionally weighted.

    What remains after the sum has the parameter's shape (per example), so a weight broadcasts onto it.
    ``normalized`` is the rule's own temporary: it is overwritten with ``g ⊙ x̂`` (a fresh
    activation-sized buffer would cost more than the product itself).
    """
    result = grad.new_zeros(grad.shape[0])
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, Tensor) and weight.requires_grad:
        summed = _sum_keep_batch(normalized.mul_(grad), reduce_dims)
        result = result + weighted_sum_sq(summed, _shaped(param_weight(weights, "weight", grad.dtype), summed))
    if isinstance(bias, Tensor) and bias.requires_grad:
        summed = _sum_keep_batch(grad, reduce_dims)
        result = result + weighted_sum_sq(summed, _shaped(param_weight(weights, "bias", grad.dtype), summed))
    return result


def _shaped(weight: Tensor | None, summed: Tensor) -> Tensor | None:
    return None if weight is None else weight.reshape(summed.shape[1:])


def _sum_keep_batch(tensor: Tensor, dims: tuple[int, ...]) -> Tensor:
    return tensor.sum(dims) if dims else tensor


def _require_batch(module: nn.Module, inputs: Tensor, min_dim: int, shape_hint: str) -> None:
    if inputs.dim() < min_dim:
        raise ValueError(
            f"Per-example norms need a batch dimension, but `{type(module).__name__}` got an input of shape "
            f"{tuple(inputs.shape)}. Feed batched inputs of shape {shape_hint}."
        )


def layer_norm_sq_norm(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, *, weights: Weights = None
) -> Tensor:
    """Per-example squared gradient norm of a :class:`torch.nn.LayerNorm`.

    Args:
        module: the layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, *, *normalized_shape]``.
        grad_output: the gradient flowing into its output, same shape.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable parameters.

    Raises:
        TypeError: if ``module`` is not a LayerNorm.
        ValueError: if the input has no batch dimension.

    Example::

        >>> ln = nn.LayerNorm(2)
        >>> x = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])  # x̂ = (1, -1) at both positions
        >>> layer_norm_sq_norm(ln, (x,), torch.ones(1, 2, 2))  # |Σ_t g⊙x̂|² + |Σ_t g|² = 8 + 8
        tensor([16.])
    """
    return layer_norm_sq_norm_from_stats(module, inputs, grad_output, None, weights=weights)


def layer_norm_sq_norm_from_stats(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_output: Tensor,
    stats: tuple[Tensor, Tensor] | None,
    *,
    weights: Weights = None,
) -> Tensor:
    """:func:`layer_norm_sq_norm`, with the forward's statistics when they are at hand.

    With them, ``x̂ = (x - mean) · rstd`` is two cheap elementwise passes; without them the
    rule runs the layer's normalisation again (several times slower on CPU).

    Args:
        module: the layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, *, *normalized_shape]``.
        grad_output: the gradient flowing into its output, same shape.
        stats: the mean and reciprocal standard deviation of the forward, shaped like the input
            with the normalised dimensions of size 1 (in the accumulation dtype), or ``None``.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable parameters.

    Raises:
        TypeError: if ``module`` is not a LayerNorm.
        ValueError: if the input has no batch dimension.

    Example::

        >>> ln = nn.LayerNorm(2)
        >>> x = torch.tensor([[1.0, -1.0]])
        >>> mean, rstd = torch.zeros(1, 1), torch.ones(1, 1)  # x̂ = x
        >>> layer_norm_sq_norm_from_stats(ln, (x,), torch.ones(1, 2), (mean, rstd))  # |g⊙x̂|² + |g|² = 2 + 2
        tensor([4.])
    """
    if not isinstance(module, nn.LayerNorm):
        raise TypeError(f"`layer_norm_sq_norm` expects an nn.LayerNorm, but got `{type(module).__name__}`.")
    shape = tuple(module.normalized_shape)
    _require_batch(module, inputs[0], len(shape) + 1, "[N, *, *normalized_shape]")
    dtype = accumulation_dtype(grad_output)
    activation = inputs[0].to(dtype)
    if stats is None:
        # Given a weight of ones the CPU kernel runs about twice as fast as without one.
        ones = activation.new_ones(shape)
        normalized = F.layer_norm(activation, shape, ones, None, module.eps)
    else:
        normalized = (activation - stats[0]).mul_(stats[1])
    reduce_dims = tuple(range(1, grad_output.dim() - len(shape)))
    return _affine_sq_norm(module, normalized, grad_output.to(dtype), reduce_dims, weights)


def layer_norm_saved_stats(node: Any, module: nn.Module, grad_output: Tensor) -> tuple[Tensor, Tensor] | None:
    """The statistics that a LayerNorm's forward saved for its backward, if ``node`` is that backward.

    Like :func:`group_norm_saved_stats`: ``native_layer_norm`` saves its mean and reciprocal
    standard deviation as its second and third outputs; anything unexpected gives ``None``.

    Args:
        node: the ``grad_fn`` of the layer's output, taken right after its forward.
        module: the layer.
        grad_output: the gradient flowing into its output, ``[N, *, *normalized_shape]``.

    Returns:
        Mean and reciprocal standard deviation shaped like the input with the normalised
        dimensions of size 1, or ``None``.

    Example::

        >>> ln = nn.LayerNorm(2)
        >>> out = ln(torch.tensor([[3.0, 1.0]]))
        >>> layer_norm_saved_stats(out.grad_fn, ln, torch.ones(1, 2))  # mean 2, standard deviation 1
        (tensor([[2.]]), tensor([[1.0000]]))
    """
    if type(node).__name__ != "NativeLayerNormBackward0" or not isinstance(module, nn.LayerNorm):
        return None
    saved = saved_mean_rstd(node)
    if saved is None:  # renamed, or already freed
        return None
    mean, rstd = saved
    normalized = len(module.normalized_shape)
    shape = (*grad_output.shape[: grad_output.dim() - normalized], *(1,) * normalized)
    dtype = accumulation_dtype(grad_output)
    if not all(isinstance(t, Tensor) and tuple(t.shape) == shape and t.dtype == dtype for t in (mean, rstd)):
        return None
    return mean.detach(), rstd.detach()


def rms_norm_sq_norm(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, *, weights: Weights = None
) -> Tensor:
    """Per-example squared gradient norm of a :class:`torch.nn.RMSNorm`.

    Args:
        module: the layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, *, *normalized_shape]``.
        grad_output: the gradient flowing into its output, same shape.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable scale.

    Raises:
        TypeError: if ``module`` is not an RMSNorm.
        ValueError: if the input has no batch dimension.

    Example::

        >>> rms = nn.RMSNorm(2)
        >>> rms_norm_sq_norm(rms, (torch.tensor([[3.0, -3.0]]),), torch.ones(1, 2))  # x̂ = (1, -1)
        tensor([2.0000])
    """
    if not isinstance(module, nn.RMSNorm):
        raise TypeError(f"`rms_norm_sq_norm` expects an nn.RMSNorm, but got `{type(module).__name__}`.")
    shape = tuple(module.normalized_shape)
    _require_batch(module, inputs[0], len(shape) + 1, "[N, *, *normalized_shape]")
    dtype = accumulation_dtype(grad_output)
    # The layer's default eps is that of its input dtype, which the float32 copy must not change.
    eps = module.eps if module.eps is not None else torch.finfo(inputs[0].dtype).eps
    normalized = F.rms_norm(inputs[0].to(dtype), shape, None, eps)
    reduce_dims = tuple(range(1, grad_output.dim() - len(shape)))
    return _affine_sq_norm(module, normalized, grad_output.to(dtype), reduce_dims, weights)


def group_norm_sq_norm(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, *, weights: Weights = None
) -> Tensor:
    """Per-example squared gradient norm of a :class:`torch.nn.GroupNorm`.

    Args:
        module: the layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, C, *]``.
        grad_output: the gradient flowing into its output, same shape.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable parameters.

    Raises:
        TypeError: if ``module`` is not a GroupNorm.
        ValueError: if the input has no batch dimension.

    Example::

        >>> gn = nn.GroupNorm(1, 2)
        >>> x = torch.tensor([[[1.0], [-1.0]]])  # x̂ = (1, -1)
        >>> group_norm_sq_norm(gn, (x,), torch.ones(1, 2, 1))  # |g⊙x̂|² + |g|² ≈ 2 + 2
        tensor([4.0000])
    """
    return group_norm_sq_norm_from_stats(module, inputs, grad_output, None, weights=weights)


def group_norm_sq_norm_from_stats(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_output: Tensor,
    stats: tuple[Tensor, Tensor] | None,
    *,
    weights: Weights = None,
) -> Tensor:
    """:func:`group_norm_sq_norm`, with the forward's statistics when they are at hand.

    The layer's own backward kernel computes every example's gradient at once when the
    examples are stacked along the channels (one example of ``N·C`` channels in ``N·G``
    groups, the same groups as before): its weight and bias gradients are then per example
    and channel. One fused pass over input and output gradient, exact as autograd is.

    Args:
        module: the layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, C, *]``.
        grad_output: the gradient flowing into its output, same shape.
        stats: the mean and reciprocal standard deviation of the forward, ``[N, G]`` each
            (in the accumulation dtype), or ``None`` to compute them.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable parameters.

    Raises:
        TypeError: if ``module`` is not a GroupNorm.
        ValueError: if the input has no batch dimension.

    Example::

        >>> gn = nn.GroupNorm(1, 2)
        >>> x = torch.tensor([[[1.0], [-1.0]]])
        >>> mean, rstd = torch.zeros(1, 1), torch.ones(1, 1)  # x̂ = x
        >>> group_norm_sq_norm_from_stats(gn, (x,), torch.ones(1, 2, 1), (mean, rstd))  # |g⊙x̂|² + |g|² = 2 + 2
        tensor([4.])
    """
    return group_norm_sq_norm_and_grads(module, inputs, grad_output, stats, False, weights=weights)[0]


def group_norm_sq_norm_and_grads(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_output: Tensor,
    stats: tuple[Tensor, Tensor] | None,
    input_grad: bool,
    *,
    weights: Weights = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`group_norm_sq_norm_from_stats`, with the layer's whole backward from the same kernel call.

    The stacked call of the layer's backward kernel (one example of ``N·C`` channels, the
    scale repeated per example) gives the input gradient as the layer's own backward does
    (same groups, same statistics) together with the per-example gradients of scale and
    shift; their sums are the batch gradients. The per-example engine hands all three to
    autograd, whose own GroupNorm node then has nothing left to do.

    Args:
        module: the layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, C, *]``.
        grad_output: the gradient flowing into its output, same shape.
        stats: the forward's mean and reciprocal standard deviation, ``[N, G]`` each (in the
            accumulation dtype), or ``None`` to compute them.
        input_grad: also compute the input gradient.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms, the scale's and the shift's batch gradients (``None`` if frozen)
        and the input gradient (``None`` unless asked for), in the accumulation dtype.

    Raises:
        TypeError: if ``module`` is not a GroupNorm.
        ValueError: if the input has no batch dimension.

    Example::

        >>> gn = nn.GroupNorm(1, 2)
        >>> x = torch.tensor([[[1.0], [-1.0]]])  # x̂ = (1, -1)
        >>> norms, scale, shift, dx = group_norm_sq_norm_and_grads(gn, (x,), torch.ones(1, 2, 1), None, True)
        >>> norms, scale, shift  # |g⊙x̂|² + |g|² ≈ 2 + 2
        (tensor([4.0000]), tensor([ 1.0000, -1.0000]), tensor([1., 1.]))
    """
    if not isinstance(module, nn.GroupNorm):
        raise TypeError(f"`group_norm_sq_norm` expects an nn.GroupNorm, but got `{type(module).__name__}`.")
    _require_batch(module, inputs[0], 2, "[N, C, *]")
    weight, bias = module.weight, module.bias
    mask = [input_grad, isinstance(weight, Tensor) and weight.requires_grad]
    mask.append(isinstance(bias, Tensor) and bias.requires_grad)
    dtype = accumulation_dtype(grad_output)
    batch, channels = grad_output.shape[:2]
    if not any(mask):
        return grad_output.new_zeros(batch, dtype=dtype), None, None, None
    size, groups = batch * channels, batch * module.num_groups
    positions = grad_output[0, 0].numel()
    stacked = inputs[0].to(dtype).reshape(1, size, positions).contiguous()
    if stats is None:
        _, mean, rstd = torch.native_group_norm(stacked, None, None, 1, size, positions, groups, module.eps)
    else:
        mean, rstd = stats[0].reshape(1, groups), stats[1].reshape(1, groups)
    grad = grad_output.to(dtype).reshape(1, size, positions).contiguous()
    # The kernel wants a scale even when it computes no input gradient (an expanded scalar allocates nothing);
    # only the input gradient depends on it.
    if isinstance(weight, Tensor):
        scale = weight.detach().to(dtype).expand(batch, channels).reshape(size)
    else:
        scale = stacked.new_ones(1).expand(size)
    dx, per_scale, per_shift = torch.ops.aten.native_group_norm_backward(
        grad, stacked, mean, rstd, scale, 1, size, positions, groups, mask
    )
    result = grad.new_zeros(batch)
    sums: dict[str, Tensor | None] = {"weight": None, "bias": None}
    for name, per_channel in (("weight", per_scale), ("bias", per_shift)):
        if per_channel is not None:
            per_example = per_channel.view(batch, channels)
            result = result + weighted_sum_sq(per_example, param_weight(weights, name, dtype))
            sums[name] = per_example.sum(0)
    return result, sums["weight"], sums["bias"], None if dx is None else dx.view_as(inputs[0])


def group_norm_batch_grads(
    module: nn.Module, inputs: Tensor, grad_output: Tensor, weight: bool, bias: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The batch gradients of a GroupNorm's scale and shift (those asked for), as autograd computes them.

    The fallback of :class:`~lightning_gns.sources.rules.fused.FusedParamGrads` for a
    GroupNorm; differentiable (a gradient penalty differentiates it again).

    Args:
        module: the layer.
        inputs: ``[N, C, *]``.
        grad_output: the gradient flowing into its output, same shape.
        weight: compute the scale's.
        bias: compute the shift's.

    Returns:
        The scale's and the shift's gradients, ``None`` where not asked for.

    Example::

        >>> gn = nn.GroupNorm(1, 2)
        >>> group_norm_batch_grads(gn, torch.tensor([[[1.0], [-1.0]]]), torch.ones(1, 2, 1), True, True)
        (tensor([ 1.0000, -1.0000]), tensor([1., 1.]))
    """
    assert isinstance(module, nn.GroupNorm)  # registered for GroupNorm only
    dims = [0, *range(2, grad_output.dim())]
    scale_grad = None
    if weight:
        normalized = F.group_norm(inputs, module.num_groups, None, None, module.eps)
        scale_grad = (grad_output * normalized).sum(dims)
    return scale_grad, grad_output.sum(dims) if bias else None


def group_norm_saved_stats(node: Any, module: nn.Module, grad_output: Tensor) -> tuple[Tensor, Tensor] | None:
    """The statistics that a GroupNorm's forward saved for its backward, if ``node`` is that backward.

    They spare :func:`group_norm_sq_norm_from_stats` a pass over the input. Autograd exposes
    what a node saved as ``_saved_*`` attributes; for ``native_group_norm`` the mean and
    reciprocal standard deviation are its second and third outputs. Anything unexpected
    (another node, another PyTorch, other shapes or dtypes) gives ``None``: the caller then
    computes them.

    Args:
        node: the ``grad_fn`` of the layer's output, taken right after its forward.
        module: the layer.
        grad_output: the gradient flowing into its output, ``[N, C, *]``.

    Returns:
        ``([N, G], [N, G])`` mean and reciprocal standard deviation, or ``None``.

    Example::

        >>> gn = nn.GroupNorm(1, 2)
        >>> out = gn(torch.tensor([[[3.0], [1.0]]]))
        >>> group_norm_saved_stats(out.grad_fn, gn, torch.ones(1, 2, 1))  # mean 2, standard deviation 1
        (tensor([[2.]]), tensor([[1.0000]]))
    """
    if type(node).__name__ != "NativeGroupNormBackward0" or not isinstance(module, nn.GroupNorm):
        return None
    saved = saved_mean_rstd(node)
    if saved is None:  # renamed, or already freed
        return None
    mean, rstd = saved
    shape = (grad_output.shape[0], module.num_groups)
    dtype = accumulation_dtype(grad_output)
    if not all(isinstance(t, Tensor) and t.shape == shape and t.dtype == dtype for t in (mean, rstd)):
        return None
    return mean.detach(), rstd.detach()


def instance_norm_sq_norm(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, *, weights: Weights = None
) -> Tensor:
    """Per-example squared gradient norm of an affine ``InstanceNorm1d/2d/3d``.

    Statistics are per example and channel, so examples stay independent in training mode
    too; in eval mode with ``track_running_stats=True`` the running statistics are used.

    Args:
        module: the layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, C, *spatial]``.
        grad_output: the gradient flowing into its output, same shape.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable parameters.

    Raises:
        TypeError: if ``module`` is not an InstanceNorm.
        ValueError: if the input has no batch dimension.

    Example::

        >>> inorm = nn.InstanceNorm1d(1, affine=True)
        >>> x = torch.tensor([[[1.0, -1.0]]])  # x̂ = (1, -1)
        >>> instance_norm_sq_norm(inorm, (x,), torch.ones(1, 1, 2))  # (Σ g⊙x̂)² + (Σ g)² ≈ 0 + 4
        tensor([4.0000])
    """
    if not isinstance(module, InstanceNormBase):
        raise TypeError(f"`instance_norm_sq_norm` expects an InstanceNorm, but got `{type(module).__name__}`.")
    _require_batch(module, inputs[0], instance_norm_batched_dims(module), "[N, C, *spatial]")
    dtype = accumulation_dtype(grad_output)
    use_input_stats = module.training or not module.track_running_stats
    running_mean = None if use_input_stats or module.running_mean is None else module.running_mean.to(dtype)
    running_var = None if use_input_stats or module.running_var is None else module.running_var.to(dtype)
    normalized = F.instance_norm(
        inputs[0].to(dtype), running_mean, running_var, None, None, use_input_stats=use_input_stats, eps=module.eps
    )
    return _affine_sq_norm(module, normalized, grad_output.to(dtype), tuple(range(2, grad_output.dim())), weights)


def batch_norm_sq_norm(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, *, weights: Weights = None
) -> Tensor:
    """Per-example squared gradient norm of a BatchNorm layer in eval mode (running statistics).

    Args:
        module: the layer.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, C, *]``.
        grad_output: the gradient flowing into its output, same shape.
        weights: elementwise weights of the squared gradient entries by parameter name, or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable parameters.

    Raises:
        TypeError: if ``module`` is not a BatchNorm.
        ValueError: if the layer normalises with batch statistics (training mode): the
            examples' gradients are coupled, so per-example norms are not defined.

    Example::

        >>> bn = nn.BatchNorm1d(2).eval()  # running mean 0, running variance 1
        >>> batch_norm_sq_norm(bn, (torch.tensor([[1.0, -1.0]]),), torch.ones(1, 2))  # ≈ 2 + 2
        tensor([4.0000])
        >>> batch_norm_sq_norm(bn.train(), (torch.ones(3, 2),), torch.ones(3, 2))
        Traceback (most recent call last):
        ...
        ValueError: Per-example gradient norms are not defined through `BatchNorm1d` in training mode: ...
    """
    if not isinstance(module, BatchNormBase):
        raise TypeError(f"`batch_norm_sq_norm` expects a BatchNorm, but got `{type(module).__name__}`.")
    running_mean, running_var = module.running_mean, module.running_var
    if module.training or running_mean is None or running_var is None:
        raise batch_norm_coupling_error("", module)
    _require_batch(module, inputs[0], 2, "[N, C, *]")
    dtype = accumulation_dtype(grad_output)
    normalized = F.batch_norm(
        inputs[0].to(dtype), running_mean.to(dtype), running_var.to(dtype), training=False, eps=module.eps
    )
    return _affine_sq_norm(module, normalized, grad_output.to(dtype), tuple(range(2, grad_output.dim())), weights)
