"""Model-parallel losses, collectives and sharded checkpoints against single-process autograd.

Two gloo processes on CPU are started with torchrun (tests/dist_worker.py); each writes what it
computed to a file and the tests compare those with a naive single-process computation of the
same loss on the same global batch and the full class matrix.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imlt.trainer.checkpoint import ShardedCheckpointError, load_sharded, save_sharded
from imlt.trainer.collectives import all_gather_with_grad
from imlt.trainer.config import LOSS_DEFAULTS, LossConfig, LossName
from imlt.trainer.losses import ModelParallelAMSoftmax, ModelParallelSoftmax, build_loss, shard_range
from imlt.trainer.process_group import DistEnv, init_process_group

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
WORLD = 2
NUM_CLASSES, DIM = 7, 5  # 7 classes over 2 ranks: shards of 4 and 3 rows
N_PER_RANK = [3, 2]  # unequal local batches exercise the padded all_gather
MARGIN, SCALE = LOSS_DEFAULTS[LossName.MODEL_PARALLEL_AMSOFTMAX]
SOFTMAX_SCALE = 2.0


def _torchrun(*args: str, timeout: float = 120) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(WORKER), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _inputs() -> dict[str, object]:
    gen = torch.Generator().manual_seed(1234)
    n = sum(N_PER_RANK)
    return {
        "embeddings": torch.randn(n, DIM, generator=gen, dtype=torch.float64),
        # targets in both shards (rows 0-3 on rank 0, 4-6 on rank 1), one class repeated
        "labels": torch.tensor([0, 5, 3, 6, 5]),
        "weight": torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64),
        "gather_weights": torch.randn(WORLD, n, DIM, generator=gen, dtype=torch.float64),
        "n_per_rank": N_PER_RANK,
        "margin": MARGIN,
        "scale": SCALE,
        "softmax_scale": SOFTMAX_SCALE,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("dist")
    inp = _inputs()
    torch.save(inp, root / "inputs.pt")
    out, ckpt = root / "out", root / "ckpt"
    out.mkdir()
    _torchrun(str(root / "inputs.pt"), str(out), str(ckpt))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {"inputs": inp, "ranks": ranks, "ckpt": ckpt, "root": root}


def _reference(kind: str, emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive single-process loss over the full class matrix: loss, dL/dE, dL/dW."""
    emb = emb.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    if kind == "softmax":
        logits = SOFTMAX_SCALE * emb @ weight.t()
    else:
        cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
        logits = SCALE * (cos - MARGIN * F.one_hot(labels, NUM_CLASSES).to(cos.dtype))
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["softmax", "amsoftmax"])
def test_model_parallel_loss_and_gradients_match_single_process(run: dict, kind: str, dtype: str) -> None:
    inp = run["inputs"]
    torch_dtype = getattr(torch, dtype)
    ref_loss, ref_grad_e, ref_grad_w = _reference(
        kind, inp["embeddings"].to(torch_dtype), inp["labels"], inp["weight"].to(torch_dtype)
    )
    parts = [r["losses"][(kind, dtype)] for r in run["ranks"]]
    for p in parts:  # the loss is the global-batch loss on every rank
        assert abs(p["loss"].item() - ref_loss.item()) < 1e-5
    grad_e = torch.cat([p["grad_embeddings"] for p in parts])  # rank order = batch order
    grad_w = torch.cat([p["grad_shard"] for p in parts])  # shards in class order
    assert grad_e.shape == ref_grad_e.shape and grad_w.shape == ref_grad_w.shape
    torch.testing.assert_close(grad_e, ref_grad_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_w, ref_grad_w, atol=1e-5, rtol=1e-5)
    assert grad_w.abs().sum() > 0 and grad_e.abs().sum() > 0


def test_each_rank_holds_ceil_c_over_w_rows(run: dict) -> None:
    per_rank = math.ceil(NUM_CLASSES / WORLD)
    spans = [(p["start"], p["end"]) for p in (r["losses"][("amsoftmax", "float64")] for r in run["ranks"])]
    assert spans == [(0, per_rank), (per_rank, NUM_CLASSES)]  # 4 rows, then 3
    shards = [r["losses"][("amsoftmax", "float64")]["grad_shard"] for r in run["ranks"]]
    assert [s.shape[0] for s in shards] == [4, 3]


def test_all_gather_with_grad_forward_and_backward(run: dict) -> None:
    inp = run["inputs"]
    x = inp["embeddings"].clone().requires_grad_(True)
    # single process: every rank's term of the objective, over the concatenated rows
    total = sum((x * inp["gather_weights"][r]).sum() for r in range(WORLD))
    total.backward()
    for r, out in enumerate(run["ranks"]):
        torch.testing.assert_close(out["gathered"], inp["embeddings"], atol=0, rtol=0)
        rows = slice(sum(N_PER_RANK[:r]), sum(N_PER_RANK[: r + 1]))
        torch.testing.assert_close(out["gather_grad"], x.grad[rows], atol=1e-12, rtol=0)


def test_all_gather_rows_for_evaluation(run: dict) -> None:
    inp = run["inputs"]
    for out in run["ranks"]:
        torch.testing.assert_close(out["eval_embeddings"], inp["embeddings"], atol=0, rtol=0)
        assert out["eval_labels"].tolist() == inp["labels"].tolist()
    assert [out["is_main"] for out in run["ranks"]] == [True, False]


def test_sharded_checkpoint_resumes_on_same_world_size(run: dict) -> None:
    files = sorted(p.name for p in run["ckpt"].iterdir())
    assert files == ["classifier-rank0-of-2.pt", "classifier-rank1-of-2.pt", "replicated.pt", "sharded.json"]
    weight = run["inputs"]["weight"].float()
    for r in range(WORLD):
        state = run["ranks"][r]["resumed"]
        start, end = shard_range(NUM_CLASSES, r, WORLD)
        torch.testing.assert_close(state["classifier"]["weight"], weight[start:end], atol=0, rtol=0)
        assert state["epoch"] == 3
        torch.testing.assert_close(state["model"]["backbone.w"], run["inputs"]["embeddings"].float())


