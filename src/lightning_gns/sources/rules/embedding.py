r"""Norm rule for :class:`torch.nn.Embedding`.

An example's gradient of the embedding table is a scatter: the output gradient of every
position ``t`` is added into row ``id_t``. Rows hit several times within one example
add up before squaring:

.. math::

    \|G_i\|_F^2 = \sum_{v} \Big\|\sum_{t:\, id_{i,t} = v} g_{i,t}\Big\|^2

For sequences up to a few hundred positions the same sum is a Gram form over positions,
``Σ_{t,s} [id_t = id_s] (g_t·g_s)``: one batched product of ``T²·D`` per example, cheaper
on CPU than anything that finds the distinct ids (2–5× for ``T`` = 16–64). For longer
sequences, distinct ids are found per example by sorting (no ``torch.unique``, whose
data-dependent output size would force a host sync), and the rows are summed with one
``scatter_add`` into a buffer of the output gradient's size. With elementwise weights
:math:`W` on the squared entries (a preconditioner's :math:`P^2`), each summed row is
weighted by the row of :math:`W` of its id: :math:`\sum_v W_v \cdot (\sum_{t: id_t = v}
g_t)^{\odot 2}`, and in the Gram form ``g_t`` is weighted by ``W_{id_t}`` on one side.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_gns.sources.rules.linear import accumulation_dtype, param_weight

# Up to this many positions per example the Gram form beats sorting (measured on CPU: equal at about 256).
_GRAM_MAX_STEPS = 192


def embedding_sq_norm(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor, *, weights: Mapping[str, Tensor] | None = None
) -> Tensor:
    """Per-example squared gradient norm of a :class:`torch.nn.Embedding`.

    Handles repeated ids within an example, ``padding_idx`` (its row gets no gradient) and
    ``scale_grad_by_freq`` (gradients divided by the id's count in the whole batch, as
    PyTorch does).

    Args:
        module: the embedding.
        inputs: the positional inputs of its forward; ``inputs[0]`` holds ids of shape ``[N, *]``.
        grad_output: the gradient flowing into its output, ``[N, *, D]``.
        weights: elementwise weights of the squared gradient entries by parameter name (``"weight"``), or
            ``None``.

    Returns:
        ``[N]`` squared norms (zero when the weight is frozen).

    Raises:
        TypeError: if ``module`` is not an embedding.

    Example::

        >>> emb = nn.Embedding(5, 2)
        >>> ids = torch.tensor([[1, 1], [1, 2]])  # row 1 twice in the first example
        >>> embedding_sq_norm(emb, (ids,), torch.ones(2, 2, 2))  # |2·g|² = 8, |g|² + |g|² = 4
        tensor([8., 4.])
    """
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"`embedding_sq_norm` expects an nn.Embedding, but got `{type(module).__name__}`.")
    if not module.weight.requires_grad:
        return grad_output.new_zeros(grad_output.shape[0], dtype=accumulation_dtype(grad_output))
    weight = param_weight(weights, "weight", accumulation_dtype(grad_output))
    return embedding_ids_sq_norm(
        inputs[0], grad_output, module.num_embeddings, module.padding_idx, module.scale_grad_by_freq, weight
    )


def embedding_rows(
    ids: Tensor,
    grad_output: Tensor,
    num_embeddings: int,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
) -> tuple[Tensor, Tensor]:
    """The ids ``[N, T]`` and the rows ``[N, T, D]`` (accumulation dtype) that each example adds into the table.

    The output gradient of each position, zero at ``padding_idx`` and divided by the id's count in the whole
    batch with ``scale_grad_by_freq``, as PyTorch's embedding backward does.

    Example::

        >>> ids, rows = embedding_rows(torch.tensor([[1, 0]]), torch.ones(1, 2, 3), 4, padding_idx=0)
        >>> rows.sum((1, 2))
        tensor([3.])
    """
    dtype = accumulation_dtype(grad_output)
    batch, dim = grad_output.shape[0], grad_output.shape[-1]
    ids = ids.reshape(batch, -1)
    grad = grad_output.reshape(batch, -1, dim).to(dtype)
    if padding_idx is not None:
        grad = grad * (ids != padding_idx).unsqueeze(-1)
    if scale_grad_by_freq:
        counts = torch.zeros(num_embeddings, dtype=dtype, device=ids.device)
        counts.index_add_(0, ids.reshape(-1), torch.ones(ids.numel(), dtype=dtype, device=ids.device))
        grad = grad / counts[ids].unsqueeze(-1)
    return ids, grad


def embedding_ids_sq_norm(
    ids: Tensor,
    grad_output: Tensor,
    num_embeddings: int,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
    weight: Tensor | None = None,
) -> Tensor:
    """Per-example squared norm of an embedding table's gradient, from the ids and the output gradient.

    The functional core of :func:`embedding_sq_norm`, for ``F.embedding`` calls as well as modules.

    Args:
        ids: ``[N, *]`` ids.
        grad_output: ``[N, *, D]`` the gradient flowing into the looked-up rows.
        num_embeddings: the number of rows of the table.
        padding_idx: a row that gets no gradient (non-negative), or ``None``.
        scale_grad_by_freq: divide each gradient by its id's count in the whole batch, as PyTorch does.
        weight: ``[num_embeddings, D]`` elementwise weights of the squared entries, or ``None``.

    Returns:
        ``[N]`` squared norms.

    Example::

        >>> embedding_ids_sq_norm(torch.tensor([[1, 1], [1, 2]]), torch.ones(2, 2, 2), num_embeddings=5)
        tensor([8., 4.])
    """
    ids, grad = embedding_rows(ids, grad_output, num_embeddings, padding_idx, scale_grad_by_freq)
    dtype, dim = grad.dtype, grad.shape[-1]
    if weight is not None:
        weight = weight.to(dtype)
    if ids.shape[1] == 1:
        squared = grad.square()
        return (squared if weight is None else squared * weight[ids]).sum((1, 2))
    if ids.shape[1] <= _GRAM_MAX_STEPS:
        same_id = ids.unsqueeze(2) == ids.unsqueeze(1)  # [N, T, T]
        weighted = grad if weight is None else grad * weight[ids]
        return (torch.bmm(weighted, grad.transpose(1, 2)) * same_id).sum((1, 2))
    sorted_ids, order = ids.sort(dim=1)
    is_new = torch.ones_like(sorted_ids, dtype=torch.long)
    is_new[:, 1:] = (sorted_ids[:, 1:] != sorted_ids[:, :-1]).long()
    # Slot k of example i collects the k-th distinct id of that example.
    slot_index = is_new.cumsum(1) - 1
    slot = slot_index.unsqueeze(-1).expand(-1, -1, dim)
    sorted_grad = grad.gather(1, order.unsqueeze(-1).expand(-1, -1, dim))
    rows = torch.zeros_like(grad).scatter_add_(1, slot, sorted_grad)
    if weight is None:
        return rows.square().sum((1, 2))
    # The id of each slot (every entry of a slot writes the same id; unused slots hold zero rows).
    slot_ids = torch.zeros_like(sorted_ids).scatter_(1, slot_index, sorted_ids)
    return (rows.square() * weight[slot_ids]).sum((1, 2))
