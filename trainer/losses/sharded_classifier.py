"""The class-sharded classifier of model-parallel training, and cross-entropy over its shards.

The C x D class-centre matrix is split by class into W shards of at most ceil(C/W) rows, one
per rank. Every rank all-gathers the embeddings and labels of the global batch (with a
backward), computes logits against its own shard, and the softmax normaliser and the target
logit are reduced across ranks. The loss every rank returns is the same number: the mean
cross-entropy of the global batch, exactly what a single process holding all C centres
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

import math

import torch
import torch.nn.functional as F
from torch import nn

from imlt.trainer.collectives import max_across_ranks, sum_across_ranks
from imlt.trainer.process_group import DistEnv


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

    def forward(self, all_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits of every embedding against this shard's centres."""
        weight = self.weight
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
        row_max = max_across_ranks(row_max)
    shifted = logits - row_max[:, None]
    sum_exp = sum_across_ranks(shifted.exp().sum(dim=1))
    if logits.shape[1] > 0:
        target = shifted.gather(1, target_index[:, None]).squeeze(1)
        target = torch.where(owned, target, torch.zeros_like(target))
    else:
        target = shifted.new_zeros(n)
    target = sum_across_ranks(target)
    return (sum_exp.log() - target).mean()
