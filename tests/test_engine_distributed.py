"""The training engine under torch.distributed: 2 gloo processes on CPU against one process.

One torchrun launch (tests/engine_dist_worker.py) runs four trainings through the real
`engine.run_training`; the single-process references run here, in-process:
- data-parallel, 2 ranks x 4 images == 1 process x 8 images, step by step;
- data-parallel, a time limit seen by rank 1 only stops both ranks; resuming is bit-identical;
- model-parallel (ModelParallelAMSoftmax, centres sharded 3 + 2) == single-process AMSoftmax with
  the same centres, step by step;
- model-parallel, SIGTERM on rank 1 only: both ranks write a sharded mid-epoch checkpoint and
  raise; resuming is bit-identical; a different world size is refused.
BatchNorm is frozen in all of them (the worker's docstring says why). Then `imlt train
--nproc-per-node 2` end to end, and the launch and guard logic on their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.support.cli import ckpt_dir, kept
from tests.support.images import write_colour_dataset
from tests.engine_dist_worker import hooks
from imlt.trainer import engine, launch
from imlt.trainer.checkpoint import ResumeConfigError, ShardedCheckpointError, shard_file
from imlt.trainer.compute import resolve_compute
from imlt.trainer.config import ConfigError, validate_config
from imlt.trainer.engine import run_training
from imlt.trainer.model_files import CONFIG, HISTORY, USAGE, WEIGHTS
from imlt.trainer.steps import TrainInput

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "engine_dist_worker.py"
WORLD = 2
CLASSES = ["red", "green", "blue", "grey", "yellow"]  # 5 classes over 2 ranks: shards of 3 and 2 rows
PER_CLASS = 8  # 40 images, global batch 8 -> 5 steps an epoch
STEPS_PER_EPOCH, EPOCHS = 5, 2
FEATURE_DIM = 16
STOP_AT = 7  # epoch 2, after its 2nd batch
TOL = 1e-5




pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_colour_dataset(tmp_path_factory.mktemp("colours"), CLASSES, PER_CLASS)


def raw_config(output_dir: Path, model_parallel: bool = False) -> dict:
    raw = {
        "output_dir": str(output_dir),
        "data": {"image_size": 16, "reader_threads": 0},
        "model": {"backbone": "test_resnet", "feature_dim": FEATURE_DIM},  # timm's 0.37M-parameter ResNet
        "optim": {"lr": 0.02, "warmup_epochs": 1},
        "train": {"batch_size": 8, "epochs": EPOCHS, "checkpoint_every": 1, "device": "cpu", "seed": 3, "threads": 1},
    }
    if model_parallel:
        raw["loss"] = {"name": "ModelParallelAMSoftmax"}
        raw["compute"] = {"model_type": "model-parallel"}
    return raw  # compute.nproc_per_node stays 1: under torchrun it takes WORLD_SIZE (resolve_compute)


def centres_file(root: Path) -> Path:
    path = root / "centres.pt"
    gen = torch.Generator().manual_seed(11)
    torch.save(torch.randn(len(CLASSES), FEATURE_DIM, generator=gen), path)
    return path


def single_process(output_dir: Path, dataset: str, raw: dict, centres: Path | None = None) -> tuple[list[float], object]:
    """The same training in this process (world size 1), with the worker's hooks."""
    state: dict = {"centres": str(centres) if centres else None, "losses": [], "steps": 0}
    with pytest.MonkeyPatch.context() as mp:
        for name, fn in hooks(state).items():
            mp.setattr(engine.Trainer, name, fn)
        result = run_training(TrainInput(config=validate_config(raw), train_dataset=dataset))
    return state["losses"], result


