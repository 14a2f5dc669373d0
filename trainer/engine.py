"""The training loop: seeded data, AMP, checkpoints, exact resume, time limit, SIGTERM.

Shape (after Lightning Fabric's "build your own trainer"): `Trainer.fit` -> `train_epoch` ->
`training_step`, plus `save_checkpoint`, `load_checkpoint`, `latest_checkpoint`. A global step
counts optimiser steps; the learning rate is a pure function of it.

Reproducibility, and why resume is bit-identical:
- The data order of an epoch is a function of (seed, epoch), and every sample's augmentation is
  drawn from generators re-seeded from (seed, epoch, batch, position) just before the sample is
  loaded (`_SeededSamples`). So a checkpoint needs only (epoch, batch) to continue the data
  stream exactly, whatever the number of loader workers and wherever the run was cut.
- Model-side randomness (dropout, drop-path) uses the global generators of the main process;
  their states go into every checkpoint and are restored on resume.
- Model, loss (class centres), optimiser, LR scheduler, grad scaler and epoch statistics are all
  in the checkpoint, which is one dict read back with `torch.load(weights_only=True)`.

Stopping:
- Time limit (`train.max_hours`, per process invocation; env IMLT_MAX_SECONDS overrides it, and
  the clock is injectable): at the next step boundary the loop writes a checkpoint, then
  finishes normally (model, history, usage) with `stopped_early=True`. Resuming continues.
- SIGTERM (Kubernetes eviction, Airflow kill): the handler only sets a flag; at the next step
  boundary the loop writes a checkpoint - mid-epoch, holding the batch index - and raises
  `TrainingInterrupted`. Raising (not returning) keeps an orchestrator from taking a half-trained
  run for a finished one; its retry resumes from that checkpoint and continues exactly.
- A NaN/inf loss raises `NonFiniteLossError` naming epoch, batch index and global step before
  any weight is touched; checkpoints already written stay as they were.

Several processes (torchrun; `imlt train --nproc-per-node N` starts it, see trainer.launch):
- `run_training` joins the job's process group (gloo on CPU, nccl on cuda:LOCAL_RANK) for the
  run and leaves it after; nothing joins one at import. Rank and world size come from the
  variables torchrun sets, so a bare `torchrun -m imlt.trainer.cli train ...` in a Kubeflow Trainer
  pod works unchanged. `compute.nnodes x compute.nproc_per_node` must equal WORLD_SIZE (a
  default 1 x 1 config takes torchrun's shape). compute.mode=distributed, or more than one
  process asked for, without torchrun is refused rather than trained standalone.
- train.batch_size is the global batch: each rank loads batch_size / world_size images. The
  plain sampler is torch's DistributedSampler (rank r takes every W-th index of the epoch's
  permutation, so one step's rank batches together are exactly the single-process batch), the
  M-per-class one is trainer.data.sampler's. Augmentation seeds are keyed by a sample's position
  in the epoch's global order, not by rank, so the images are the same whatever the world size.
- data-parallel: DistributedDataParallel over one module holding the embedding model and the
  loss (class centres), so both are averaged. model-parallel: the class centres are sharded by
  class (trainer.distributed); only the embedding model is in DDP, and because the sharded loss
  is replicated (every rank holds the whole global-batch loss) the backbone's true gradient is
  the sum over ranks, so its DDP-averaged gradient is multiplied by the world size.
- BatchNorm: converted to SyncBatchNorm on CUDA; on CPU (gloo, where SyncBatchNorm does not
  run) batch statistics are per rank, the one place a multi-process run differs from one process.
- Every rank logs the global-batch loss (all-reduced before backward, so all ranks agree on a
  NaN and raise together) and all ranks agree on stopping (SIGTERM, time limit): a stop code is
  all-reduced (MAX) at every step boundary, so no rank is left waiting in a collective.
- Only rank 0 writes files and logs (checkpoints, history, model, curve, usage); ranks wait at a
  barrier where they must not run ahead of those writes. A model-parallel checkpoint is sharded
  (one file per rank for the class shards and the optimiser, the rest once) and resumes only on
  the same world size.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from imlt.trainer import checkpoint as ckpt
from imlt.trainer import storage
from imlt.trainer.config import (
    ComputeMode,
    ConfigError,
    Device,
    ModelType,
    OptimizerName,
    RunConfig,
    Scheduler,
    config_diff,
)
from imlt.trainer.data.manifest import CLASSES, MANIFEST, ManifestRecord, read_classes, read_manifest
from imlt.trainer.distributed import (
    DistEnv,
    barrier,
    destroy_process_group,
    init_process_group,
    load_sharded,
    local_device,
    save_sharded,
)
from imlt.trainer.history import CURVE, EpochMeter, EpochStats, plot_training_curve, write_history
from imlt.trainer.launch import under_torchrun
from imlt.trainer.losses.base import LossOutput
from imlt.trainer.steps import TrainInput, TrainOutput

log = logging.getLogger(__name__)

MAX_SECONDS_ENV = "IMLT_MAX_SECONDS"
CONFIG_FILE = "config.json"
USAGE_FILE = "usage.json"
# Multiplier milestones of the "step" schedule, as fractions of the post-warmup steps.
STEP_MILESTONES = (0.5, 0.75)
STEP_GAMMA = 0.1
# Checkpoint keys that differ per rank in a model-parallel run (the class shard and its optimiser state).
SHARDED_KEYS = ("loss", "optimizer")
# Stop codes all-reduced with MAX, so a SIGTERM on any rank wins over a time limit.
_NO_STOP, _TIME_LIMIT, _SIGTERM = 0, 1, 2


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the weights of that step were not updated."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM arrived; a checkpoint was written and a resumed run continues from it."""

    def __init__(self, message: str, checkpoint: str = "") -> None:  # default: exceptions must unpickle from args
        super().__init__(message)
        self.checkpoint = checkpoint


