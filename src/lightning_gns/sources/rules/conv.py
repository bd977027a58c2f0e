"""One norm rule for :class:`torch.nn.Conv1d`, :class:`~torch.nn.Conv2d` and :class:`~torch.nn.Conv3d`.

A convolution is a linear map applied at every output position ``p`` to the input patch
under the kernel, so its per-example weight gradient is ``G_i = Σ_p g_p a_pᵀ`` per group.
Its squared norm is taken one of three ways, chosen per call from the shapes alone:

- **Gram form** (few output positions, big patches): the linear kernel
  :func:`~lightning_gns.sources.rules.linear.sum_outer_sq_norm` on the unfolded patches,
  ``Σ_{p,q} (a_p·a_q)(g_p·g_q)``, never builds ``G_i``;
- **grouped convolution** (otherwise, with enough input channels per group): ``G_i`` of a
  chunk of examples is the weight gradient of one convolution in which every example is a
  group of its own (:func:`per_example_weight_grads`); it runs on the backend's
  convolution kernels and unfolds nothing;
- **unfolded patches times output gradients** (otherwise): grouped kernels with a handful
  of input channels per group, such as a first layer on RGB images, are slower than one
  batched matrix product.

The unfolding is written once for any number of spatial dims (strided views, one copy at
the end); every path honours stride, padding (including ``"same"`` and non-zero padding
modes), dilation and groups.

With elementwise weights on the squared gradient entries (a preconditioner's :math:`P^2`),
the per-example gradient has no rank-one shortcut: the Gram form is never taken, and the
other two weight the entries of the ``G_i`` they build.

The batch gradients of weight and bias are the sums of the per-example ones: where those
are built, :func:`conv_sq_norm_and_grads` returns the sums too, and the per-example engine
hands them to autograd through :class:`~lightning_gns.sources.rules.fused.FusedParamGrads`
instead of having autograd compute them a second time. The sums are of the unweighted
per-example gradients (the real batch gradient) whether or not the norms are weighted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns._compat.nn import ConvBase, conv_padding_for_pad
from lightning_gns.sources.rules.linear import accumulation_dtype, param_weight, sum_outer_sq_norm, weighted_sum_sq

# Unfolded patches are kernel-size times bigger than the input: about 2 MiB of float32 per chunk stays in cache.
_CHUNK_ELEMENTS = 1 << 19
# Per-example weight gradients of one chunk of examples, about 8 MiB of float32: bigger chunks fall out of the
# cache, smaller ones starve the grouped kernels (measured on CPU, oneDNN).
_GRAD_CHUNK_ELEMENTS = 1 << 21
# Input channels per group from which the grouped kernels beat unfolding and a batched product (CPU, oneDNN).
_GROUPED_MIN_CHANNELS = 8


def unfold_patches(conv: ConvBase, inputs: Tensor) -> Tensor:
    """The input patches that a convolution multiplies with its kernel, for any number of spatial dims.

    Args:
        conv: the convolution (only its geometry is read).
        inputs: ``[N, C, *spatial]``.

    Returns:
        ``[N, C·prod(kernel_size), P]``, channel-major like the flattened weight, with ``P``
        the number of output positions.

    Example::

        >>> import torch
        >>> conv = nn.Conv1d(1, 1, kernel_size=2)
        >>> unfold_patches(conv, torch.arange(4.0).view(1, 1, 4))
        tensor([[[0., 1., 2.],
                 [1., 2., 3.]]])
    """
    spatial = inputs.dim() - 2
    patches, _ = _pad(conv, inputs, explicit=True)
    for dim in range(spatial):
        kernel, dilation, stride = conv.kernel_size[dim], conv.dilation[dim], conv.stride[dim]
        # Tensor.unfold slides a window of the dilated span and appends it as the last dim.
        patches = patches.unfold(2 + dim, dilation * (kernel - 1) + 1, stride)
        if dilation > 1:
            patches = patches[..., ::dilation]
    batch, channels = inputs.shape[:2]
    # [N, C, *out, *kernel] -> [N, C, *kernel, *out], flattened like weight.view(C_out, -1).
    order = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]
    return patches.permute(order).reshape(batch, channels * math.prod(conv.kernel_size), -1)


def per_example_weight_grads(conv: ConvBase, inputs: Tensor, grad_output: Tensor) -> Tensor:
    """Every example's weight gradient of a convolution, from one grouped convolution.

    The examples are stacked along the channels and the convolution is run with ``N·groups``
    groups: its weight gradient holds one block per example.

    Args:
        conv: the convolution (only its geometry is read).
        inputs: ``[N, C_in, *spatial]``.
        grad_output: ``[N, C_out, *spatial_out]``, in the dtype of ``inputs``.

    Returns:
        ``[N, *conv.weight.shape]``.

    Example::

        >>> import torch
        >>> conv = nn.Conv1d(1, 1, kernel_size=2, bias=False)
        >>> x = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 1.0, 0.0]]])
        >>> per_example_weight_grads(conv, x, torch.ones(2, 1, 2))  # Σ_p of each window position
        tensor([[[[3., 5.]]],
        <BLANKLINE>
                [[[1., 1.]]]])
    """
    batch = inputs.shape[0]
    # Only the weight's shape is read; an expanded scalar allocates nothing (as in torch.nn.grad.conv2d_weight).
    weight = grad_output.new_empty(1).expand(batch * conv.out_channels, *conv.weight.shape[1:])
    grads = _weight_grad(
        conv,
        inputs.reshape(1, -1, *inputs.shape[2:]),
        grad_output.reshape(1, -1, *grad_output.shape[2:]),
        weight,
        conv.groups * batch,
    )
    return grads.reshape(batch, *conv.weight.shape)


def batch_weight_grad(conv: ConvBase, inputs: Tensor, grad_output: Tensor) -> Tensor:
    """The weight gradient of a convolution for a batch, as autograd computes it (differentiable).

    Args:
        conv: the convolution.
        inputs: ``[N, C_in, *spatial]``.
        grad_output: ``[N, C_out, *spatial_out]``.

    Returns:
        A tensor shaped like ``conv.weight``.

    Example::

        >>> import torch
        >>> conv = nn.Conv1d(1, 1, kernel_size=2, bias=False)
        >>> x = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 1.0, 0.0]]])
        >>> batch_weight_grad(conv, x, torch.ones(2, 1, 2))  # the sum of the per-example gradients
        tensor([[[4., 6.]]])
    """
    return _weight_grad(conv, inputs, grad_output, conv.weight.detach(), conv.groups)


def _weight_grad(conv: ConvBase, inputs: Tensor, grad_output: Tensor, weight: Tensor, groups: int) -> Tensor:
    inputs, padding = _pad(conv, inputs, explicit=False)
    return torch.ops.aten.convolution_backward(
        grad_output,
        inputs,
        weight,
        None,
        list(conv.stride),
        padding,
        list(conv.dilation),
        False,
        [0] * (inputs.dim() - 2),
        groups,
        [False, True, False],
    )[1]


def conv_batch_grads(
    conv: nn.Module, inputs: Tensor, grad_output: Tensor, weight: bool, bias: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The batch gradients of a convolution's weight and bias (those asked for), as autograd computes them.

    The fallback of :class:`~lightning_gns.sources.rules.fused.FusedParamGrads` for a convolution.

    Args:
        conv: the convolution.
        inputs: ``[N, C_in, *spatial]``.
        grad_output: ``[N, C_out, *spatial_out]``.
        weight: compute the weight's.
        bias: compute the bias's.

    Returns:
        The weight's and the bias's gradients, ``None`` where not asked for.

    Example::

        >>> import torch
        >>> conv = nn.Conv1d(1, 1, kernel_size=2)
        >>> x = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 1.0, 0.0]]])
        >>> conv_batch_grads(conv, x, torch.ones(2, 1, 2), True, True)
        (tensor([[[4., 6.]]]), tensor([4.]))
    """
    assert isinstance(conv, ConvBase)  # registered for convolutions only
    weight_grad = batch_weight_grad(conv, inputs, grad_output) if weight else None
    bias_grad = grad_output.sum([0, *range(2, grad_output.dim())]) if bias else None
    return weight_grad, bias_grad