def torchrun(script: Path, *args: str, timeout: float = 300) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, dataset: str) -> dict:
    """The four 2-rank runs, in one torchrun launch."""
    root = tmp_path_factory.mktemp("dist-engine")
    centres = centres_file(root)
    dp, mp = raw_config(root / "dp"), raw_config(root / "mp", model_parallel=True)
    runs = [
        {"name": "dp", "config": dp, "dataset": dataset},
        {"name": "dp-stop", "config": raw_config(root / "dp-stop"), "dataset": dataset, "time_limit_steps": {"1": STOP_AT}},
        {"name": "dp-resume", "config": raw_config(root / "dp-stop"), "dataset": dataset},
        {"name": "mp", "config": mp, "dataset": dataset, "centres": str(centres)},
        {"name": "mp-term", "config": raw_config(root / "mp-term", True), "dataset": dataset, "centres": str(centres),
         "sigterm_at_step": {"1": STOP_AT}},
        {"name": "mp-resume", "config": raw_config(root / "mp-term", True), "dataset": dataset, "centres": str(centres)},
    ]
    (root / "spec.json").write_text(json.dumps({"runs": runs}))
    out = root / "out"
    out.mkdir()
    torchrun(WORKER, str(root / "spec.json"), str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in ranks:
        for name, run in r.items():
            assert name == "_env" or "error" not in run or name == "mp-term", f"{name}: {run.get('trace')}"
    return {"root": root, "ranks": ranks, "centres": centres}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def assert_close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert worst <= atol, f"largest weight difference {worst:.3g}"


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# --- data-parallel --------------------------------------------------------------------------------


@pytest.mark.slow
def test_data_parallel_matches_single_process(launched: dict, dataset: str, tmp_path: Path) -> None:
    rank0, rank1 = (r["dp"] for r in launched["ranks"])
    ref_losses, ref = single_process(tmp_path, dataset, raw_config(tmp_path))
    assert len(rank0["losses"]) == len(ref_losses) == STEPS_PER_EPOCH * EPOCHS
    assert rank0["losses"] == rank1["losses"]  # every rank logs the global-batch loss
    np.testing.assert_allclose(rank0["losses"], ref_losses, rtol=0, atol=TOL)
    assert ref_losses[-1] < ref_losses[0]  # it trains, so the comparison is not of constants
    out = launched["root"] / "dp"
    assert_close_weights(out, tmp_path, atol=1e-4)
    # rank 0 wrote one model folder; the history counts the global batch
    hist = json.loads((out / HISTORY).read_text())
    hist = hist["epochs"] if isinstance(hist, dict) else hist
    assert [h["images"] for h in hist] == [STEPS_PER_EPOCH * 8] * EPOCHS
    assert np.allclose([h["loss"] for h in hist], [h["loss"] for h in ref.history], atol=TOL)
    config = json.loads((out / CONFIG).read_text())
    assert config["compute"]["nproc_per_node"] == WORLD  # the 1 x 1 config took torchrun's shape
    usage = json.loads((out / USAGE).read_text())
    assert usage["processes"] == WORLD
    assert sorted(p.name for p in ckpt_dir(out).iterdir()) == kept(hist)
    timeless = [{k: v for k, v in r["result"].items() if k not in ("history", "instance_minutes")} for r in (rank0, rank1)]
    assert timeless[0] == timeless[1]  # every rank returns the run's result (timings are each rank's own)
    assert [h["loss"] for h in rank0["result"]["history"]] == [h["loss"] for h in rank1["result"]["history"]]


@pytest.mark.slow
def test_time_limit_on_one_rank_stops_both_and_resume_is_exact(launched: dict) -> None:
    for r in launched["ranks"]:
        stopped = r["dp-stop"]["result"]
        assert stopped["stopped_early"] and stopped["epochs_completed"] == 1
        assert len(r["dp-stop"]["losses"]) == STOP_AT  # rank 0 (no limit of its own) stopped with rank 1
        assert not r["dp-resume"]["result"]["stopped_early"]
        assert len(r["dp-resume"]["losses"]) == EPOCHS * STEPS_PER_EPOCH - STOP_AT
    out = launched["root"] / "dp-stop"
    assert_same_weights(launched["root"] / "dp", out)
    dp = launched["ranks"][0]
    assert dp["dp-stop"]["losses"] + dp["dp-resume"]["losses"] == dp["dp"]["losses"]


@pytest.mark.slow
def test_data_parallel_resume_on_another_world_size_is_refused(launched: dict, dataset: str, tmp_path: Path) -> None:
    copy = tmp_path / "dp"
    shutil.copytree(launched["root"] / "dp", copy)
    shutil.copytree(ckpt_dir(launched["root"] / "dp"), ckpt_dir(copy))
    with pytest.raises(ResumeConfigError, match=r"compute.nproc_per_node: 2 -> 1"):
        run_training(TrainInput(config=validate_config(raw_config(copy)), train_dataset=dataset))


# --- model-parallel -------------------------------------------------------------------------------


@pytest.mark.slow
def test_model_parallel_matches_single_process_amsoftmax(launched: dict, dataset: str, tmp_path: Path) -> None:
    rank0, rank1 = (r["mp"] for r in launched["ranks"])
    raw = raw_config(tmp_path)  # data-parallel AMSoftmax: the same margin and scale as ModelParallelAMSoftmax
    raw["loss"] = {"name": "AMSoftmax"}
    ref_losses, _ = single_process(tmp_path, dataset, raw, centres=launched["centres"])
    assert rank0["losses"] == rank1["losses"]
    np.testing.assert_allclose(rank0["losses"], ref_losses, rtol=0, atol=TOL)
    assert ref_losses[-1] < ref_losses[0]
    out = launched["root"] / "mp"
    assert_close_weights(out, tmp_path, atol=1e-4)  # the backbone got the summed (true) gradient

    # the sharded checkpoint: each rank's file holds ceil(C/W) or fewer rows of the class matrix
    final = ckpt_dir(out) / "epoch-0002.ckpt"
    meta = json.loads((final / "sharded.json").read_text())
    assert meta["world_size"] == WORLD and set(meta["sharded_keys"]) == {"loss", "optimizer"}
    shards = [torch.load(final / shard_file(r, WORLD), weights_only=True)["loss"]["classifier.weight"] for r in range(WORLD)]
    assert [s.shape[0] for s in shards] == [3, 2]
    reference = torch.load(ckpt_dir(tmp_path) / "epoch-0002.ckpt", weights_only=True)["loss"]["centers"]
    torch.testing.assert_close(torch.cat(shards), reference, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_model_parallel_sigterm_on_one_rank_resumes_exactly(launched: dict) -> None:
    for r in launched["ranks"]:
        term = r["mp-term"]
        assert term["error"] == "TrainingInterrupted" and "epoch 2, batch 2" in term["message"], term
        assert len(term["losses"]) == STOP_AT
    out = launched["root"] / "mp-term"
    assert_same_weights(launched["root"] / "mp", out)
    rank0 = launched["ranks"][0]
    assert rank0["mp-term"]["losses"] + rank0["mp-resume"]["losses"] == rank0["mp"]["losses"]
    # the mid-epoch sharded checkpoint was superseded and removed
    assert sorted(p.name for p in ckpt_dir(out).iterdir()) == kept(rank0["mp-resume"]["result"]["history"])


@pytest.mark.slow
def test_sharded_checkpoint_refuses_another_world_size(launched: dict, dataset: str, tmp_path: Path) -> None:
    copy = tmp_path / "mp"
    shutil.copytree(launched["root"] / "mp", copy)
    shutil.copytree(ckpt_dir(launched["root"] / "mp"), ckpt_dir(copy))
    before = (copy / CONFIG).read_text()
    with pytest.raises(ShardedCheckpointError, match=r"written by 2 workers, this run has 1: resume with --nproc-per-node 2"):
        run_training(TrainInput(config=validate_config(raw_config(copy, model_parallel=True)), train_dataset=dataset))
    assert (copy / CONFIG).read_text() == before


# --- launch through the CLI -------------------------------------------------------------------------


@pytest.mark.slow
def test_imlt_train_nproc_per_node_2_end_to_end(dataset: str, tmp_path: Path) -> None:
    out = tmp_path / "model"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "imlt.trainer.cli", "train", "--train-dataset", dataset, "--output-dir", str(out),
        "--backbone", "resnet18", "--image-size", "16", "--feature-dim", "8", "--batch-size", "8",
        "--epochs", "1", "--device", "cpu", "--reader-threads", "0", "--nproc-per-node", "2",
        "--set", "train.seed=5",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout)  # printed once, by rank 0
    assert result["epochs_completed"] == 1 and result["model_dir"] == str(out)
    assert (out / WEIGHTS).exists() and (out / HISTORY).exists()
    config = json.loads((out / CONFIG).read_text())
    assert config["compute"]["nproc_per_node"] == 2 and config["train"]["seed"] == 5
    assert json.loads((out / USAGE).read_text())["processes"] == 2


# --- launch and guard logic -----------------------------------------------------------------------


def test_torchrun_command_single_and_multi_node() -> None:
    one = launch.torchrun_command(["--epochs", "1"], nproc_per_node=2, python="py", environ={})
    assert one == ["py", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1", "--standalone",
                   "-m", "imlt.trainer.cli", "train", "--epochs", "1"]
    two = launch.torchrun_command([], nproc_per_node=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", python="py", environ={})
    assert two[5:] == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29500",
                       "-m", "imlt.trainer.cli", "train"]
    # the Kubeflow operators' PET_* variables stand in for the flags
    pet = launch.torchrun_command([], nproc_per_node=1, nnodes=2, python="py",
                                  environ={"PET_MASTER_ADDR": "head", "PET_NODE_RANK": "1", "PET_MASTER_PORT": "23456"})
    assert pet[5:13] == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "head", "--master-port", "23456"]
    with pytest.raises(ConfigError, match=r"--master-addr HOST.*imlt k8s-job"):
        launch.torchrun_command([], nproc_per_node=1, nnodes=2, environ={})
    with pytest.raises(ConfigError, match=r"--node-rank 2 must be in 0..1"):
        launch.torchrun_command([], nproc_per_node=1, nnodes=2, node_rank=2, master_addr="h", environ={})


