"""The training loop: AMP, checkpoints, exact resume, time limit, SIGTERM.

Shape (after Lightning Fabric's "build your own trainer"): `Trainer.fit` -> `train_epoch` ->
`training_step`, plus `save_checkpoint`, `load_checkpoint`, `latest_checkpoint`. The parts it
drives live beside it: the batch stream and its seeds (trainer.data.stream), the optimiser and
learning-rate schedule (trainer.optim), the processes, device and DDP wrapping (trainer.compute),
the losses (trainer.losses) and the checkpoint files (trainer.checkpoint).

Reproducibility: the data stream is a function of (seed, epoch, batch) (trainer.data.stream), so
a checkpoint needs only (epoch, batch) to continue it. Model-side randomness (dropout,
drop-path) uses the global generators of the main process; their states go into every
checkpoint and are restored on resume. Model, loss (class centres), optimiser, LR scheduler,
grad scaler and epoch statistics are all in the checkpoint, which is one dict read back with
`torch.load(weights_only=True)`.

Stopping:
- Time limit (`train.max_hours`, per process invocation; env IMLT_MAX_SECONDS overrides it, and
  the clock is injectable): at the next step boundary the loop writes a checkpoint, then
  finishes normally (model, history, usage) with `stopped_early=True`. Resuming continues.
- SIGTERM (Kubernetes eviction, Airflow kill): the handler only sets a flag; at the next step
  boundary the loop writes a checkpoint - mid-epoch, holding the batch index - and raises
  `TrainingInterrupted`. Raising (not returning) keeps an orchestrator from taking a half-trained
  run for a finished one; its retry resumes from that checkpoint and continues exactly.
- Early stopping (`train.early_stop_patience`, with a val split): after that many validations in
  a row without a better val Recall@1 the loop writes a checkpoint and finishes normally.
- A NaN/inf loss raises `NonFiniteLossError` naming epoch, batch index and global step before
  any weight is touched; checkpoints already written stay as they were.

Validation (with a val split, every `train.validate_every` epochs and after the last): rank 0
embeds the val split with the evaluate step's own code (trainer.evaluate.embed,
trainer.retrieval.evaluate_retrieval: exact, or a stated sample of queries above
`train.val_exact_max_samples`) and shares Recall@1 and MAP@R with every rank through one
all-reduce, so every rank takes the same best-epoch and early-stop decisions from the same
numbers. The best epoch's weights (by val Recall@1, ties to the earliest) are kept in memory and
in every checkpoint with the patience counter, so a resumed run ends bit-identical to an
uninterrupted one. The model folder then holds the best epoch; the last epoch's weights sit in its
`last/` subfolder (trainer.model_files.LAST). The validation forward runs under a forked RNG, so
training consumes the same random numbers with and without a val split.

Several processes (trainer.compute says how they are started and wrapped):
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

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import torch
from torch import nn

from imlt.trainer import checkpoint as ckpt
from imlt.trainer import storage
from imlt.trainer.collectives import barrier, max_across_ranks, mean_across_ranks
from imlt.trainer.compute import distributed_session, resolve_compute, sigterm_flag, unwrap, usage_record, wrap_objective
from imlt.trainer.config import FIXED_SCALE_LOSSES, AmpDtype, ConfigError, ModelType, RunConfig, class_count_scale
from imlt.trainer.data.manifest import MANIFEST, check_labels, read_classes, read_manifest, with_dataset_classes
from imlt.trainer.data.stream import build_stream, seed_everything
from imlt.trainer.device import check_fp16, resolve_device, torch_threads, training_threads
from imlt.trainer.history import EpochMeter, EpochStats, ProgressLog, plot_training_curve, write_history
from imlt.trainer.losses import LossOutput, build_loss, loss_scale
from imlt.trainer.model_files import CONFIG, CURVE, LAST, USAGE
from imlt.trainer.optim import build_optimizer, build_scheduler
from imlt.trainer.process_group import DistEnv, local_device
from imlt.trainer.step_models import TrainInput, TrainOutput

log = logging.getLogger(__name__)

MAX_SECONDS_ENV = "IMLT_MAX_SECONDS"
# Checkpoint keys that differ per rank in a model-parallel run (the class shard and its optimiser state).
SHARDED_KEYS = ("loss", "optimizer")


class StopReason(IntEnum):
    """Why the loop stops early. All-reduced with MAX, so a SIGTERM on any rank wins over a time limit."""

    NONE = 0
    TIME_LIMIT = 1
    SIGTERM = 2


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the weights of that step were not updated."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM arrived; a checkpoint was written and a resumed run continues from it."""

    def __init__(self, message: str, checkpoint: str = "") -> None:  # default: exceptions must unpickle from args
        super().__init__(message)
        self.checkpoint = checkpoint


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
    threads = training_threads(cfg.train.threads, cfg.data.reader_threads)
    with distributed_session(cfg) as env, torch_threads(threads):
        # built first: a config that cannot train (class count, starting weights) is refused before any write
        trainer = Trainer(cfg, inp.train_dataset, resume=inp.resume, clock=clock, max_seconds=max_seconds, env=env,
                          val_dataset=inp.val_dataset)
        with training_lease(trainer.checkpoint_dir, env.is_main):
            return trainer.fit()


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
        val_dataset: str | None = None,
    ) -> None:
        """`env`: this process's rank and world size; with several, the process group must be joined
        (run_training does both). Default: a single process. `val_dataset`: a read_data folder to
        validate on (module docstring); None trains as without validation."""
        from imlt.trainer.model import build_model

        if not storage.exists(storage.join(train_dataset, MANIFEST)):
            raise FileNotFoundError(f"train dataset {train_dataset}: no {MANIFEST} (is it a read_data output folder?)")
        self.classes = read_classes(train_dataset)
        self.cfg = with_dataset_classes(cfg, self.classes, train_dataset)
        self.train_dataset = train_dataset
        self.resume = resume
        self.output_dir = self.cfg.output_dir
        self.checkpoint_dir = ckpt.checkpoint_dir(self.cfg)
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
        if self.cfg.train.fp16:
            check_fp16(self.device, self.cfg.train.amp_dtype.value)  # here, on the device that trains: a config parses the same on every host
        if self.device.type == "cuda":
            # autotuning picks kernels per run: faster, not reproducible
            torch.backends.cudnn.benchmark = not self.cfg.train.deterministic
            torch.backends.cudnn.deterministic = self.cfg.train.deterministic
        self.memory_format = torch.channels_last if self.cfg.train.channels_last else torch.preserve_format

        seed_everything(self.cfg.train.seed)
        records = read_manifest(train_dataset)
        self.val_dataset = val_dataset
        self.val_records = None
        if val_dataset:
            if not storage.exists(storage.join(val_dataset, MANIFEST)):
                raise FileNotFoundError(f"val dataset {val_dataset}: no {MANIFEST} (is it a read_data output folder?)")
            self.val_records = read_manifest(val_dataset)
            if not self.val_records:
                raise ValueError(f"{storage.join(val_dataset, MANIFEST)}: the val split is empty")
        check_labels(records, len(self.classes), train_dataset)
        model = build_model(self.cfg.model, self.cfg.data.image_size)
        if self.world_size > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        self.model = model.to(self.device, memory_format=self.memory_format)
        # Model-parallel: each rank initialises only its own class rows, from a generator seeded by (seed, rank).
        self.loss_fn = build_loss(
            self.cfg.loss, len(self.classes), self.cfg.model.feature_dim, env=self.env, seed=self.cfg.train.seed
        ).to(self.device)
        self.optimizer = build_optimizer(self.cfg.optim, self.model, self.loss_fn)
        self.objective = wrap_objective(self.model, self.loss_fn, self.cfg, self.device, self.world_size)
        self.stream = build_stream(
            self.cfg, records, rank=self.rank, world_size=self.world_size, pin_memory=self.device.type == "cuda"
        )
        self.loader, self.batches = self.stream.loader, self.stream.batches
        self.steps_per_epoch = len(self.batches)
        self.scheduler = build_scheduler(
            self.cfg.optim, self.optimizer, epochs=self.cfg.train.epochs, steps_per_epoch=self.steps_per_epoch
        )
        # loss scaling for float16 only: bfloat16 has float32's exponent range
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.train.fp16 and self.cfg.train.amp_dtype == AmpDtype.FLOAT16)

        # progress: `epoch` complete epochs plus `batch` batches of the next one
        self.epoch = 0
        self.batch = 0
        self.global_step = 0
        self.step_lr = self.current_lr
        self.history: list[EpochStats] = []
        self.meter = EpochMeter()
        self.prior_wall_seconds = 0.0
        self.stop_reason = StopReason.NONE
        self._saved: str | None = None  # the URL this process last checkpointed to
        # best epoch by val Recall@1 so far: (epoch, Recall@1), its weights (CPU copies), validations since
        self.best_epoch = 0
        self.best_recall = -1.0
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.since_best = 0
        self._term_requested = False
        self._clock_start = self.clock()
        self._wall_start = time.monotonic()

    # --- the loop -------------------------------------------------------------------------------

    def fit(self) -> TrainOutput:
        """Train from scratch or from the latest checkpoint up to train.epochs, then write the model."""
        epochs, every = self.cfg.train.epochs, self.cfg.train.checkpoint_every
        self._clock_start, self._wall_start = self.clock(), time.monotonic()
        self._start_or_resume()  # before any write: a refused resume leaves the folder as it was
        if self.env.is_main:
            storage.write_text(storage.join(self.output_dir, CONFIG), json.dumps(self.cfg.dump(), indent=2) + "\n")
        self._log(
            "training %s on %s x %d (%s, %d threads): %d images, %d classes, %d batches/epoch, epochs %d..%d of %d",
            self.cfg.model.backbone, self.device, self.world_size, self.cfg.compute.model_type.value, torch.get_num_threads(),
            len(self.loader.dataset), len(self.classes),  # type: ignore[arg-type]
            self.steps_per_epoch, self.epoch + 1, epochs, epochs,
        )
        self._log_scale()
        self._log("checkpoints in %s (the last %d epochs and the best)", self.checkpoint_dir, self.cfg.train.keep_checkpoints)
        with sigterm_flag(self._on_sigterm):
            while self.epoch < epochs and not self.stop_reason and not self.patience_exhausted:
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
                if self.val_records is not None and (self.epoch % self.cfg.train.validate_every == 0 or self.epoch == epochs):
                    self.validate(stats)
                if self.epoch % every == 0 or self.epoch == epochs or self.stop_reason or self.patience_exhausted:
                    self.save_checkpoint()
        if self.stop_reason == StopReason.SIGTERM and self.epoch < epochs:
            # the checkpoint just written, not a listing: rank 0's lease release may be changing the folder meanwhile
            latest = self._saved or self.latest_checkpoint()
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
        show = self.env.is_main and sys.stderr.isatty()
        from tqdm.auto import tqdm

        with tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                  unit="batch", disable=not show, leave=False) as bar:
            tick = time.perf_counter()
            progress = None if show or not self.env.is_main else ProgressLog(
                self.cfg.train.epochs * self.steps_per_epoch, self.cfg.train.log_every_steps)
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
                if progress is not None:
                    progress.step(self.global_step, loss, self.meter)
                if self._stop_requested() and self.batch < self.steps_per_epoch:
                    return False
        return True

    # --- validation -----------------------------------------------------------------------------

    @property
    def patience_exhausted(self) -> bool:
        patience = self.cfg.train.early_stop_patience
        return patience is not None and self.best_weights is not None and self.since_best >= patience

    def validate(self, stats: EpochStats) -> None:
        """Measure the val split after epoch `stats.epoch`, record it, keep the best weights.

        Every rank calls this: rank 0 embeds and measures, the numbers reach every rank through
        one all-reduce (the others wait in it), and each rank applies the same decision to them.
        """
        started = time.perf_counter()
        values = torch.full((2,), -1.0, dtype=torch.float64, device=self.device)
        if self.env.is_main:
            recall, map_r = self._measure_val()
            values = torch.tensor([recall, map_r], dtype=torch.float64, device=self.device)
        values = max_across_ranks(values)
        recall, map_r = float(values[0]), float(values[1])
        stats.val_recall_at_1, stats.val_map_at_r = recall, map_r
        stats.val_seconds = time.perf_counter() - started
        if recall > self.best_recall:
            self.best_epoch, self.best_recall, self.since_best = stats.epoch, recall, 0
            self.best_weights = {k: v.detach().cpu().clone() for k, v in unwrap(self.model).state_dict().items()}
        else:
            self.since_best += 1
        self._log(
            "epoch %d/%d: val Recall@1 %.4f, MAP@R %.4f (best %.4f at epoch %d)",
            stats.epoch, self.cfg.train.epochs, recall, map_r, self.best_recall, self.best_epoch,
        )
        if self.patience_exhausted:
            self._log("early stop: no better val Recall@1 in %d validations; best epoch %d (Recall@1 %.4f)",
                      self.since_best, self.best_epoch, self.best_recall, level=logging.WARNING)

    def _measure_val(self) -> tuple[float, float]:
        """Recall@1 and MAP@R of the current weights on the val split (rank 0 only)."""
        from imlt.trainer.evaluate import embed
        from imlt.trainer.retrieval import EvaluationSettings, evaluate_retrieval

        assert self.val_records is not None
        # forked RNG: the data loader draws its base seed from the global generator; training must not notice
        with torch.random.fork_rng(devices=[]):
            embeddings, labels = embed(unwrap(self.model), self.val_records, self.cfg.data.image_size,
                                       self.cfg.train.batch_size, self.cfg.data.reader_threads, self.device)
        settings = EvaluationSettings(exact_max_samples=self.cfg.train.val_exact_max_samples,
                                      seed=self.cfg.train.seed, device=self.device.type)
        report = evaluate_retrieval(embeddings, labels, ks=(1,), settings=settings, copy=False)
        metrics = report.flat()
        if report.method != "exact":
            log.info("val: %s on %d of %d queries (seed %d)", report.method, report.details["num_queries"],
                     report.details["num_eligible_queries"], self.cfg.train.seed)
        return float(metrics["recall_at_1"]), float(metrics["map_at_r"])

    def set_train_mode(self) -> None:
        """Put the modules in training mode at the start of an epoch (a hook: e.g. frozen BatchNorm)."""
        self.model.train()
        self.loss_fn.train()

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch_index: int) -> LossOutput:
        """Forward, NaN check, backward, optimiser and scheduler step.

        Returns the global batch's losses, detached (the mean over ranks of their batch means;
        model-parallel losses are global already): the same numbers on every rank.
        """
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        total, metric, classification = self.objective(images, labels)
        # Reduced before backward: a NaN on any rank stops every rank here, before DDP's gradient all-reduce.
        values = mean_across_ranks(torch.stack([total.detach().float(), metric.float(), classification.float()]))
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
        the true gradient is their sum (trainer.losses.sharded_classifier's gradient convention)."""
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(self.world_size)

    def _on_sigterm(self) -> None:
        self._term_requested = True  # only a flag: the loop checks it at the next step boundary

    def _log_scale(self) -> None:
        """The class-count scale in use, or a warning when the configured one is far above it."""
        loss, classes = self.cfg.loss, len(self.classes)
        auto, scale = class_count_scale(classes), loss_scale(loss, classes)
        if loss.auto_scale:
            self._log("%s: logit scale %.2f from %d classes (loss.auto_scale)", loss.name.value, scale, classes)
        elif loss.name in FIXED_SCALE_LOSSES and scale > 8 * auto:
            self._log("loss.scale=%g is %.0fx the class-count scale %.1f for %d classes: on few classes so large a "
                      "scale over-specialises the embedding (unseen classes retrieve worse); with loss.scale "
                      "and loss.auto_scale unset the run trains at the class-count scale",
                      scale, scale / auto, auto, classes, level=logging.WARNING)

    def _log(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        if self.env.is_main:
            log.log(level, msg, *args)

    @property
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _stop_requested(self) -> bool:
        """Whether to stop at this step boundary; every rank gets the same answer (one all-reduce)."""
        code = StopReason.NONE
        if self._term_requested:
            code = StopReason.SIGTERM
        elif self.clock() - self._clock_start >= self.max_seconds:
            code = StopReason.TIME_LIMIT
        if self.world_size > 1:
            code = StopReason(int(max_across_ranks(torch.tensor([code], dtype=torch.int64, device=self.device))[0]))
        if code == StopReason.TIME_LIMIT and not self.stop_reason:
            self._log("time limit of %.0f s reached: checkpointing and stopping", self.max_seconds, level=logging.WARNING)
        self.stop_reason = max(self.stop_reason, code)
        return bool(self.stop_reason)

    # --- checkpoints ----------------------------------------------------------------------------

    def latest_checkpoint(self) -> str | None:
        return ckpt.latest_checkpoint(self.checkpoint_dir)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            "model": unwrap(self.model).state_dict(),
            "loss": unwrap(self.loss_fn).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {**ckpt.capture_rng_state(), "loader": self.loader.generator.get_state()},
            "meter": self.meter.state_dict(),
            "history": [h.model_dump() for h in self.history],
            "best": {"epoch": self.best_epoch, "recall_at_1": self.best_recall, "since_best": self.since_best,
                     "weights": self.best_weights if self.best_weights is not None else {}},
            "wall_seconds": self.wall_seconds,
            "config_hash": self.cfg.config_hash(),
            "config": self.cfg.model_dump(mode="json"),
        }

    def save_checkpoint(self) -> str:
        """Write the full training state; checkpoints past keeping (trainer.checkpoint) are removed.

        Every rank calls this. Data-parallel: rank 0 writes one file. Model-parallel: a sharded
        folder, every rank writing its class shard. All ranks leave together, after the write,
        so none exits (SIGTERM path) while rank 0 is still writing.
        """
        url = storage.join(self.checkpoint_dir, ckpt.checkpoint_name(self.epoch, self.batch))
        if self.model_parallel:
            if self.env.is_main and ckpt.is_sharded(url):
                storage.delete(storage.join(url, ckpt.SHARD_META))  # overwriting: unlisted until complete again
            barrier()
            ckpt.save_sharded(self.state_dict(), url, self.env, sharded_keys=SHARDED_KEYS)
        elif self.env.is_main:
            ckpt.save_checkpoint(url, self.state_dict())
        if self.env.is_main:
            found = ckpt.list_checkpoints(self.checkpoint_dir)
            for old in ckpt.stale_checkpoints(found, (self.epoch, self.batch), self.cfg.train.keep_checkpoints,
                                              ckpt.epoch_scores(self.history)):
                ckpt.delete_checkpoint(old)
            log.info("checkpoint %s (global step %d)", url, self.global_step)
        barrier()
        self._saved = url
        return url

    def load_checkpoint(self, url: str) -> None:
        """Restore everything a checkpoint holds; refuse one written under another config.

        A sharded checkpoint is checked for its world size first: its class shards fit only the
        number of workers that wrote it, and that message says exactly what to do.
        """
        state = ckpt.load_sharded(url, self.env) if ckpt.is_sharded(url) else ckpt.load_checkpoint(url)
        ckpt.check_resumable(state, self.cfg, url)
        if state["config"].get("output_dir") != self.cfg.output_dir:
            self._log("resuming a run folder moved from %s", state["config"].get("output_dir"))
        unwrap(self.model).load_state_dict(state["model"], strict=True)
        unwrap(self.loss_fn).load_state_dict(state["loss"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        self.loader.generator.set_state(state["rng"]["loader"])
        self.epoch, self.batch, self.global_step = state["epoch"], state["batch"], state["global_step"]
        self.meter.load_state_dict(state["meter"])
        self.history = [EpochStats.model_validate(h) for h in state["history"]]
        best = state.get("best") or {}  # absent in checkpoints written before validation existed
        self.best_epoch = int(best.get("epoch", 0))
        self.best_recall = float(best.get("recall_at_1", -1.0))
        self.since_best = int(best.get("since_best", 0))
        self.best_weights = dict(best["weights"]) if best.get("weights") else None
        self.prior_wall_seconds = float(state["wall_seconds"])

    def _start_or_resume(self) -> None:
        latest = self.latest_checkpoint()
        if latest is not None and self.resume:
            self.load_checkpoint(latest)
            self._log("resumed from %s: epoch %d, batch %d, global step %d", latest, self.epoch, self.batch, self.global_step)
        elif latest is not None and self.env.is_main:
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

    def _finish(self) -> TrainOutput:
        from imlt.trainer.model import save_embedding_model

        usage = usage_record(self.wall_seconds, self.cfg, self.device, self.world_size)
        if self.best_weights is not None:  # validated: the last epoch beside the best, which the folder holds
            if self.env.is_main:
                save_embedding_model(unwrap(self.model), self.cfg, storage.join(self.output_dir, LAST), self.classes)
            unwrap(self.model).load_state_dict(self.best_weights, strict=True)
        if self.env.is_main:
            save_embedding_model(unwrap(self.model), self.cfg, self.output_dir, self.classes)
            write_history(self.output_dir, self.history)
            plot_training_curve(self.history, storage.join(self.output_dir, CURVE))
            storage.write_text(storage.join(self.output_dir, USAGE), json.dumps(usage, indent=2) + "\n")
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