def conv_sq_norm(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, *, weights: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Per-example squared gradient norm of an N-d convolution (weight and bias).

    Args:
        module: a ``Conv1d``, ``Conv2d`` or ``Conv3d``.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, C_in, *spatial]``.
        grad_output: the gradient flowing into its output, ``[N, C_out, *spatial_out]``.
        weights: elementwise weights of the squared gradient entries by parameter name (``"weight"``,
            ``"bias"``), or ``None``.

    Returns:
        ``[N]`` squared norms over the layer's trainable parameters.

    Raises:
        TypeError: if ``module`` is not a convolution.
        ValueError: if the input has no batch dimension.

    Example::

        >>> import torch
        >>> conv = nn.Conv2d(1, 1, kernel_size=1, bias=False)
        >>> conv_sq_norm(conv, (torch.ones(2, 1, 2, 2),), torch.ones(2, 1, 2, 2))  # (Σ_p 1·1)² = 16
        tensor([16., 16.])
    """
    return _conv_sq_norm(module, inputs, grad_output, with_grads=False, weights=weights)[0]


def conv_sq_norm_and_grads(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_output: Tensor,
    *,
    weights: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`conv_sq_norm`, and the batch's gradients of weight and bias where the per-example ones were built.

    A batch gradient is the sum of the per-example ones: it costs one sum once they are
    built. The bias's always are (when it is trainable); the weight's are not when the Gram
    form was cheaper, and then its batch gradient is ``None``. With ``weights`` only the
    norms are weighted: the batch gradients are the plain sums.

    Args:
        module: a ``Conv1d``, ``Conv2d`` or ``Conv3d``.
        inputs: the positional inputs of its forward; ``inputs[0]`` is ``[N, C_in, *spatial]``.
        grad_output: the gradient flowing into its output, ``[N, C_out, *spatial_out]``.
        weights: elementwise weights of the squared gradient entries by parameter name (``"weight"``,
            ``"bias"``), or ``None``.

    Returns:
        ``[N]`` squared norms, the weight's and the bias's batch gradients (in the
        accumulation dtype) or ``None``.

    Raises:
        TypeError: if ``module`` is not a convolution.
        ValueError: if the input has no batch dimension.

    Example::

        >>> import torch
        >>> conv = nn.Conv1d(1, 1, kernel_size=2)
        >>> x = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 1.0, 0.0]]])
        >>> conv_sq_norm_and_grads(conv, (x,), torch.ones(2, 1, 2))  # weights (3, 5) and (1, 1), biases 2 and 2
        (tensor([38.,  6.]), tensor([[[4., 6.]]]), tensor([4.]))
    """
    return _conv_sq_norm(module, inputs, grad_output, with_grads=True, weights=weights)