def test_cli_args_rebuild_what_was_given_minus_node_flags() -> None:
    seen: list[list[str]] = []
    app = typer.Typer()

    @app.command()
    def train(
        ctx: typer.Context,
        config: Annotated[Optional[Path], typer.Option("--config", "-c")] = None,
        lr: Annotated[Optional[float], typer.Option()] = None,
        resume: Annotated[bool, typer.Option()] = True,
        set_: Annotated[Optional[list[str]], typer.Option("--set")] = None,
        nproc_per_node: Annotated[Optional[int], typer.Option()] = None,
        master_addr: Annotated[Optional[str], typer.Option()] = None,
        node_rank: Annotated[Optional[int], typer.Option()] = None,
    ) -> None:
        seen.append(launch.cli_args(ctx))

    @app.command()
    def other() -> None:  # two commands, so `train` is a subcommand as in imlt
        pass

    args = ["train", "-c", "c.yaml", "--no-resume", "--set", "a.b=1", "--set", "c.d=x y", "--nproc-per-node", "2",
            "--master-addr", "h", "--node-rank", "1"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen == [["--config", "c.yaml", "--no-resume", "--set", "a.b=1", "--set", "c.d=x y", "--nproc-per-node", "2"]]


def test_imlt_train_builds_the_torchrun_command_for_this_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `imlt train` up to the process start: only the subprocess runner is replaced."""
    from imlt.trainer.cli import app

    started: list[list[str]] = []
    monkeypatch.setattr(launch, "run_torchrun", lambda cmd, environ=None: started.append(list(cmd)) or 0)
    for var in ("RANK", "WORLD_SIZE", "PET_MASTER_ADDR", "PET_NODE_RANK", "PET_MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    args = ["train", "--train-dataset", "ds", "--output-dir", str(tmp_path), "--backbone", "resnet18", "--lr", "0.01",
            "--no-resume", "--set", "compute.mode=distributed", "--nproc-per-node", "2", "--nnodes", "2",
            "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "29600"]
    ran = CliRunner().invoke(app, args)
    assert ran.exit_code == 0, ran.output
    assert started == [[
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "2",
        "--node-rank", "1", "--master-addr", "10.1.2.3", "--master-port", "29600", "-m", "imlt.trainer.cli", "train",
        # the options that reach the workers, in the order `imlt train` declares them
        "--train-dataset", "ds", "--no-resume", "--output-dir", str(tmp_path), "--backbone", "resnet18", "--lr", "0.01",
        "--nnodes", "2", "--nproc-per-node", "2", "--set", "compute.mode=distributed",
    ]]
    # several nodes in standalone mode are refused by the config, before anything starts
    ran = CliRunner().invoke(app, args[:-12] + ["--nnodes", "2", "--master-addr", "h"])
    assert ran.exit_code == 2 and "compute.mode=distributed" in ran.output and len(started) == 1


def test_needs_launch_only_outside_torchrun(tmp_path: Path) -> None:
    cfg = validate_config({**raw_config(tmp_path), "compute": {"nproc_per_node": 2}})
    assert launch.needs_launch(cfg, environ={})
    assert not launch.needs_launch(cfg, environ={"RANK": "0", "WORLD_SIZE": "2"})
    assert not launch.needs_launch(validate_config(raw_config(tmp_path)), environ={})


def test_distributed_mode_without_torchrun_is_refused_not_run_standalone(tmp_path: Path, dataset: str) -> None:
    raw = {**raw_config(tmp_path), "compute": {"mode": "distributed", "nnodes": 2}}
    with pytest.raises(ConfigError, match=r"compute.mode=distributed .*not started by torchrun.*imlt k8s-job"):
        run_training(TrainInput(config=validate_config(raw), train_dataset=dataset))
    raw = {**raw_config(tmp_path), "compute": {"nproc_per_node": 2}}
    with pytest.raises(ConfigError, match=r"asks for 2 processes.*imlt train --nproc-per-node 2"):
        run_training(TrainInput(config=validate_config(raw), train_dataset=dataset))
    assert not (tmp_path / CONFIG).exists()  # refused before anything was written


def test_resolve_compute_against_torchrun_environment(tmp_path: Path) -> None:
    plain = validate_config(raw_config(tmp_path))
    assert resolve_compute(plain, environ={}) is plain
    filled = resolve_compute(plain, environ={"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    assert (filled.compute.nnodes, filled.compute.nproc_per_node, filled.compute.mode.value) == (2, 2, "distributed")
    asked = validate_config({**raw_config(tmp_path), "compute": {"nproc_per_node": 2}})
    assert resolve_compute(asked, environ={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) is asked
    with pytest.raises(ConfigError, match=r"= 2, but torchrun started WORLD_SIZE=3"):
        resolve_compute(asked, environ={"RANK": "0", "WORLD_SIZE": "3"})
