"""The AMP loss scale as a tensor, read without the host sync that ``GradScaler.get_scale()`` makes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["grad_scaler_scale"]


def grad_scaler_scale(scaler: Any) -> Tensor | None:
    """The current scale of an enabled ``torch.amp.GradScaler`` (a device tensor, no sync), else ``None``.

    ``None`` when ``scaler`` is ``None``, disabled, or has not scaled a loss yet. ``get_scale()`` returns the same
    value as a Python float, which would sync with the device at every step.

    Checked on torch 2.5.0-2.13.0 (``GradScaler._scale``, set by the first ``scale()``). A torch without it falls
    back to ``get_scale()`` (correct, one sync per call).

    Example::

        >>> scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        >>> _ = scaler.scale(torch.ones(()))
        >>> grad_scaler_scale(scaler)
        tensor(8.)
    """
    if scaler is None or not scaler.is_enabled():
        return None
    if not hasattr(scaler, "_scale"):
        return torch.tensor(float(scaler.get_scale()))
    scale = scaler._scale
    return scale if isinstance(scale, Tensor) else None
