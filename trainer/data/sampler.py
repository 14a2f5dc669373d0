"""Batches of M images from each of K classes, sharded across distributed ranks.

Hand-written because PML's MPerClassSampler knows nothing of ranks: under DDP every process
would draw the same batches. Here every rank computes the same epoch plan from (seed, epoch)
and takes every world_size-th batch of it, so shards never overlap within a plan.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class MPerClassBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches: `m` images from each of `batch_size // world_size // m` classes.

    `batch_size` is the global batch (as in TrainConfig): each rank's batch is
    batch_size // world_size indices, so one optimiser step sees batch_size images in all.

    Classes are visited in shuffled rounds (each class once per round), and each class hands out
    its images in a shuffled cycle, so every class is seen equally often and an image repeats only
    after its class ran out of fresh ones (classes with fewer than m images repeat within a batch).
    An epoch has len(labels) // batch_size batches per rank (at least one).
    Call set_epoch(epoch) before each epoch, as with DistributedSampler.
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        m: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if m <= 0 or batch_size <= 0 or batch_size % (m * world_size):
            raise ValueError(
                f"train.batch_size ({batch_size}) must be a positive multiple of train.m_per_class ({m}) "
                f"times the number of processes ({world_size})"
            )
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            by_class.setdefault(int(label), []).append(i)
        self.local_batch_size = batch_size // world_size
        self.classes_per_batch = self.local_batch_size // m
        if self.classes_per_batch > len(by_class):
            raise ValueError(
                f"a batch of {self.local_batch_size} per process with m_per_class {m} needs "
                f"{self.classes_per_batch} classes, but the data has only {len(by_class)}; "
                "lower train.batch_size or raise train.m_per_class"
            )
        self._classes = sorted(by_class)
        self._indices = [np.asarray(by_class[c]) for c in self._classes]
        self.batch_size, self.m = batch_size, m
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self._num_batches = max(1, len(labels) // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._plan(self._num_batches * self.world_size)
        for batch in plan[self.rank :: self.world_size]:
            yield batch

    def _plan(self, num_batches: int) -> list[list[int]]:
        """The same list of batches on every rank: depends only on seed, epoch and labels."""
        rng = np.random.default_rng([self.seed, self.epoch])
        cycles = [_Cycle(idx, rng) for idx in self._indices]
        queue: list[int] = []
        plan: list[list[int]] = []
        k = self.classes_per_batch
        for _ in range(num_batches):
            if len(queue) < k:
                # Start the next round: top the batch up with classes of a fresh permutation that
                # are not in it already; those left over (queued ones included) keep their turn.
                fresh = rng.permutation(len(self._classes)).tolist()
                taken = [c for c in fresh if c not in queue][: k - len(queue)]
                chosen, queue = queue + taken, [c for c in fresh if c not in taken]
            else:
                chosen, queue = queue[:k], queue[k:]
            plan.append([i for c in chosen for i in cycles[c].take(self.m)])
        return plan


class _Cycle:
    """A class's images in shuffled order, reshuffled each time they run out."""

    def __init__(self, indices: np.ndarray, rng: np.random.Generator) -> None:
        self._indices, self._rng = indices, rng
        self._order: list[int] = []

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if not self._order:
                self._order = self._rng.permutation(self._indices).tolist()
            out.append(self._order.pop())
        return out
