"""The reproducible batch stream: which samples each rank loads, in which order, with which seeds.

Why resume is bit-identical: the data order of an epoch is a function of (seed, epoch), and
every sample's augmentation is drawn from generators re-seeded from (seed, epoch, batch,
position) just before the sample is loaded (`SeededSamples`). So a checkpoint needs only
(epoch, batch) to continue the data stream exactly, whatever the number of loader workers and
wherever the run was cut.

Several processes: train.batch_size is the global batch, each rank loads batch_size / world_size
images. The plain sampler is torch's DistributedSampler (rank r takes every W-th index of the
epoch's permutation, so one step's rank batches together are exactly the single-process batch),
the M-per-class one is trainer.data.sampler's. Augmentation seeds are keyed by a sample's
position in the epoch's global order, not by rank, so the images are the same whatever the world
size.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from imlt.trainer import storage
from imlt.trainer.config import RunConfig
from imlt.trainer.data.manifest import ManifestRecord

log = logging.getLogger(__name__)

def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (numpy's SeedSequence does the hashing)."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SeededSamples(Dataset):
    """Loads each sample with the global generators seeded from its draw key.

    The batch sampler hands out (index, sample_seed) pairs; seeding torch, numpy and Python right
    before `dataset[index]` makes every random transform a function of (seed, epoch, batch,
    position), independent of worker count and of where a run was resumed. In the main process
    (no workers) the previous generator states are put back, so loading never disturbs
    model-side randomness.
    """

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:
            _seed_cpu_generators(seed)
            return self.inner[index]
        saved = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        _seed_cpu_generators(seed)
        try:
            return self.inner[index]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


def _seed_cpu_generators(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # CPU only: never reseeds CUDA generators
    np.random.seed(seed % 2**32)
    random.seed(seed)


def worker_init(worker_id: int) -> None:
    # Workers must die on the SIGTERM DataLoader sends at shutdown, not inherit the flag handler.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    base = torch.initial_seed()
    np.random.seed(base % 2**32)
    random.seed(base)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """This rank's batches of (index, sample_seed) for one epoch, optionally from a batch index on.

    Without `inner`, indices come from torch's DistributedSampler (a permutation seeded by
    (seed, epoch), rank r taking every world_size-th index) cut into batches of
    batch_size / world_size; incomplete last batches are dropped (BatchNorm and margin losses want
    full batches) unless the data is smaller than one batch. With `inner` (the M-per-class batch
    sampler, already sharded by rank), its batches are used as they come after
    `inner.set_epoch(epoch)`. Skipping to `start_batch` walks indices only, no images.

    A sample's seed is keyed by its position in the epoch's global order (global batch, then
    place in it), not by rank, so a data-parallel step sees the same augmented images as a single
    process with the whole batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        *,
        inner: Any | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples == 0:
            raise ValueError("the train dataset has no samples")
        if num_samples < world_size:
            raise ValueError(f"the train dataset has {num_samples} samples, fewer than the {world_size} processes")
        self.num_samples = num_samples
        self.local_batch = max(batch_size // world_size, 1)
        self.seed = seed
        self.inner = inner
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.inner is not None:
            return len(self.inner)
        per_rank = self.num_samples // self.world_size
        return max(per_rank // self.local_batch, 1)

    def _index_batches(self) -> Iterator[list[int]]:
        if self.inner is not None:
            self.inner.set_epoch(self.epoch)
            yield from self.inner
            return
        from torch.utils.data.distributed import DistributedSampler

        # DistributedSampler seeds its permutation with seed + epoch; handing it a mixed seed (and
        # epoch 0) keeps nearby (seed, epoch) pairs apart and the single-process order as it was.
        sampler = DistributedSampler(
            range(self.num_samples), num_replicas=self.world_size, rank=self.rank,  # type: ignore[arg-type]
            shuffle=True, seed=mix_seed(self.seed, self.epoch), drop_last=True,
        )
        mine = list(sampler)
        for b in range(len(self)):
            yield mine[b * self.local_batch : (b + 1) * self.local_batch]

    def _place(self, j: int) -> int:
        """Where this rank's j-th sample of a step stands among the step's global batch."""
        if self.inner is not None:  # the M-per-class plan: one step is W consecutive plan batches
            return self.rank * self.local_batch + j
        return self.world_size * j + self.rank  # DistributedSampler's striding

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b, batch in enumerate(self._index_batches()):
            if b >= self.start_batch:
                # (step, 0, place): the 0 stands where the rank was once, so one process draws as before
                yield [(int(i), mix_seed(self.seed, self.epoch, b, 0, self._place(j))) for j, i in enumerate(batch)]


@dataclass
class BatchStream:
    """A run's DataLoader over seeded samples and the EpochBatches sampler that drives it.

    `cache` holds the local copies of remote (oss://) images: fetched once, then read from disk in
    later epochs; it lives as long as the stream.
    """

    loader: DataLoader
    batches: EpochBatches
    cache: tempfile.TemporaryDirectory[str] | None = None


def build_stream(
    cfg: RunConfig, records: list[ManifestRecord], *, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
    workers: int | None = None,
) -> BatchStream:
    """The training batch stream of `records` for this rank.

    `workers` defaults to data.reader_threads, lowered (with one warning) to what /dev/shm holds.
    """
    from imlt.trainer.data.dataset import ImageDataset

    t = cfg.train
    cache = None
    if not all(storage.is_local(r.uri) for r in records):
        cache = tempfile.TemporaryDirectory(prefix="imlt-images-")
    dataset = ImageDataset(records, cfg.data.image_size, train=True, cache_dir=cache.name if cache else None)
    inner = None
    if t.m_per_class > 0:
        from imlt.trainer.data.sampler import MPerClassBatchSampler

        inner = MPerClassBatchSampler(
            dataset.labels, m=t.m_per_class, batch_size=t.batch_size, seed=t.seed, rank=rank, world_size=world_size,
        )
    batches = EpochBatches(len(dataset), t.batch_size, t.seed, inner=inner, rank=rank, world_size=world_size)
    workers = cfg.data.reader_threads if workers is None else workers
    one_batch, free = batch_bytes(batches.local_batch, cfg.data.image_size), shm_free_bytes()
    fit = workers_that_fit(workers, one_batch, free)
    if fit < workers:
        if rank == 0:
            log.warning(
                "%s has %.0f MiB free, too little for %d DataLoader workers handing over %.0f MiB batches "
                "(about %.0f MiB): using %d; mount a memory-backed %s (Kubernetes: an emptyDir with medium Memory) "
                "of at least that size to keep them all",
                SHM_DIR, (free or 0) / 2**20, workers, one_batch / 2**20,
                (workers * PREFETCH + 1) * one_batch * SHM_MARGIN / 2**20, fit, SHM_DIR,
            )
        workers = fit
    loader = DataLoader(
        SeededSamples(dataset),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=worker_init if workers > 0 else None,
        # worker base seeds come from here, not from the global generator
        generator=torch.Generator().manual_seed(mix_seed(t.seed, 1)),
    )
    return BatchStream(loader, batches, cache)


# --- /dev/shm: what DataLoader workers hand their batches over in ------------------------------------

SHM_DIR = "/dev/shm"
# DataLoader's default prefetch_factor: batches each worker keeps ready ahead of the loop.
PREFETCH = 2
# Headroom for labels, allocator rounding and the batch the loop is still using.
SHM_MARGIN = 1.25


def batch_bytes(local_batch: int, image_size: int) -> int:
    """Bytes of one batch of float32 RGB images, as a worker puts it into shared memory."""
    return local_batch * 3 * image_size * image_size * 4


def shm_free_bytes(shm_dir: str = SHM_DIR) -> int | None:
    """Free bytes in the shared-memory file system; None where there is none (not Linux)."""
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def workers_that_fit(requested: int, one_batch: int, free: int | None) -> int:
    """The most DataLoader workers (up to `requested`) whose batches fit in `free` bytes of /dev/shm.

    Workers hand every batch to the training process through shared memory, which on Linux is
    /dev/shm whatever torch's sharing strategy (file_system and file_descriptor both allocate
    there with shm_open), so switching the strategy would not help: a pod's default 64 MiB runs
    out and the loader dies with "unable to allocate shared memory". Fewer workers need less; no
    worker needs none (loading then runs in the training process). The data stream, and so the
    result, does not depend on the number of workers.
    """
    if requested <= 0 or free is None:
        return max(requested, 0)
    # in flight: PREFETCH batches a worker, plus the one the loop holds
    fit = int((free / (one_batch * SHM_MARGIN) - 1) // PREFETCH)
    return max(0, min(requested, fit))
