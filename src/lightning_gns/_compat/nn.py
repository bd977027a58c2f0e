"""Private base classes and helpers of ``torch.nn`` that the norm rules match layers by.

``torch.nn`` has no public base class for its convolutions, batch norms and instance norms; the rules match
``Conv1d``-``Conv3d`` (and ``ConvTranspose``, ``LazyConv``) by the shared private base, as torch itself does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "BatchNormBase",
    "ConvBase",
    "InstanceNormBase",
    "conv_padding_for_pad",
    "instance_norm_batched_dims",
    "mha_shape_check",
]

ConvBase = _ConvNd
"""The base of torch's convolutions (``torch.nn.modules.conv._ConvNd``; checked on torch 2.5.0-2.13.0)."""
BatchNormBase = _BatchNorm
"""The base of torch's batch norms, ``SyncBatchNorm`` included (``_BatchNorm``; checked on torch 2.5.0-2.13.0)."""
InstanceNormBase = _InstanceNorm
"""The base of torch's instance norms (``_InstanceNorm``; checked on torch 2.5.0-2.13.0)."""


def conv_padding_for_pad(conv: ConvBase) -> list[int]:
    """The convolution's padding in the order ``F.pad`` takes it (last dimension first, both sides each).

    Checked on torch 2.5.0-2.13.0 (``_ConvNd._reversed_padding_repeated_twice``, which also resolves
    ``padding="same"``).

    Example::

        >>> import torch
        >>> conv_padding_for_pad(torch.nn.Conv2d(1, 1, 3, padding=(1, 2)))
        [2, 2, 1, 1]
    """
    return list(conv._reversed_padding_repeated_twice)


def instance_norm_batched_dims(module: InstanceNormBase) -> int:
    """The number of dimensions of a batched input to an instance norm (``[N, C, *spatial]``).

    Checked on torch 2.5.0-2.13.0 (``_InstanceNorm._get_no_batch_dim``, the unbatched rank).

    Example::

        >>> import torch
        >>> instance_norm_batched_dims(torch.nn.InstanceNorm2d(3))
        4
    """
    return int(module._get_no_batch_dim()) + 1


def mha_shape_check() -> Callable[..., Any] | None:
    """The check torch runs on the input shapes of ``multi_head_attention_forward``, or ``None`` if it has none.

    Checked on torch 2.5.0-2.13.0 (``F._mha_shape_check(query, key, value, key_padding_mask, attn_mask,
    num_heads)``, which raises ``AssertionError``/``RuntimeError`` on shapes it refuses and returns whether the
    input is batched).

    Example::

        >>> import torch
        >>> check = mha_shape_check()
        >>> x = torch.ones(5, 2, 4)  # [T, N, E]
        >>> check(x, x, x, None, None, 2)
        True
    """
    return getattr(F, "_mha_shape_check", None)
