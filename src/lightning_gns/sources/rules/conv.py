"""One norm rule for :class:`torch.nn.Conv1d`, :class:`~torch.nn.Conv2d` and :class:`~torch.nn.Conv3d`.

A convolution is a linear map applied at every output position ``p`` to the input patch
under the kernel, so its per-example weight gradient is ``Σ_p g_p a_pᵀ`` per group: the
linear kernel :func:`~lightning_gns.sources.rules.linear.sum_outer_sq_norm` applies to the
unfolded patches. The unfolding below is written once for any number of spatial dims
(strided views, one copy at the end) and honours stride, padding (including ``"same"``
and non-zero padding modes), dilation and groups.

With elementwise weights on the squared gradient entries (a preconditioner's :math:`P^2`),
the per-example gradient is a sum over positions with no rank-one shortcut: the kernel
materialises it per group, a few examples at a time, and weights it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns.sources.rules.linear import accumulation_dtype, param_weight, sum_outer_sq_norm, weighted_sum_sq

_CHUNK_ELEMENTS = 1 << 19  # patches of about 2 MiB of float32 per chunk


def unfold_patches(conv: nn.modules.conv._ConvNd, inputs: Tensor) -> Tensor:
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
    padding = conv._reversed_padding_repeated_twice
    if any(padding):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        inputs = F.pad(inputs, padding, mode=mode)
    patches = inputs
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
    if not isinstance(module, nn.modules.conv._ConvNd):
        raise TypeError(f"`conv_sq_norm` expects a convolution, but got `{type(module).__name__}`.")
    activation = inputs[0]
    if activation.dim() != len(module.kernel_size) + 2:
        raise ValueError(
            f"Per-example norms need a batch dimension, but `{type(module).__name__}` got an input of shape "
            f"{tuple(activation.shape)}. Feed batched inputs of shape [N, C, *spatial]."
        )
    dtype = accumulation_dtype(grad_output)
    batch, out_channels, groups = grad_output.shape[0], grad_output.shape[1], module.groups
    grad = grad_output.reshape(batch, out_channels, -1).to(dtype)
    result = grad.new_zeros(batch)
    if module.weight.requires_grad:
        weight = param_weight(weights, "weight", dtype)
        if weight is not None:
            # [C_out, C_in/g, *k] -> one [C_out/g, C_in/g·k] block per group, as the rows of the kernel come.
            weight = weight.reshape(groups, out_channels // groups, -1)
        positions = grad.shape[2]
        patch_size = activation.shape[1] * math.prod(module.kernel_size)
        # The patches are kernel-size times bigger than the input: a few examples at a time stay in cache.
        chunk = max(1, _CHUNK_ELEMENTS // (patch_size * positions))
        weight_sq = []
        for start in range(0, batch, chunk):
            patches = unfold_patches(module, activation[start : start + chunk].to(dtype))
            rows = patches.shape[0] * groups
            # Groups are independent blocks of the weight: fold them into the batch of the kernel.
            grad_groups = grad[start : start + chunk].reshape(rows, out_channels // groups, positions).transpose(1, 2)
            patches_groups = patches.reshape(rows, -1, positions).transpose(1, 2)
            weight_sq.append(sum_outer_sq_norm(grad_groups, patches_groups, weight).view(-1, groups).sum(1))
        result = result + (weight_sq[0] if len(weight_sq) == 1 else torch.cat(weight_sq))
    if module.bias is not None and module.bias.requires_grad:
        result = result + weighted_sum_sq(grad.sum(2), param_weight(weights, "bias", dtype))
    return result