class ResumeConfigError(ConfigError):
    """The checkpoint in output_dir belongs to a run with different parameters."""


def run_training(
    inp: TrainInput,
    *,
    clock: Callable[[], float] | None = None,
    max_seconds: float | None = None,
) -> TrainOutput:
    """Train an embedding model on a read_data folder; the step function behind trainer.steps.train.

    `clock` and `max_seconds` exist so tests (and callers with their own deadline) can drive the
    time limit; by default it is `train.max_hours` of wall time, or env IMLT_MAX_SECONDS.
    """
    if not inp.train_dataset:
        hint = f" (data.train_annotations={inp.config.data.train_annotations!r})" if inp.config.data.train_annotations else ""
        raise ValueError(
            "no train dataset: TrainInput.train_dataset is empty; run read_data on the train annotations"
            f"{hint} and pass its dataset_dir"
        )
    from imlt.trainer.storage.lease import training_lease  # a second attempt on this folder waits or stops

    cfg = resolve_compute(inp.config)
    with distributed_session(cfg) as env, training_lease(cfg.output_dir, env.is_main):
        trainer = Trainer(cfg, inp.train_dataset, resume=inp.resume, clock=clock, max_seconds=max_seconds, env=env)
        return trainer.fit()


def resolve_compute(cfg: RunConfig, environ: dict[str, str] | None = None) -> RunConfig:
    """The config with compute.nnodes/nproc_per_node agreeing with the processes actually running.

    Refuses, rather than quietly training in one process, a config that asks for several
    processes (compute.mode=distributed, or nnodes x nproc_per_node > 1) in a process torchrun did
    not start: a KFP/Airflow task or a plain `python` call. Under torchrun, a default 1 x 1 config
    takes torchrun's shape (a bare `torchrun --nproc-per-node 2 -m imlt.trainer.cli train ...`); any
    other disagreement with WORLD_SIZE is an error, because the config names the run (its hash
    guards resume) and its usage record.
    """
    env = os.environ if environ is None else environ
    c = cfg.compute
    if not under_torchrun(env):
        if c.mode == ComputeMode.DISTRIBUTED:
            raise ConfigError(
                f"compute.mode=distributed (nnodes={c.nnodes}, nproc_per_node={c.nproc_per_node}) runs under torchrun on "
                "every node, and this process was not started by torchrun (no RANK in its environment); it will not "
                "train standalone. On Kubernetes submit it as a Kubeflow TrainJob: `imlt k8s-job CONFIG` prints the "
                "manifest (the KFP and Airflow train steps submit it for you); by hand, run `imlt train --config CONFIG "
                "--nnodes N --node-rank R --master-addr HOST` on each node"
            )
        if c.world_size > 1:
            raise ConfigError(
                f"compute.nproc_per_node={c.nproc_per_node} x compute.nnodes={c.nnodes} asks for {c.world_size} "
                "processes, but this one was not started by torchrun; run `imlt train --nproc-per-node "
                f"{c.nproc_per_node} ...` (it starts torchrun) or `torchrun --nproc-per-node {c.nproc_per_node} "
                "-m imlt.trainer.cli train ...`, or set compute.nproc_per_node=1"
            )
        return cfg
    world = int(env.get("WORLD_SIZE", "1"))
    if c.world_size == world:
        return cfg
    if c.world_size == 1:
        per_node = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        nnodes = max(world // max(per_node, 1), 1)
        mode = ComputeMode.DISTRIBUTED if nnodes > 1 else c.mode
        if env.get("RANK") == "0":
            log.info("compute: torchrun started %d x %d processes; recording that in the run's config", nnodes, per_node)
        compute = c.model_copy(update={"nproc_per_node": per_node, "nnodes": nnodes, "mode": mode})
        return cfg.model_copy(update={"compute": compute})
    raise ConfigError(
        f"compute.nnodes x compute.nproc_per_node = {c.nnodes} x {c.nproc_per_node} = {c.world_size}, but torchrun "
        f"started WORLD_SIZE={world} processes; make the config and the launch agree "
        "(`imlt train --nproc-per-node N --nnodes M` sets both)"
    )


@contextlib.contextmanager
def distributed_session(cfg: RunConfig, environ: dict[str, str] | None = None) -> Iterator[DistEnv]:
    """This process's place in the job, with the process group joined for the run (if several).

    Leaves the group afterwards only if it joined it here, so a caller that set one up (a test
    running several trainings in one launch) keeps it.
    """
    env = DistEnv.from_env(environ)
    if not env.distributed:
        yield env
        return
    import torch.distributed as dist

    joined = not dist.is_initialized()
    init_process_group(resolve_device(cfg.train.device), environ)
    try:
        yield env
    finally:
        if joined:
            destroy_process_group()


# --- pure helpers ---------------------------------------------------------------------------------


def resolve_device(choice: Device) -> torch.device:
    if choice == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available here; use auto or cpu")
    return torch.device(choice.value)


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (numpy's SeedSequence does the hashing)."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: Scheduler) -> float:
    """Multiplier of the peak LR for optimiser step `step` (0-based).

    Hand-written because it is a few lines and must be a pure function of the step (so resume
    needs only the step count); torch's LambdaLR does the optimiser bookkeeping around it.
    Linear warmup from 1/warmup to 1, then cosine to 0, steps of x0.1 at 50% and 75%, or flat.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if schedule == Scheduler.COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    if schedule == Scheduler.STEP:
        return STEP_GAMMA ** sum(done >= m for m in STEP_MILESTONES)
    return 1.0


def resolve_config(cfg: RunConfig, classes: list[str], dataset_dir: str) -> RunConfig:
    """Fill model.num_classes from the dataset's class list; refuse a conflicting explicit value."""
    n = len(classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes != n:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the train dataset's "
            f"{storage.join(dataset_dir, CLASSES)} lists {n} classes; omit model.num_classes or set it to {n}"
        )
    if cfg.model.num_classes == n:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_classes": n})})


def _check_labels(records: list[ManifestRecord], num_classes: int, dataset_dir: str) -> None:
    for r in records:
        if not r.labels:
            raise ValueError(f"{storage.join(dataset_dir, MANIFEST)}: record from {r.source} has no label")
        bad = [lab for lab in r.labels if not 0 <= lab < num_classes]
        if bad:
            raise ValueError(
                f"{storage.join(dataset_dir, MANIFEST)}: record from {r.source} has label id {bad[0]}, "
                f"outside 0..{num_classes - 1} of classes.txt"
            )


# --- reproducible data stream ---------------------------------------------------------------------


class _SeededSamples(Dataset):
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


def _worker_init(worker_id: int) -> None:
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


class _Objective(nn.Module):
    """Embedding model and loss as one module: what DistributedDataParallel wraps (data-parallel)
    so the class centres are averaged with the backbone. Returns plain tensors, not LossOutput,
    because DDP walks a forward's output for tensors."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, device_type: str, fp16: bool) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.device_type, self.fp16 = device_type, fp16

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=self.device_type, dtype=torch.float16, enabled=self.fp16):
            embeddings = self.model(images)
        out = self.loss_fn(embeddings, labels)
        return out.total, out.metric, out.classification


# --- the trainer ----------------------------------------------------------------------------------


class Trainer:
    """One training run over one output folder; `fit()` trains (or resumes) and writes the model."""

    def __init__(
        self,
        cfg: RunConfig,
        train_dataset: str,
        *,
        resume: bool = True,
        clock: Callable[[], float] | None = None,
        max_seconds: float | None = None,
        env: DistEnv | None = None,
    ) -> None:
        """`env`: this process's rank and world size; with several, the process group must be joined
        (run_training does both). Default: a single process."""
        from imlt.trainer.model import build_model

        if not storage.exists(storage.join(train_dataset, MANIFEST)):
            raise FileNotFoundError(f"train dataset {train_dataset}: no {MANIFEST} (is it a read_data output folder?)")
        self.classes = read_classes(train_dataset)
        self.cfg = resolve_config(cfg, self.classes, train_dataset)
        self.train_dataset = train_dataset
        self.resume = resume
        self.output_dir = self.cfg.output_dir
        self.checkpoint_dir = storage.join(self.output_dir, ckpt.CHECKPOINT_DIR)
        self.clock = clock or time.monotonic
        env_limit = os.environ.get(MAX_SECONDS_ENV)
        if max_seconds is None and env_limit:
            try:
                max_seconds = float(env_limit)
            except ValueError:
                raise ConfigError(f"{MAX_SECONDS_ENV}={env_limit!r} is not a number of seconds") from None
        self.max_seconds = max_seconds if max_seconds is not None else self.cfg.train.max_hours * 3600.0

        self.env = env or DistEnv()
        self.rank, self.world_size = self.env.rank, self.env.world_size
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise RuntimeError(f"rank {self.rank} of {self.world_size}: join the process group first (run_training does)")
        if self.cfg.train.batch_size % self.world_size:
            raise ConfigError(
                f"train.batch_size={self.cfg.train.batch_size} is the global batch and must divide evenly over the "
                f"{self.world_size} processes; use a multiple of {self.world_size}"
            )
        self.model_parallel = self.cfg.compute.model_type == ModelType.MODEL_PARALLEL
        self.device = local_device(self.env, resolve_device(self.cfg.train.device))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False  # autotuning picks kernels per run: not reproducible
            torch.backends.cudnn.deterministic = True

        seed_everything(self.cfg.train.seed)
        records = read_manifest(train_dataset)
        _check_labels(records, len(self.classes), train_dataset)
        model = build_model(self.cfg.model, self.cfg.data.image_size)
        if self.world_size > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        self.model = model.to(self.device)
        self.loss_fn = self._build_loss().to(self.device)
        self.optimizer = self._build_optimizer()
        self.objective = self._wrap()
        self.loader, self.batches = self._build_loader(records)
        self.steps_per_epoch = len(self.batches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            functools.partial(
                lr_factor,
                total_steps=self.cfg.train.epochs * self.steps_per_epoch,
                warmup_steps=self.cfg.optim.warmup_epochs * self.steps_per_epoch,
                schedule=self.cfg.optim.scheduler,
            ),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.train.fp16)

        # progress: `epoch` complete epochs plus `batch` batches of the next one
        self.epoch = 0
        self.batch = 0
        self.global_step = 0
        self.step_lr = self.current_lr
        self.history: list[EpochStats] = []
        self.meter = EpochMeter()
        self.prior_wall_seconds = 0.0
        self.stop_reason: str | None = None
        self._term_requested = False
        self._clock_start = self.clock()
        self._wall_start = time.monotonic()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- construction ---------------------------------------------------------------------------

    def _build_loss(self) -> nn.Module:
        if self.model_parallel:
            from imlt.trainer.distributed import build_model_parallel_loss

            # Each rank initialises only its own rows, from a generator seeded by (seed, rank).
            return build_model_parallel_loss(
                self.cfg.loss, len(self.classes), self.cfg.model.feature_dim, self.env, seed=self.cfg.train.seed
            )
        from imlt.trainer.losses import build_loss

        return build_loss(self.cfg.loss, len(self.classes), self.cfg.model.feature_dim)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """Model and loss (class centres) together; no weight decay on biases and norm scales."""
        from timm.optim import param_groups_weight_decay

        o = self.cfg.optim
        both = nn.ModuleDict({"model": self.model, "loss": self.loss_fn})
        groups = param_groups_weight_decay(both, weight_decay=o.weight_decay)
        if o.optimizer == OptimizerName.SGD:
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
        return torch.optim.AdamW(groups, lr=o.lr)

    def _wrap(self) -> nn.Module:
        """The one place modules get wrapped: the `objective(images, labels)` training_step calls.

        Data-parallel: DDP over model and loss together. Model-parallel: DDP over the model only;
        the class shards differ per rank and must stay out of DDP's averaging and broadcast.
        `self.model` and `self.loss_fn` stay the bare modules (state dicts, saving).
        """
        fp16, kind = self.cfg.train.fp16, self.device.type
        if self.world_size == 1:
            return _Objective(self.model, self.loss_fn, kind, fp16)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if kind == "cuda" else None
        if self.model_parallel:
            return _Objective(DDP(self.model, device_ids=ids), self.loss_fn, kind, fp16)
        return DDP(_Objective(self.model, self.loss_fn, kind, fp16), device_ids=ids)

    @staticmethod
    def _unwrap(module: nn.Module) -> nn.Module:
        return getattr(module, "module", module)

    def _build_loader(self, records: list[ManifestRecord]) -> tuple[DataLoader, EpochBatches]:
        from imlt.trainer.data.dataset import ImageDataset

        t = self.cfg.train
        # Remote (oss://) images are fetched once, then read from a local copy in later epochs.
        self._image_cache = None
        if not all(storage.is_local(r.uri) for r in records):
            self._image_cache = tempfile.TemporaryDirectory(prefix="imlt-images-")
        cache_dir = self._image_cache.name if self._image_cache else None
        dataset = ImageDataset(records, self.cfg.data.image_size, train=True, cache_dir=cache_dir)
        inner = None
        if t.m_per_class > 0:
            from imlt.trainer.data.sampler import MPerClassBatchSampler

            inner = MPerClassBatchSampler(
                dataset.labels, m=t.m_per_class, batch_size=t.batch_size,
                seed=t.seed, rank=self.rank, world_size=self.world_size,
            )
        batches = EpochBatches(len(dataset), t.batch_size, t.seed, inner=inner, rank=self.rank, world_size=self.world_size)
        workers = self.cfg.data.reader_threads
        loader = DataLoader(
            _SeededSamples(dataset),
            batch_sampler=batches,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=_worker_init if workers > 0 else None,
            # worker base seeds come from here, not from the global generator
            generator=torch.Generator().manual_seed(mix_seed(t.seed, 1)),
        )
        return loader, batches

    # --- the loop -------------------------------------------------------------------------------

    def fit(self) -> TrainOutput:
        """Train from scratch or from the latest checkpoint up to train.epochs, then write the model."""
        epochs, every = self.cfg.train.epochs, self.cfg.train.checkpoint_every
        self._clock_start, self._wall_start = self.clock(), time.monotonic()
        self._start_or_resume()  # before any write: a refused resume leaves the folder as it was
        if self.is_main:
            storage.write_text(storage.join(self.output_dir, CONFIG_FILE), json.dumps(self.cfg.dump(), indent=2) + "\n")
        self._log(
            "training %s on %s x %d (%s): %d images, %d classes, %d batches/epoch, epochs %d..%d of %d",
            self.cfg.model.backbone, self.device, self.world_size, self.cfg.compute.model_type.value,
            len(self.loader.dataset), len(self.classes),  # type: ignore[arg-type]
            self.steps_per_epoch, self.epoch + 1, epochs, epochs,
        )
        with self._sigterm_flag():
            while self.epoch < epochs and self.stop_reason is None:
                if not self.train_epoch(self.epoch):
                    self.save_checkpoint()  # stopped mid-epoch: keep the position
                    break
                stats = self.meter.stats(self.epoch + 1, self.step_lr)
                self.history.append(stats)
                self.epoch, self.batch, self.meter = self.epoch + 1, 0, EpochMeter()
                self._log(
                    "epoch %d/%d: loss %.4f (metric %.4f, classification %.4f), lr %.3g, %.1f s, %.0f images/s",
                    stats.epoch, epochs, stats.loss, stats.metric_loss, stats.classification_loss,
                    stats.lr, stats.seconds, stats.images_per_second,
                )
                if self.epoch % every == 0 or self.epoch == epochs or self.stop_reason is not None:
                    self.save_checkpoint()
        if self.stop_reason == "sigterm" and self.epoch < epochs:
            latest = self.latest_checkpoint()
            raise TrainingInterrupted(
                f"stopped by SIGTERM at epoch {self.epoch + 1}, batch {self.batch}; checkpoint {latest}; "
                "run again with resume to continue",
                checkpoint=latest or "",
            )
        return self._finish()

    def train_epoch(self, epoch: int) -> bool:
        """Run the rest of epoch `epoch` (0-based); False when a stop request cut it short."""
        self.batches.set_epoch(epoch, start_batch=self.batch)
        self.set_train_mode()
        show = self.is_main and sys.stderr.isatty()
        from tqdm.auto import tqdm

        with tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                  unit="batch", disable=not show, leave=False) as bar:
            tick = time.perf_counter()
            for images, labels in self.loader:
                out = self.training_step(images, labels, epoch, self.batch)
                now = time.perf_counter()
                loss = float(out.total.detach())
                # global-batch numbers: every rank's batch is len(labels) images
                self.meter.update(len(labels) * self.world_size, loss, float(out.metric), float(out.classification), now - tick)
                tick = now
                self.batch += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{self.meter.images_per_second:.0f}")
                if self._stop_requested() and self.batch < self.steps_per_epoch:
                    return False
        return True

    def set_train_mode(self) -> None:
        """Put the modules in training mode at the start of an epoch (a hook: e.g. frozen BatchNorm)."""
        self.model.train()
        self.loss_fn.train()

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch_index: int) -> LossOutput:
        """Forward, NaN check, backward, optimiser and scheduler step.

        Returns the global batch's losses, detached (the mean over ranks of their batch means;
        model-parallel losses are global already): the same numbers on every rank.
        """
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        total, metric, classification = self.objective(images, labels)
        # Reduced before backward: a NaN on any rank stops every rank here, before DDP's gradient all-reduce.
        values = self._mean_over_ranks(torch.stack([total.detach().float(), metric.float(), classification.float()]))
        value = float(values[0])
        if not math.isfinite(value):
            latest = self.latest_checkpoint()
            raise NonFiniteLossError(
                f"loss is {value} at epoch {epoch + 1}, batch index {batch_index}, global step {self.global_step} "
                f"(weights of this step not updated); last good checkpoint: {latest or 'none yet'}. "
                f"Lower optim.lr (now {self.cfg.optim.lr}) or check the data."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.model_parallel and self.world_size > 1:
            self._sum_backbone_gradients()
        self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed (loss scaling)
        self.scaler.update()
        self.step_lr = self.current_lr  # what this step used; the scheduler moves it on for the next
        self.scheduler.step()
        self.global_step += 1
        return LossOutput(total=values[0], metric=values[1], classification=values[2])

    def _sum_backbone_gradients(self) -> None:
        """Model-parallel: DDP averaged the backbone's per-rank gradients; the loss is replicated, so
        the true gradient is their sum (trainer.distributed's gradient convention)."""
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(self.world_size)

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        values = values.to(self.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / self.world_size

    def _max_over_ranks(self, code: int) -> int:
        if self.world_size == 1:
            return code
        import torch.distributed as dist

        t = torch.tensor([code], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _log(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        if self.is_main:
            log.log(level, msg, *args)

    @property
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _stop_requested(self) -> bool:
        """Whether to stop at this step boundary; every rank gets the same answer (one all-reduce)."""
        code = _NO_STOP
        if self._term_requested:
            code = _SIGTERM
        elif self.clock() - self._clock_start >= self.max_seconds:
            code = _TIME_LIMIT
        code = self._max_over_ranks(code)
        if code == _SIGTERM:
            self.stop_reason = "sigterm"
        elif code == _TIME_LIMIT:
            if self.stop_reason is None:
                self._log("time limit of %.0f s reached: checkpointing and stopping", self.max_seconds, level=logging.WARNING)
            self.stop_reason = "time_limit"
        return self.stop_reason is not None

    @contextlib.contextmanager
    def _sigterm_flag(self) -> Iterator[None]:
        """While training, SIGTERM only sets a flag that the loop checks at step boundaries."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum: int, frame: Any) -> None:
            self._term_requested = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    # --- checkpoints ----------------------------------------------------------------------------

    def latest_checkpoint(self) -> str | None:
        return ckpt.latest_checkpoint(self.checkpoint_dir)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            "model": self._unwrap(self.model).state_dict(),
            "loss": self._unwrap(self.loss_fn).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {**ckpt.capture_rng_state(), "loader": self.loader.generator.get_state()},
            "meter": self.meter.state_dict(),
            "history": [h.model_dump() for h in self.history],
            "wall_seconds": self.wall_seconds,
            "config_hash": self.cfg.config_hash(),
            "config": self.cfg.model_dump(mode="json"),
        }

    def save_checkpoint(self) -> str:
        """Write the full training state; mid-epoch checkpoints older than this one are removed.

        Every rank calls this. Data-parallel: rank 0 writes one file. Model-parallel: a sharded
        folder, every rank writing its class shard. All ranks leave together, after the write,
        so none exits (SIGTERM path) while rank 0 is still writing.
        """
        url = storage.join(self.checkpoint_dir, ckpt.checkpoint_name(self.epoch, self.batch))
        if self.model_parallel:
            if self.is_main and ckpt.is_sharded(url):
                storage.delete(storage.join(url, ckpt.SHARD_META))  # overwriting: unlisted until complete again
            barrier()
            save_sharded(self.state_dict(), url, self.env, sharded_keys=SHARDED_KEYS)
        elif self.is_main:
            ckpt.save_checkpoint(url, self.state_dict())
        if self.is_main:
            here = (self.epoch, self.batch)
            for key, old in ckpt.list_checkpoints(self.checkpoint_dir):
                if key[1] > 0 and key < here:
                    ckpt.delete_checkpoint(old)
            log.info("checkpoint %s (global step %d)", url, self.global_step)
        barrier()
        return url

    def load_checkpoint(self, url: str) -> None:
        """Restore everything a checkpoint holds; refuse one written under another config.

        A sharded checkpoint is checked for its world size first: its class shards fit only the
        number of workers that wrote it, and that message says exactly what to do.
        """
        state = load_sharded(url, self.env) if ckpt.is_sharded(url) else ckpt.load_checkpoint(url)
        # output_dir is left out so a run folder can be moved (e.g. downloaded from OSS) and resumed.
        changed = [c for c in config_diff(state["config"], self.cfg.model_dump(mode="json")) if not c.startswith("output_dir:")]
        if changed:
            raise ResumeConfigError(
                f"cannot resume from {url}: it was written with config {state['config_hash']}, this run's is "
                f"{self.cfg.config_hash()}. A run's parameters cannot change; changed fields:\n  "
                + "\n  ".join(changed)
                + "\nUse a new output_dir, or resume=false to start over in this one."
            )
        if state["config"].get("output_dir") != self.cfg.output_dir:
            self._log("resuming a run folder moved from %s", state["config"].get("output_dir"))
        self._unwrap(self.model).load_state_dict(state["model"], strict=True)
        self._unwrap(self.loss_fn).load_state_dict(state["loss"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        self.loader.generator.set_state(state["rng"]["loader"])
        self.epoch, self.batch, self.global_step = state["epoch"], state["batch"], state["global_step"]
        self.meter.load_state_dict(state["meter"])
        self.history = [EpochStats.model_validate(h) for h in state["history"]]
        self.prior_wall_seconds = float(state["wall_seconds"])

    def _start_or_resume(self) -> None:
        latest = self.latest_checkpoint()
        if latest is not None and self.resume:
            self.load_checkpoint(latest)
            self._log("resumed from %s: epoch %d, batch %d, global step %d", latest, self.epoch, self.batch, self.global_step)
        elif latest is not None and self.is_main:
            old = ckpt.list_checkpoints(self.checkpoint_dir)
            log.warning("resume=false: removing %d checkpoints of an earlier run in %s", len(old), self.checkpoint_dir)
            for _, url in old:
                ckpt.delete_checkpoint(url)
        barrier()  # no rank writes a checkpoint before rank 0 has removed the old ones

    # --- outputs --------------------------------------------------------------------------------

    @property
    def wall_seconds(self) -> float:
        """Training wall time over all invocations (time after the last checkpoint of a killed run is lost)."""
        return self.prior_wall_seconds + (time.monotonic() - self._wall_start)

    def usage(self) -> dict[str, Any]:
        """Billing-style usage: each process is an instance billed in whole minutes, rounded up."""
        wall = self.wall_seconds
        cuda = self.device.type == "cuda"
        return {
            "instance_minutes": math.ceil(wall / 60.0) * self.world_size,
            "wall_seconds": round(wall, 3),
            "processes": self.world_size,
            "nnodes": self.cfg.compute.nnodes,
            "nproc_per_node": self.cfg.compute.nproc_per_node,
            "device": self.device.type,
            "gpu_type": torch.cuda.get_device_name(self.device) if cuda else self.cfg.compute.gpu_type,
            "gpu_count": self.world_size if cuda else 0,
            "instance_type": self.cfg.compute.instance_type,
        }

    def _finish(self) -> TrainOutput:
        from imlt.trainer.model import save_embedding_model

        usage = self.usage()
        if self.is_main:
            save_embedding_model(self._unwrap(self.model), self.cfg, self.output_dir, self.classes)
            write_history(self.output_dir, self.history)
            plot_training_curve(self.history, storage.join(self.output_dir, CURVE))
            storage.write_text(storage.join(self.output_dir, USAGE_FILE), json.dumps(usage, indent=2) + "\n")
        barrier()  # the model folder is complete when any rank returns
        final_loss = self.history[-1].loss if self.history else self.meter.mean_loss
        return TrainOutput(
            model_dir=self.output_dir,
            config_hash=self.cfg.config_hash(),
            epochs_completed=self.epoch,
            stopped_early=self.epoch < self.cfg.train.epochs,
            final_loss=final_loss,
            history=[h.model_dump() for h in self.history],
            instance_minutes=float(usage["instance_minutes"]),
        )
