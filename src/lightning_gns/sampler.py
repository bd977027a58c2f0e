"""``ResizableBatchSampler``: a distributed-aware batch sampler whose batch size can change mid-epoch.

Every rank draws the same permutation of the data set each epoch (seeded by ``seed + epoch``, as
:class:`~torch.utils.data.DistributedSampler` does), and each batch is the next ``batch_size × num_replicas``
indices of it, dealt round-robin over the ranks. The sampler knows its position, so a new batch size can take
effect at any batch that has not been drawn yet (``resize``): within an epoch no index is skipped or served twice,
on any rank. Without ``drop_last`` the last batch takes whatever is left (fewer than ``num_replicas`` leftovers
join the batch before), so every index is served exactly once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import Sampler

__all__ = ["ResizableBatchSampler"]


class _Segment(NamedTuple):
    """From batch ``first_batch`` on, batches of ``batch_size`` per rank, starting at ``offset`` in the order."""

    first_batch: int
    batch_size: int
    offset: int


class ResizableBatchSampler(Sampler[list[int]]):
    """Batches of indices for one rank, with a batch size that can change between batches.

    Args:
        dataset_size: number of examples in the (map-style) data set.
        batch_size: examples per batch on each rank.
        shuffle: draw a new permutation every epoch (else the natural order).
        seed: the permutation's seed; must be the same on every rank.
        drop_last: drop the last, smaller batch instead of serving it.
        num_replicas: number of ranks.
        rank: this rank, in ``[0, num_replicas)``.

    Example::

        >>> sampler = ResizableBatchSampler(10, batch_size=2, shuffle=False)
        >>> batches = iter(sampler)
        >>> next(batches), next(batches)
        ([0, 1], [2, 3])
        >>> sampler.resize(3)  # takes effect at the next batch not drawn yet
        2
        >>> list(batches), len(sampler)
        ([[4, 5, 6], [7, 8, 9]], 4)
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        for name, value in (("dataset_size", dataset_size), ("batch_size", batch_size), ("num_replicas", num_replicas)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Expected `rank` in [0, {num_replicas}), but got {rank!r}.")
        if dataset_size < num_replicas:
            raise ValueError(
                f"The data set has {dataset_size} examples, fewer than the {num_replicas} ranks: every rank needs at "
                "least one example per epoch."
            )
        self.dataset_size = dataset_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._segments = [_Segment(0, batch_size, 0)]
        self._next_epoch_batch_size = batch_size
        self._start_batch = 0  # where the next iteration starts (a resumed run starts mid-epoch)
        self._next_batch = 0  # the next batch an iterator would draw

    # -- the position ---------------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Examples per batch on each rank, from the last change on (what :meth:`resize` last set this epoch)."""
        return self._segments[-1].batch_size

    @property
    def next_epoch_batch_size(self) -> int:
        """The batch size the next epoch starts with."""
        return self._next_epoch_batch_size

    @property
    def next_batch(self) -> int:
        """Index (within the epoch) of the next batch not drawn yet: the first a :meth:`resize` can change."""
        return self._next_batch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch; the same epoch again keeps the position (a resumed run)."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self._segments = [_Segment(0, self._next_epoch_batch_size, 0)]
        self._start_batch = self._next_batch = 0

    def start_at(self, batch_index: int) -> None:
        """Make the next iteration start at ``batch_index`` of this epoch (the batches before it were trained on)."""
        if not 0 <= batch_index <= len(self):
            raise ValueError(f"Expected a batch index in [0, {len(self)}], but got {batch_index}.")
        self._start_batch = self._next_batch = batch_index

    def resize(self, batch_size: int, at_batch: int | None = None) -> int:
        """Serve batches of ``batch_size`` (per rank) from batch ``at_batch`` of this epoch on.

        Args:
            batch_size: the new number of examples per batch on each rank.
            at_batch: the first batch of the new size: not drawn yet, and the same on every rank (default: the
                next batch to draw). At or past the end of the epoch, the new size starts the next epoch.

        Returns:
            The index of the first batch of the new size within this epoch, or ``len(self)`` if it starts the next.

        Raises:
            ValueError: for a batch size below 1, or a batch that was already drawn.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be a positive integer, but got {batch_size!r}.")
        at = self._next_batch if at_batch is None else at_batch
        if at < self._next_batch or at < self._segments[-1].first_batch:
            raise ValueError(
                f"Batch {at} of this epoch was already drawn (the next is {self._next_batch}): a change can only "
                "affect batches not drawn yet."
            )
        self._next_epoch_batch_size = batch_size
        length = len(self)
        if at >= length:
            return length
        start, _ = self._bounds(at)
        if at == self._segments[-1].first_batch:  # a second change at the same batch replaces the first
            self._segments.pop()
        self._segments.append(_Segment(at, batch_size, start))
        return at

    # -- the batches ----------------------------------------------------------------------------------------------

    def _global_batch(self, segment: _Segment) -> int:
        return segment.batch_size * self.num_replicas

    def _num_batches(self, segment: _Segment) -> int:
        """Batches of the last segment, to the end of the epoch."""
        remaining = self.dataset_size - segment.offset
        full, leftover = divmod(remaining, self._global_batch(segment))
        if self.drop_last or leftover < self.num_replicas:
            return full  # leftovers too few for every rank join the last full batch (or are dropped)
        return full + 1

    def _bounds(self, batch: int) -> tuple[int, int]:
        """Start and stop, in the epoch's order, of the indices of ``batch`` (all ranks)."""
        segment = next(s for s in reversed(self._segments) if s.first_batch <= batch)
        start = segment.offset + (batch - segment.first_batch) * self._global_batch(segment)
        stop = start + self._global_batch(segment)
        if segment is self._segments[-1] and batch == segment.first_batch + self._num_batches(segment) - 1:
            stop = stop if self.drop_last else self.dataset_size  # the last batch takes what is left
        return start, stop

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def examples_through(self, batch: int) -> int:
        """Examples (all ranks) in the epoch's batches ``0..batch`` under the sizes set so far (0 before the first)."""
        if batch < 0:
            return 0
        return self._bounds(min(batch, len(self) - 1))[1]

    def __len__(self) -> int:
        """Batches in this epoch under the sizes set so far (those already drawn included)."""
        last = self._segments[-1]
        return last.first_batch + self._num_batches(last)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        batch = self._start_batch
        # `len(self)` is read again at every batch: a resize while iterating changes what is left.
        while batch < len(self):
            start, stop = self._bounds(batch)
            self._next_batch = batch + 1
            yield order[start:stop][self.rank :: self.num_replicas]
            batch += 1

    # -- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the sizes set in it and the next epoch's; the position is set with :meth:`start_at`."""
        return {
            "epoch": self.epoch,
            "segments": [tuple(s) for s in self._segments],
            "next_epoch_batch_size": self._next_epoch_batch_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.epoch = int(state_dict["epoch"])
        self._segments = [_Segment(*map(int, s)) for s in state_dict["segments"]]
        self._next_epoch_batch_size = int(state_dict["next_epoch_batch_size"])
        self._start_batch = self._next_batch = 0


def split_batch_size(effective: int, world_size: int, max_micro_batch_size: int | None) -> tuple[int, int]:
    """The micro-batch and accumulation for ``effective`` examples per step over ``world_size`` ranks.

    The micro-batch grows first, up to ``max_micro_batch_size``; then accumulation takes over. The result never
    exceeds ``effective`` (a bound the scheduler enforced): exactly ``effective`` when a split with at most twice
    the fewest micro-batches divides it, else the largest that fits.

    Example::

        >>> split_batch_size(512, world_size=2, max_micro_batch_size=64)
        (64, 4)
        >>> split_batch_size(40, world_size=1, max_micro_batch_size=16)  # 4 × 10, not 3 × 14 = 42
        (10, 4)
    """
    per_rank = max(1, effective // world_size)
    cap = per_rank if max_micro_batch_size is None else max_micro_batch_size
    fewest = math.ceil(per_rank / cap)
    for accumulate in range(fewest, 2 * fewest + 1):
        if per_rank % accumulate == 0:
            return per_rank // accumulate, accumulate
    return per_rank // fewest, fewest
