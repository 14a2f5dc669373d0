"""Process groups and the class-sharded classifier (model parallel).

Rank, world size and rendezvous come from the variables torchrun sets (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so a bare `torchrun -m ...` works locally and inside a
Kubeflow Trainer pod (which sets the PET_* variables torchrun reads). Nothing here touches a
process group at import time; with no process group every collective is the identity, so the
same code runs single-process.

Model parallel: the C x D class-centre matrix is split by class into W shards of at most
ceil(C/W) rows, one per rank. Every rank all-gathers the embeddings and labels of the global
batch (with a backward), computes logits against its own shard, and the softmax normaliser and
the target logit are reduced across ranks. The loss every rank returns is the same number: the
mean cross-entropy of the global batch, exactly what a single process holding all C centres
computes, with exact gradients (checked against single-process autograd in
tests/test_distributed.py).

Gradient convention (read this before combining with DDP): the loss is *replicated*, every rank
holds the same scalar L and calls L.backward(). After backward, each rank's shard holds exactly
dL/dW_shard and each rank's local embeddings hold exactly dL/de_local. The backbone parameters
are shared, so the true dL/dtheta is the SUM over ranks of the per-rank backbone gradients; DDP
averages, i.e. yields dL/dtheta / W. Multiply the backbone's gradients by the world size (or
scale its learning rate) when bit-for-bit parity with single-process training matters. The
shard parameters must not be wrapped in DDP (they differ per rank).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from imlt.trainer import storage
from imlt.trainer.losses.base import LossOutput

if TYPE_CHECKING:
    from imlt.trainer.config import LossConfig


# ------------------------------------------------------------------------------------------------
# environment and process group
# ------------------------------------------------------------------------------------------------


class DistEnv(BaseModel):
    """Where this process sits in the job. A missing WORLD_SIZE means a single process."""

    model_config = ConfigDict(frozen=True)

    rank: int = Field(0, ge=0, description="Global rank (RANK)")
    local_rank: int = Field(0, ge=0, description="Rank on this node (LOCAL_RANK); picks the GPU")
    world_size: int = Field(1, gt=0, description="Number of processes (WORLD_SIZE)")
    master_addr: str | None = Field(None, description="Rendezvous host (MASTER_ADDR)")
    master_port: int | None = Field(None, description="Rendezvous port (MASTER_PORT)")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        if world > 1 and "RANK" not in env:
            raise RuntimeError(
                f"WORLD_SIZE={world} but RANK is not set: start the workers with torchrun "
                "(e.g. `torchrun --nproc-per-node 2 ...`), which sets RANK, LOCAL_RANK and MASTER_ADDR/PORT"
            )
        rank = int(env.get("RANK", "0"))
        if rank >= world:
            raise RuntimeError(f"RANK={rank} is not below WORLD_SIZE={world}")
        port = env.get("MASTER_PORT")
        return cls(
            rank=rank,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=world,
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(device: str | torch.device = "cpu", environ: dict[str, str] | None = None) -> DistEnv:
    """Join the job's process group (nccl on CUDA, gloo on CPU); a single process joins nothing.

    Idempotent: a second call returns the environment without re-initialising.
    """
    env = DistEnv.from_env(environ)
    if not env.distributed or dist.is_initialized():
        return env
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    return env


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(env: DistEnv, device: str | torch.device) -> torch.device:
    """The device this rank computes on: cuda:LOCAL_RANK for CUDA, else the device as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", env.local_rank)
    return device


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# collectives with a backward
# ------------------------------------------------------------------------------------------------


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    """Rows held by every rank, so ranks may hold batches of different sizes (a last batch)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    # all_gather needs equal shapes: pad to the largest rank's rows, then cut the padding off.
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; the backward returns this rank's rows of the summed gradient.

    Each rank's graph only sees its own part of the loss (e.g. the logits of its own class shard),
    so the full gradient of a gathered row is the sum over ranks of their partial gradients.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return _all_gather_rows(tensor.contiguous(), sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `tensor` (dim 0, rank order), differentiable; identity in one process.

    The backward sums the incoming gradients across ranks: right when each rank's loss is a
    different part of the objective (the sharded classifier). A loss that every rank computes
    identically from the gathered rows would be counted W times; divide it by the world size.
    """
    if not _active():
        return tensor
    sizes = tuple(_gather_sizes(tensor.shape[0], tensor.device))
    return _AllGatherWithGrad.apply(tensor, sizes)


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `tensor` in rank order, without a backward (labels, evaluation)."""
    if not _active():
        return tensor
    return _all_gather_rows(tensor.contiguous(), _gather_sizes(tensor.shape[0], tensor.device))


class _SumOfReplicated(torch.autograd.Function):
    """all_reduce(SUM) whose backward is the identity.

    Why not torch.distributed.nn.functional.all_reduce: its backward all-reduces (sums) the
    incoming gradients, which is right when every rank's loss is a different term of a sum, but
    our loss is replicated (every rank holds the same L and calls backward), so summing would
    count the gradient W times. With y = sum_r x_r and the same dL/dy on every rank,
    dL/dx_r = dL/dy: the identity.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, for a loss every rank then holds identically (see _SumOfReplicated)."""
    return _SumOfReplicated.apply(tensor) if _active() else tensor


@torch.no_grad()
def gather_embeddings(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's evaluation embeddings and labels, concatenated in rank order on every rank.

    Ranks may hold different counts. A DistributedSampler pads the dataset so every rank has the
    same number of samples and interleaves indices; pass it `drop_last=False` and trim duplicates
    by index if exact counts matter.
    """
    return all_gather_rows(embeddings), all_gather_rows(labels)


