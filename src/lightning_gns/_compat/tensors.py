"""Fused tensor kernels that torch exposes only under private names."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fused_norms"]


def fused_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norm of each tensor, in one fused kernel per device and dtype group (``torch._foreach_norm``).

    Checked on torch 2.5.0-2.13.0, where ``torch._foreach_norm`` takes a list of strided tensors and returns one
    0-d tensor each, in their dtype. A torch without it gets the same norms one kernel at a time.

    Example::

        >>> fused_norms([torch.tensor([3.0, 4.0]), torch.ones(4)])
        [tensor(5.), tensor(2.)]
    """
    foreach_norm = getattr(torch, "_foreach_norm", None)
    if foreach_norm is None:
        return [torch.linalg.vector_norm(t) for t in tensors]
    return list(foreach_norm(list(tensors)))
