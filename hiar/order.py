"""Which prompts and trajectories each rank reads at each draw: a seeded shuffle per epoch.

A training program reads its data in draws: one micro-batch of `batch` items per rank. Draw d of rank
r takes the items at positions (d * world + r) * batch ... of one endless stream, and the stream visits
a fresh seeded permutation of the data set every epoch. So
* over one epoch every item is read exactly once across all ranks (each position belongs to one rank);
* the order is a pure function of (seed, draw number), so a resumed run reads exactly what the
  uninterrupted run would have read, with no sampler state to save;
* epochs differ in order, and no rank reads a strided subset of the data.

Programs count draws from their own update counters (`Draws`), e.g. distillation reads a trajectory
batch only at generator updates, so its trajectory draws are numbered by generator updates, not steps.
"""

from __future__ import annotations

import torch

from hiar.sampling import stable_hash


class ShuffledOrder:
    """Item indices of a data set of `size` items (None: an endless procedural stream, read in order)."""

    def __init__(self, size: int | None, seed: int, world: int, rank: int):
        if size is not None and size < 1:
            raise ValueError("an empty data set has no order")
        self.size, self.seed, self.world, self.rank = size, seed, world, rank
        self._epoch: tuple[int, list[int]] | None = None  # the permutation of the epoch read last

    def permutation(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(stable_hash("epoch", self.seed, epoch) & (2**63 - 1))
            self._epoch = (epoch, torch.randperm(self.size, generator=g).tolist())
        return self._epoch[1]

    def item(self, position: int) -> int:
        """The data index at `position` of the stream."""
        if self.size is None:
            return position
        epoch, within = divmod(position, self.size)
        return self.permutation(epoch)[within]

    def draw(self, number: int, batch: int) -> list[int]:
        """The `batch` item indices this rank reads at draw `number`."""
        first = (number * self.world + self.rank) * batch
        return [self.item(p) for p in range(first, first + batch)]


def updates_before(step: int, every: int) -> int:
    """How many of steps 0 .. step - 1 are multiples of `every` (updates made every `every`th step)."""
    return -(-step // every)