# ------------------------------------------------------------------------------------------------
# the sharded classifier and its losses
# ------------------------------------------------------------------------------------------------


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, end) of the class matrix held by `rank`: ceil(C/W) each, the last ones fewer.

    When C < W the trailing ranks hold no rows (start == end); the losses handle that.
    """
    if num_classes <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"shard_range: need num_classes > 0 and 0 <= rank < world_size (got {num_classes}, {rank}, {world_size})")
    per_rank = math.ceil(num_classes / world_size)
    start = min(rank * per_rank, num_classes)
    return start, min(start + per_rank, num_classes)


class ShardedClassifier(nn.Module):
    """This rank's rows [start:end) of the C x D class-centre matrix.

    `forward(all_embeddings)` gives the local logits (N x rows), plain dot products, or cosines
    when `normalize` is set. Centres are initialised from a generator seeded with (seed, rank) so
    shards differ from each other but a run is reproducible.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        env: DistEnv | None = None,
        *,
        normalize: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        env = env or DistEnv()
        self.num_classes, self.embedding_dim, self.normalize = num_classes, embedding_dim, normalize
        self.rank, self.world_size = env.rank, env.world_size
        self.start, self.end = shard_range(num_classes, env.rank, env.world_size)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + env.rank)
        weight = torch.empty(self.end - self.start, embedding_dim)
        # Same scale as nn.Linear's default init (uniform in +-1/sqrt(D)).
        bound = 1.0 / math.sqrt(embedding_dim)
        weight.uniform_(-bound, bound, generator=gen)
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes}, dim={self.embedding_dim}, rows=[{self.start}:{self.end}) "
            f"of rank {self.rank}/{self.world_size}, normalize={self.normalize}"
        )

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Copy this rank's rows out of a full C x D matrix (tests, converting a 1-process run)."""
        if tuple(full.shape) != (self.num_classes, self.embedding_dim):
            raise ValueError(f"full class matrix is {tuple(full.shape)}, expected ({self.num_classes}, {self.embedding_dim})")
        self.weight.copy_(full[self.start : self.end])

    def local_targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index into this shard, clamped to be valid; mask of labels this shard owns)."""
        owned = (labels >= self.start) & (labels < self.end)
        index = (labels - self.start).clamp(0, max(self.end - self.start - 1, 0))
        return index, owned

    def forward(self, all_embeddings: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits against this shard, or only against its `rows` (sampled centres)."""
        weight = self.weight if rows is None else self.weight[rows]
        if self.normalize:
            all_embeddings = F.normalize(all_embeddings, dim=1)
            weight = F.normalize(weight, dim=1)
        return all_embeddings @ weight.t()


