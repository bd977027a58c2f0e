"""Pytree flattening, which torch exposes only as ``torch.utils._pytree`` (torch 2.5-2.13 have no public module)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils import _pytree

__all__ = ["tree_leaves", "tree_map"]


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of nested tuples, lists, dicts and namedtuples (and other registered containers), in order.

    Checked on torch 2.5.0-2.13.0 (``torch.utils._pytree.tree_leaves``).

    Example::

        >>> tree_leaves((1, [2, {"a": 3}]))
        [1, 2, 3]
    """
    return list(_pytree.tree_leaves(tree))


def tree_map(function: Callable[[Any], Any], tree: Any) -> Any:
    """``tree`` with ``function`` applied to each leaf, containers kept.

    Checked on torch 2.5.0-2.13.0 (``torch.utils._pytree.tree_map``).

    Example::

        >>> tree_map(lambda x: x * 10, (1, [2, {"a": 3}]))
        (10, [20, {'a': 30}])
    """
    return _pytree.tree_map(function, tree)