def _conv_sq_norm(
    module: nn.Module,
    inputs: tuple[Tensor, ...],
    grad_output: Tensor,
    with_grads: bool,
    weights: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if not isinstance(module, ConvBase):
        raise TypeError(f"`conv_sq_norm` expects a convolution, but got `{type(module).__name__}`.")
    activation = inputs[0]
    if activation.dim() != len(module.kernel_size) + 2:
        raise ValueError(
            f"Per-example norms need a batch dimension, but `{type(module).__name__}` got an input of shape "
            f"{tuple(activation.shape)}. Feed batched inputs of shape [N, C, *spatial]."
        )
    dtype = accumulation_dtype(grad_output)
    grad = grad_output.to(dtype)
    terms, weight_grad, bias_grad = [], None, None
    if module.weight.requires_grad:
        weight = param_weight(weights, "weight", dtype)
        path = _weight_path(module, activation, grad)
        if path == "gram" and weight is not None:
            path = "unfolded"  # a weighted norm needs the G_i themselves
        if path == "grouped":
            weight_sq, weight_grad = _grouped_sq_norm(module, activation, grad, with_grads, weight)
        else:
            weight_sq, weight_grad = _unfolded_sq_norm(module, activation, grad, path == "gram", with_grads, weight)
        terms.append(weight_sq)
    if module.bias is not None and module.bias.requires_grad:
        per_example = grad.flatten(2).sum(2)
        bias_weight = param_weight(weights, "bias", dtype)
        terms.append(weighted_sum_sq(per_example, bias_weight))
        if with_grads:
            bias_grad = per_example.sum(0)
    if not terms:
        return grad.new_zeros(grad.shape[0]), None, None
    return (terms[0] if len(terms) == 1 else terms[0] + terms[1]), weight_grad, bias_grad


def _weight_path(conv: ConvBase, activation: Tensor, grad: Tensor) -> Literal["gram", "grouped", "unfolded"]:
    """How the weight's per-example norms are taken, from the shapes alone (see the module docstring)."""
    positions, groups = math.prod(grad.shape[2:]), conv.groups
    in_per_group, out_per_group = activation.shape[1] // groups, grad.shape[1] // groups
    patch_size = in_per_group * math.prod(conv.kernel_size)
    # The cost model of sum_outer_sq_norm: the Gram form costs T²(K+L), building G_i costs T·K·L.
    if positions * (patch_size + out_per_group) < patch_size * out_per_group:
        return "gram"
    return "grouped" if in_per_group >= _GROUPED_MIN_CHANNELS else "unfolded"


def _grouped_sq_norm(
    conv: ConvBase, activation: Tensor, grad: Tensor, with_grads: bool, weight: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    batch = grad.shape[0]
    chunk = _chunk_size(batch, _GRAD_CHUNK_ELEMENTS // conv.weight.numel())
    norms, weight_grad = [], None
    for start in range(0, batch, chunk):
        grads = per_example_weight_grads(
            conv, activation[start : start + chunk].to(grad.dtype), grad[start : start + chunk]
        )
        if weight is None:
            norms.append(torch.linalg.vector_norm(grads.flatten(1), dim=1).square())
        else:
            norms.append(weighted_sum_sq(grads, weight))
        if with_grads:
            weight_grad = grads.sum(0) if weight_grad is None else weight_grad + grads.sum(0)
    return (norms[0] if len(norms) == 1 else torch.cat(norms)), weight_grad


def _unfolded_sq_norm(
    conv: ConvBase,
    activation: Tensor,
    grad: Tensor,
    gram: bool,
    with_grads: bool,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    batch, groups = grad.shape[0], conv.groups
    grad = grad.flatten(2)
    out_per_group, positions = grad.shape[1] // groups, grad.shape[2]
    if weight is not None:
        # [C_out, C_in/g, *k] -> [groups, K, L], laid out as the per-group products below.
        weight = weight.reshape(groups, out_per_group, -1).transpose(1, 2)
    patch_size = activation.shape[1] * math.prod(conv.kernel_size)
    # The patches are kernel-size times bigger than the input: a few examples at a time stay in cache.
    chunk = _chunk_size(batch, _CHUNK_ELEMENTS // (patch_size * positions))
    norms, weight_grad = [], None
    for start in range(0, batch, chunk):
        patches = unfold_patches(conv, activation[start : start + chunk].to(grad.dtype))
        rows = patches.shape[0] * groups
        # Groups are independent blocks of the weight: fold them into the batch of the kernel.
        patches_groups = patches.reshape(rows, -1, positions)
        grad_groups = grad[start : start + chunk].reshape(rows, out_per_group, positions)
        if gram:
            norms.append(
                sum_outer_sq_norm(grad_groups.transpose(1, 2), patches_groups.transpose(1, 2)).view(-1, groups).sum(1)
            )
            continue
        # [M, K, L]: with few patch rows (an RGB first layer) MKL runs this orientation markedly faster than [M, L, K].
        outer = torch.bmm(patches_groups, grad_groups.transpose(1, 2))
        if weight is None:
            norms.append(torch.linalg.vector_norm(outer.view(-1, groups * outer[0].numel()), dim=1).square())
        else:
            norms.append((outer.view(-1, groups, *outer.shape[1:]).square() * weight).flatten(1).sum(1))
        if with_grads:
            # Σ over the chunk's examples, per group: [groups, K, L] -> the weight's [C_out, C_in / groups, *kernel].
            summed = outer.view(-1, groups, *outer.shape[1:]).sum(0).transpose(1, 2).reshape(conv.weight.shape)
            weight_grad = summed if weight_grad is None else weight_grad + summed
    return (norms[0] if len(norms) == 1 else torch.cat(norms)), None if gram else weight_grad


def _chunk_size(batch: int, most: int) -> int:
    """Examples per chunk: at most ``most`` (at least one), the chunks as equal as can be.

    A last chunk of a few examples would run the kernels at a fraction of their speed.
    """
    chunks = -(-batch // max(1, most))
    return -(-batch // chunks)


def _pad(conv: ConvBase, inputs: Tensor, explicit: bool) -> tuple[Tensor, list[int]]:
    """Pad ``inputs`` as the convolution does; zero padding is left to the convolution kernels unless ``explicit``.

    Returns:
        The input and the symmetric zero padding that still has to be applied to it.
    """
    spatial = inputs.dim() - 2
    if not explicit and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return inputs, list(conv.padding)
    padding = conv_padding_for_pad(conv)
    if any(padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        inputs = F.pad(inputs, padding, mode=mode)
    return inputs, [0] * spatial