def distributed_cross_entropy(local_logits: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over logits split by class across ranks (columns = this shard).

    log-softmax of the target = t - m - log(sum_c exp(z_c - m)), with m the row max over all ranks
    (all_reduce MAX, a constant shift, so no gradient flows through it), the sum of exponentials
    all_reduced (SUM) and the target logit t taken from the rank that owns the class (a masked
    value all_reduced with SUM). Computed in float32 at least, whatever the logits' dtype.
    """
    logits = local_logits.float() if local_logits.dtype in (torch.float16, torch.bfloat16) else local_logits
    n = logits.shape[0]
    with torch.no_grad():
        if logits.shape[1] > 0:
            row_max = logits.amax(dim=1)
        else:  # a rank with no classes (C < W) contributes nothing
            row_max = logits.new_full((n,), -math.inf)
        if _active():
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    shifted = logits - row_max[:, None]
    sum_exp = sum_across_ranks(shifted.exp().sum(dim=1))
    if logits.shape[1] > 0:
        target = shifted.gather(1, target_index[:, None]).squeeze(1)
        target = torch.where(owned, target, torch.zeros_like(target))
    else:
        target = shifted.new_zeros(n)
    target = sum_across_ranks(target)
    return (sum_exp.log() - target).mean()


class _ModelParallelLoss(nn.Module):
    """Shared work: gather the global batch, logits against this shard, distributed CE.

    Subclasses only say how the local logits are made (`_logits`). Interface as the
    single-process losses (trainer.losses): `forward(embeddings, labels) -> LossOutput` with this
    rank's batch; `total` is the global-batch loss, the same on every rank.

    `weight` < 1 mixes in (1 - weight) x the cross-entropy of a plain linear head, sharded the
    same way (a second ShardedClassifier, `head`), as MetricLoss does for one process.

    `sample_rate` < 1 (Partial FC style, for very many classes): while training, each rank scores
    only the centres of the classes present in the global batch plus random others, about
    sample_rate of its rows, so the softmax runs over that subset of classes. Rows left out get
    a zero gradient that step (momentum and weight decay still move them unless the optimizer
    skips zero-gradient rows). In eval mode every centre is used.
    """

    normalize: bool = False

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        env: DistEnv | None = None,
        *,
        weight: float = 1.0,
        sample_rate: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate}: must be in (0, 1]")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"loss weight must be in [0, 1], got {weight}")
        self.classifier = ShardedClassifier(num_classes, embedding_dim, env, normalize=self.normalize, seed=seed)
        self.weight = weight
        self.head = ShardedClassifier(num_classes, embedding_dim, env, seed=seed + 1) if weight < 1.0 else None
        self.sample_rate = sample_rate
        self._generator = torch.Generator().manual_seed(seed * 1_000_003 + (env or DistEnv()).rank + 7)
        self.last_sampled: torch.Tensor | None = None  # global class ids scored by the last forward

    def _logits(self, all_embeddings: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _sample_rows(self, target_index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        """Sorted local rows: every positive class in the batch, topped up with random others."""
        n_rows = self.classifier.end - self.classifier.start
        keep = torch.zeros(n_rows, dtype=torch.bool)
        keep[target_index[owned].cpu()] = True
        want = max(int(math.ceil(self.sample_rate * n_rows)), int(keep.sum()))
        others = (~keep).nonzero().squeeze(1)
        extra = others[torch.randperm(others.numel(), generator=self._generator)[: want - int(keep.sum())]]
        keep[extra] = True
        return keep.nonzero().squeeze(1).to(target_index.device)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        if embeddings.ndim != 2 or labels.ndim != 1 or embeddings.shape[0] != labels.shape[0]:
            raise ValueError(f"expected embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
        # Margins on cosines near 1 lose their precision in half precision: fp32 (or fp64) whatever the autocast.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if embeddings.dtype in (torch.float16, torch.bfloat16):
                embeddings = embeddings.float()
            all_embeddings = all_gather_with_grad(embeddings)
            all_labels = all_gather_rows(labels)
            if all_labels.numel() and (all_labels.min() < 0 or all_labels.max() >= self.classifier.num_classes):
                raise ValueError(f"labels must be in [0, {self.classifier.num_classes}), got {all_labels.min().item()}..{all_labels.max().item()}")
            target_index, owned = self.classifier.local_targets(all_labels)
            metric = self._metric(all_embeddings, target_index, owned)
            if self.head is None:
                return LossOutput(total=metric, metric=metric.detach(), classification=torch.zeros((), device=metric.device))
            ce = distributed_cross_entropy(self.head(all_embeddings), target_index, owned)
            total = self.weight * metric + (1.0 - self.weight) * ce
            return LossOutput(total=total, metric=metric.detach(), classification=ce.detach())

    def _metric(self, all_embeddings: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        rows = None
        if self.training and self.sample_rate < 1.0 and self.classifier.end > self.classifier.start:
            rows = self._sample_rows(target_index, owned)
            position = torch.zeros(self.classifier.end - self.classifier.start, dtype=torch.long, device=rows.device)
            position[rows] = torch.arange(rows.numel(), device=rows.device)
            target_index = position[target_index]  # owned targets are always sampled
            self.last_sampled = rows + self.classifier.start
        else:
            self.last_sampled = None
        logits = self._logits(all_embeddings, target_index, owned, rows)
        return distributed_cross_entropy(logits, target_index, owned)


class ModelParallelSoftmax(_ModelParallelLoss):
    """Softmax cross-entropy over a sharded linear classifier: logits = s * e . w_c.

    Plain FC + softmax as in the reference (no normalisation, no bias: a bias adds nothing a
    metric embedding uses, and leaving it out keeps the shard a single matrix).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        env: DistEnv | None = None,
        *,
        scale: float = 1.0,
        weight: float = 1.0,
        sample_rate: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes, embedding_dim, env, weight=weight, sample_rate=sample_rate, seed=seed)
        self.scale = scale

    def _logits(self, all_embeddings: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return self.scale * self.classifier(all_embeddings, rows)


class ModelParallelAMSoftmax(_ModelParallelLoss):
    """Additive-margin softmax over sharded, normalised centres: s * (cos - m [c == y])."""

    normalize = True

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        env: DistEnv | None = None,
        *,
        margin: float = 0.4,
        scale: float = 30.0,
        weight: float = 1.0,
        sample_rate: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(num_classes, embedding_dim, env, weight=weight, sample_rate=sample_rate, seed=seed)
        self.margin, self.scale = margin, scale

    def _logits(self, all_embeddings: torch.Tensor, target_index: torch.Tensor, owned: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        cos = self.classifier(all_embeddings, rows)
        if cos.shape[1] == 0:
            return cos * self.scale
        onehot = torch.zeros_like(cos)
        onehot[owned, target_index[owned]] = 1.0
        return self.scale * (cos - self.margin * onehot)


def build_model_parallel_loss(
    cfg: LossConfig, num_classes: int, embedding_dim: int, env: DistEnv, *, sample_rate: float = 1.0, seed: int = 0
) -> _ModelParallelLoss:
    """The model-parallel loss a config names, with its margin and scale (defaults filled by LossConfig)."""
    from imlt.trainer.config import LossName

    common = {"weight": cfg.weight, "sample_rate": sample_rate, "seed": seed}
    if cfg.name == LossName.MODEL_PARALLEL_AMSOFTMAX:
        return ModelParallelAMSoftmax(num_classes, embedding_dim, env, margin=float(cfg.margin), scale=float(cfg.scale), **common)
    if cfg.name == LossName.MODEL_PARALLEL_SOFTMAX:
        if cfg.margin:
            raise ValueError(f"loss.margin={cfg.margin}: ModelParallelSoftmax has no margin (use ModelParallelAMSoftmax)")
        return ModelParallelSoftmax(num_classes, embedding_dim, env, scale=float(cfg.scale), **common)
    raise ValueError(f"loss.name={cfg.name.value} is not a model-parallel loss (ModelParallelSoftmax, ModelParallelAMSoftmax)")


# ------------------------------------------------------------------------------------------------
# sharded checkpoints
# ------------------------------------------------------------------------------------------------

SHARD_META = "sharded.json"
REPLICATED_FILE = "replicated.pt"


class ShardedCheckpointError(RuntimeError):
    """A sharded checkpoint that cannot be used by this run; the message says what to do."""


def shard_file(rank: int, world_size: int) -> str:
    return f"classifier-rank{rank}-of-{world_size}.pt"


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes, url: str) -> Any:
    try:
        # weights_only: a checkpoint is data, never code to run
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ShardedCheckpointError(f"{url}: not a readable checkpoint file ({type(e).__name__}: {e})") from None


def save_sharded(state: dict[str, Any], directory: str, env: DistEnv, *, sharded_keys: Iterable[str] = ("classifier",)) -> None:
    """Write `state`: keys in `sharded_keys` once per rank, everything else once from rank 0.

    Every rank must call this (it synchronises). `sharded.json` is written last, by rank 0 after
    all shards exist, so a folder without it is an interrupted save. An optimizer that holds the
    shard's parameters has per-rank state too: list its key in `sharded_keys`.
    """
    keys = list(sharded_keys)
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"save_sharded: state has no {', '.join(missing)} (keys: {', '.join(state)})")
    shard = {k: state[k] for k in keys}
    storage.write_bytes(storage.join(directory, shard_file(env.rank, env.world_size)), _to_bytes(shard))
    barrier()
    if env.rank == 0:
        replicated = {k: v for k, v in state.items() if k not in keys}
        storage.write_bytes(storage.join(directory, REPLICATED_FILE), _to_bytes(replicated))
        meta = {
            "format": 1,
            "world_size": env.world_size,
            "sharded_keys": keys,
            "shard_files": [shard_file(r, env.world_size) for r in range(env.world_size)],
            "replicated_file": REPLICATED_FILE,
        }
        storage.write_text(storage.join(directory, SHARD_META), json.dumps(meta, indent=2) + "\n")
    barrier()