def test_sharded_checkpoint_refused_on_other_world_size(run: dict) -> None:
    with pytest.raises(ShardedCheckpointError, match=r"written by 2 workers, this run has 1: resume with --nproc-per-node 2"):
        load_sharded(str(run["ckpt"]), env=DistEnv())
    with pytest.raises(ShardedCheckpointError, match="written by 2 workers, this run has 4"):
        load_sharded(str(run["ckpt"]), DistEnv(rank=1, world_size=4))


# ---- single process: no torchrun ----------------------------------------------------------------


def test_sharded_checkpoint_incomplete_or_missing(tmp_path: Path) -> None:
    with pytest.raises(ShardedCheckpointError, match="no sharded.json"):
        load_sharded(str(tmp_path), env=DistEnv())
    save_sharded({"classifier": {"weight": torch.ones(2, 3)}, "epoch": 1}, str(tmp_path), env=DistEnv())
    (tmp_path / "classifier-rank0-of-1.pt").unlink()
    with pytest.raises(ShardedCheckpointError, match="is missing"):
        load_sharded(str(tmp_path), env=DistEnv())


@pytest.mark.parametrize("num_classes", [1, 2, 7, 8, 100, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_range_covers_classes_once(num_classes: int, world: int) -> None:
    spans = [shard_range(num_classes, r, world) for r in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(0 <= e - s <= math.ceil(num_classes / world) for s, e in spans)
    assert spans[0][1] - spans[0][0] == math.ceil(num_classes / world)


@pytest.mark.parametrize("kind", ["softmax", "amsoftmax"])
def test_one_process_equals_reference(kind: str) -> None:
    inp = _inputs()
    cfg = LossConfig(name=LossName.MODEL_PARALLEL_SOFTMAX if kind == "softmax" else LossName.MODEL_PARALLEL_AMSOFTMAX,
                     auto_scale=False)
    loss_fn = build_loss(cfg, NUM_CLASSES, DIM, env=DistEnv()).double()
    if kind == "softmax":
        loss_fn.scale = SOFTMAX_SCALE  # the config default is 1.0; keep the reference's constant
    loss_fn.classifier.load_full_weight(inp["weight"])
    emb = inp["embeddings"].clone().requires_grad_(True)
    out = loss_fn(emb, inp["labels"])
    loss = out.total
    loss.backward()
    assert out.metric == loss.detach() and out.classification == 0
    ref_loss, ref_e, ref_w = _reference(kind, inp["embeddings"], inp["labels"], inp["weight"])
    torch.testing.assert_close(loss.detach(), ref_loss)
    torch.testing.assert_close(emb.grad, ref_e)
    torch.testing.assert_close(loss_fn.classifier.weight.grad, ref_w)


def test_build_uses_config_defaults_and_rejects_a_softmax_margin() -> None:
    am = build_loss(LossConfig(name=LossName.MODEL_PARALLEL_AMSOFTMAX, auto_scale=False), 10, 4, env=DistEnv())
    assert (am.margin, am.scale) == LOSS_DEFAULTS[LossName.MODEL_PARALLEL_AMSOFTMAX]
    with pytest.raises(ValueError, match="has no margin"):
        build_loss(LossConfig(name=LossName.MODEL_PARALLEL_SOFTMAX, margin=0.3), 10, 4, env=DistEnv())
    with pytest.raises(ValueError, match="has no margin"):
        ModelParallelSoftmax(10, 4, DistEnv(), margin=0.3)


def test_loss_weight_mixes_in_a_sharded_softmax_head() -> None:
    inp = _inputs()
    cfg = LossConfig(name=LossName.MODEL_PARALLEL_AMSOFTMAX, weight=0.7, auto_scale=False)
    loss_fn = build_loss(cfg, NUM_CLASSES, DIM, env=DistEnv()).double()
    loss_fn.classifier.load_full_weight(inp["weight"])
    head = torch.randn(NUM_CLASSES, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    loss_fn.head.load_full_weight(head)
    out = loss_fn(inp["embeddings"], inp["labels"])
    metric, _, _ = _reference("amsoftmax", inp["embeddings"], inp["labels"], inp["weight"])
    ce = F.cross_entropy(inp["embeddings"] @ head.t(), inp["labels"])
    torch.testing.assert_close(out.metric, metric)
    torch.testing.assert_close(out.classification, ce)
    torch.testing.assert_close(out.total, 0.7 * metric + 0.3 * ce)
    assert build_loss(LossConfig(name=LossName.MODEL_PARALLEL_AMSOFTMAX), 7, 4, env=DistEnv()).head is None


def test_labels_out_of_range_are_an_error() -> None:
    loss_fn = ModelParallelAMSoftmax(3, 4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 3]))


def test_dist_env_from_environment() -> None:
    assert DistEnv.from_env({}) == DistEnv(rank=0, local_rank=0, world_size=1)
    env = DistEnv.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "29500"})
    assert (env.rank, env.local_rank, env.world_size, env.master_port, env.is_main) == (3, 1, 4, 29500, False)
    with pytest.raises(RuntimeError, match="start the workers with torchrun"):
        DistEnv.from_env({"WORLD_SIZE": "2"})
    # a single process joins no group and the collectives are identities
    assert init_process_group("cpu", {}) == DistEnv()
    x = torch.randn(3, 2)
    assert all_gather_with_grad(x) is x and DistEnv.from_env({}).is_main