def read_shard_meta(directory: str) -> dict[str, Any]:
    url = storage.join(directory, SHARD_META)
    if not storage.exists(url):
        raise ShardedCheckpointError(
            f"{directory}: no {SHARD_META}; not a sharded checkpoint, or its save was interrupted"
        )
    try:
        meta = json.loads(storage.read_text(url))
        int(meta["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShardedCheckpointError(f"{url}: unreadable ({type(e).__name__}: {e})") from None
    return meta


def load_sharded(directory: str, env: DistEnv) -> dict[str, Any]:
    """This rank's view of a sharded checkpoint: the replicated part plus its own shard.

    The shard layout depends on the world size, so a different world size is refused.
    """
    meta = read_shard_meta(directory)
    written_by = int(meta["world_size"])
    if written_by != env.world_size:
        raise ShardedCheckpointError(
            f"checkpoint {directory} was written by {written_by} workers, this run has {env.world_size}: "
            f"resume with --nproc-per-node {written_by} (or nnodes x nproc-per-node = {written_by}), "
            "or start a new run in a new output_dir; the class shards depend on the number of workers"
        )
    shard_url = storage.join(directory, shard_file(env.rank, env.world_size))
    if not storage.exists(shard_url):
        raise ShardedCheckpointError(f"{shard_url} is missing: the checkpoint in {directory} is incomplete")
    state = dict(_from_bytes(storage.read_bytes(storage.join(directory, meta.get("replicated_file", REPLICATED_FILE))), directory))
    state.update(_from_bytes(storage.read_bytes(shard_url), shard_url))
    return state
