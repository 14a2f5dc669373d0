"""The training loop on a tiny real task: resnet18, 16 px colour classes, batch 8, 2 epochs.

One uninterrupted run is the reference; every interrupted run (SIGKILL of a real process,
SIGTERM, time limit) must resume to bit-identical final weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.support.cli import checkpoints, ckpt_dir, kept
from tests.support.images import write_colour_dataset
from imlt.trainer import checkpoint as ckpt
from imlt.trainer import engine
from imlt.trainer.config import ConfigError, Scheduler, validate_config
from imlt.trainer.checkpoint import ResumeConfigError
from imlt.trainer.engine import NonFiniteLossError, Trainer, TrainingInterrupted, run_training
from imlt.trainer.history import EpochStats
from imlt.trainer.model_files import CLASSES, CONFIG, CURVE, HISTORY, TRAINED, USAGE, WEIGHTS
from imlt.trainer.optim import lr_factor
from imlt.trainer.steps import TrainInput

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "grey"]
PER_CLASS = 12  # 48 images, batch 8 -> 6 steps per epoch
STEPS_PER_EPOCH = 6




pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four classes told apart by colour, with pixel noise: an easy task a few steps can learn."""
    return write_colour_dataset(tmp_path_factory.mktemp("colours"), COLOURS, PER_CLASS)


def raw_config(output_dir: Path, **sections: dict) -> dict:
    raw = {
        "output_dir": str(output_dir),
        "data": {"image_size": 16, "reader_threads": 0},
        "model": {"backbone": "resnet18", "feature_dim": 32},
        "optim": {"lr": 0.05, "warmup_epochs": 1},
        "train": {"batch_size": 8, "epochs": 2, "checkpoint_every": 1, "device": "cpu", "seed": 7, "threads": 1},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def train(output_dir: Path, dataset: str, resume: bool = True, **sections: dict):
    cfg = validate_config(raw_config(output_dir, **sections))
    return run_training(TrainInput(config=cfg, train_dataset=dataset, resume=resume))



def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, dataset: str):
    out = tmp_path_factory.mktemp("reference")
    return out, train(out, dataset)


# --- an uninterrupted run -----------------------------------------------------------------------


def test_loss_decreases_and_outputs_are_written(reference) -> None:
    out, result = reference
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.epochs_completed == 2 and not result.stopped_early
    assert result.final_loss == losses[-1]
    assert result.model_dir == str(out)

    config = json.loads((out / CONFIG).read_text())
    assert config["config_hash"] == result.config_hash
    assert config["model"]["num_classes"] == 4  # resolved from classes.txt
    assert (out / CLASSES).read_text().split() == COLOURS
    assert (out / CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = [EpochStats.model_validate(h) for h in json.loads((out / HISTORY).read_text())]
    assert [h.epoch for h in history] == [1, 2]
    assert all(h.images == 48 and h.images_per_second > 0 and h.seconds > 0 for h in history)
    # warmup over epoch 1 ends at the peak; cosine over epoch 2 brings it near 0
    assert history[0].lr == pytest.approx(0.05) and 0 < history[1].lr < 0.1 * 0.05
    usage = json.loads((out / USAGE).read_text())
    assert usage["instance_minutes"] == result.instance_minutes == math.ceil(usage["wall_seconds"] / 60)
    assert usage["device"] == "cpu" and usage["gpu_count"] == 0
    assert checkpoints(out) == kept(result.history) == ["epoch-0002.ckpt"]  # the last epoch is also the best

    from imlt.trainer.model import load_embedding_model

    model, cfg = load_embedding_model(str(out))
    assert cfg.config_hash() == result.config_hash
    emb = model(torch.zeros(2, 3, 16, 16))
    assert emb.shape == (2, 32)


def test_model_folder_holds_the_model_only(tmp_path: Path, dataset: str) -> None:
    """Lean artifact: a 3-epoch run's model folder is the model (at most 1.2x its weights file);
    the checkpoints sit beside it, the last epoch's plus the best one's."""
    out = tmp_path / "model"
    result = train(out, dataset, train={"epochs": 3})
    assert sorted(p.name for p in out.iterdir()) == sorted(TRAINED)
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size <= 1.2 * (out / WEIGHTS).stat().st_size, size
    losses = [h["loss"] for h in result.history]
    best = 1 + losses.index(min(losses))
    assert checkpoints(out) == kept(result.history) == sorted({f"epoch-{best:04d}.ckpt", "epoch-0003.ckpt"})
    # resume finds them there: a second call is a finished run, nothing trained again
    again = train(out, dataset, train={"epochs": 3})
    assert again.history == result.history


def test_checkpoint_retention_keeps_the_last_k_and_the_best() -> None:
    found = [((e, 0), f"epoch-{e}") for e in (1, 2, 3, 4)] + [((2, 5), "mid-2"), ((4, 3), "mid-4")]
    found.sort()
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.6}
    assert ckpt.stale_checkpoints(found, (4, 3), 1, losses) == ["mid-2", "epoch-1", "epoch-3"]
    assert ckpt.stale_checkpoints(found, (4, 3), 2, losses) == ["mid-2", "epoch-1"]
    assert ckpt.stale_checkpoints(found, (4, 3), 1, {}) == ["mid-2", "epoch-1", "epoch-2", "epoch-3"]


def test_checkpoint_folder_setting_and_default() -> None:
    def where(output_dir: str, **train: object) -> str:
        return ckpt.checkpoint_dir(validate_config({"output_dir": output_dir, "train": train}))

    assert where("/runs/a/model/") == "/runs/a/model-checkpoints"
    assert where("oss://bucket/runs/a") == "oss://bucket/runs/a-checkpoints"
    assert where("oss://bucket/runs/a", checkpoint_dir="oss://other/ckpt/") == "oss://other/ckpt"
    with pytest.raises(ConfigError, match="train.checkpoint_dir"):
        where("oss://bucket")


def test_checkpoint_holds_the_whole_state(reference) -> None:
    out, result = reference
    state = ckpt.load_checkpoint(str(ckpt_dir(out) / "epoch-0002.ckpt"))
    assert state["epoch"] == 2 and state["batch"] == 0 and state["global_step"] == 2 * STEPS_PER_EPOCH
    assert {"model", "loss", "optimizer", "scheduler", "scaler", "rng", "config", "history"} <= set(state)
    assert state["config_hash"] == result.config_hash
    assert set(state["rng"]) >= {"torch", "numpy", "python", "loader"}
    assert any(t.shape in ((4, 32), (32, 4)) for t in state["loss"].values()), "class centres are saved"


def test_rerun_of_a_finished_run_does_not_train_again(reference, tmp_path: Path, dataset: str) -> None:
    out, result = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / WEIGHTS).unlink()
    again = train(copy, dataset)  # output_dir differs, so compare against a run in `copy` itself
    assert again.epochs_completed == 2 and [h["loss"] for h in again.history] == [h["loss"] for h in result.history]
    assert_same_weights(out, copy)


# --- interrupted runs resume exactly ------------------------------------------------------------

_KILLED_CHILD = """
import sys, time, json
from pathlib import Path
from imlt.trainer import engine
from imlt.trainer.config import validate_config
from imlt.trainer.steps import TrainInput

cfg = validate_config(json.loads(sys.argv[1]))
marker = Path(sys.argv[3])
step = engine.Trainer.training_step

def paused(self, images, labels, epoch, batch_index):
    out = step(self, images, labels, epoch, batch_index)
    if epoch == 1 and batch_index == 2:  # mid epoch 2, after the epoch-1 checkpoint
        marker.write_text("paused")
        time.sleep(120)
    return out

engine.Trainer.training_step = paused
engine.run_training(TrainInput(config=cfg, train_dataset=sys.argv[2]))
"""


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path: Path, dataset: str) -> None:
    out = tmp_path / "killed"
    raw = raw_config(out)
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # as one_thread()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, json.dumps(raw), dataset, str(marker)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "child never reached epoch 2"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert checkpoints(out) == ["epoch-0001.ckpt"]
    assert not (out / WEIGHTS).exists()

    result = run_training(TrainInput(config=validate_config(raw), train_dataset=dataset))
    assert result.epochs_completed == 2
    assert_same_weights(reference[0], out)
    assert [h["loss"] for h in result.history] == [h["loss"] for h in reference[1].history]


def test_sigterm_checkpoints_mid_epoch_and_resume_is_bit_identical(
    reference, tmp_path: Path, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = Trainer.training_step

    def terminated(self, images, labels, epoch, batch_index):
        out = step(self, images, labels, epoch, batch_index)
        if epoch == 1 and batch_index == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, through the real handler
        return out

    monkeypatch.setattr(Trainer, "training_step", terminated)
    with pytest.raises(TrainingInterrupted, match="epoch 2, batch 3") as info:
        train(tmp_path, dataset)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again
    assert checkpoints(tmp_path) == ["epoch-0001-batch-000003.ckpt", "epoch-0001.ckpt"]
    assert info.value.checkpoint.endswith("epoch-0001-batch-000003.ckpt")
    assert ckpt.latest_checkpoint(str(ckpt_dir(tmp_path))).endswith("epoch-0001-batch-000003.ckpt")

    monkeypatch.setattr(Trainer, "training_step", step)
    result = train(tmp_path, dataset)
    assert_same_weights(reference[0], tmp_path)
    assert [h["loss"] for h in result.history] == [h["loss"] for h in reference[1].history]
    assert result.history[1]["images"] == 48  # the split epoch reports the whole epoch
    # the mid-epoch checkpoint is superseded and removed
    assert checkpoints(tmp_path) == kept(result.history)


def test_time_limit_stops_cleanly_and_resume_finishes(
    reference, tmp_path: Path, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    step = Trainer.training_step

    def ten_seconds_each(self, *args):
        now[0] += 10.0
        return step(self, *args)

    monkeypatch.setattr(Trainer, "training_step", ten_seconds_each)
    cfg = validate_config(raw_config(tmp_path))
    first = run_training(TrainInput(config=cfg, train_dataset=dataset), clock=lambda: now[0], max_seconds=75)
    assert first.stopped_early and first.epochs_completed == 1
    assert len(first.history) == 1
    # 8 steps = 1 epoch + 2 batches: checkpoint there, and a usable model is written anyway
    assert checkpoints(tmp_path)[0] == "epoch-0001-batch-000002.ckpt"
    assert (tmp_path / WEIGHTS).exists() and (tmp_path / HISTORY).exists()

    monkeypatch.setattr(Trainer, "training_step", step)
    second = run_training(TrainInput(config=cfg, train_dataset=dataset))
    assert not second.stopped_early and second.epochs_completed == 2
    assert_same_weights(reference[0], tmp_path)


def test_time_limit_from_environment(tmp_path: Path, dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engine.MAX_SECONDS_ENV, "0")
    result = train(tmp_path, dataset, train={"epochs": 2})
    assert result.stopped_early and result.epochs_completed == 0
    assert checkpoints(tmp_path) == ["epoch-0000-batch-000001.ckpt"]  # stopped after the first step
    assert math.isfinite(result.final_loss)  # the mean of the partial epoch


def test_loader_workers_do_not_change_the_result(reference, tmp_path: Path, dataset: str) -> None:
    train(tmp_path, dataset, data={"reader_threads": 2})
    assert_same_weights(reference[0], tmp_path)


# --- refusals -----------------------------------------------------------------------------------


def test_resume_with_changed_config_is_refused_naming_the_fields(tmp_path: Path, dataset: str) -> None:
    train(tmp_path, dataset, train={"epochs": 1})
    before = (tmp_path / CONFIG).read_text()
    with pytest.raises(ResumeConfigError) as info:
        train(tmp_path, dataset, optim={"lr": 0.01}, train={"epochs": 3})
    message = str(info.value)
    assert "optim.lr: 0.05 -> 0.01" in message and "train.epochs: 1 -> 3" in message
    assert "output_dir:" not in message and "epoch-0001.ckpt" in message
    assert (tmp_path / CONFIG).read_text() == before  # refused before writing anything

    # resume=false starts over in the same folder, removing the old run's checkpoints; this run
    # also shows the cadence: every 2nd epoch, plus the last one
    result = train(tmp_path, dataset, resume=False, optim={"lr": 0.01}, train={"epochs": 3, "checkpoint_every": 2, "keep_checkpoints": 2})
    assert result.epochs_completed == 3 and checkpoints(tmp_path) == ["epoch-0002.ckpt", "epoch-0003.ckpt"]


def test_nan_loss_raises_naming_the_step_and_keeps_the_last_checkpoint(
    tmp_path: Path, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = Trainer.save_checkpoint

    def diverge_after_epoch_1(self):
        url = save(self)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))  # the weights blow up after the checkpoint
        return url

    monkeypatch.setattr(Trainer, "save_checkpoint", diverge_after_epoch_1)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, batch index 0, global step 6") as info:
        train(tmp_path, dataset, train={"epochs": 2})
    assert "epoch-0001.ckpt" in str(info.value)
    assert checkpoints(tmp_path) == ["epoch-0001.ckpt"]
    assert not (tmp_path / WEIGHTS).exists()
    state = ckpt.load_checkpoint(str(ckpt_dir(tmp_path) / "epoch-0001.ckpt"))
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_diverging_learning_rate_is_an_error_not_a_skip(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(NonFiniteLossError, match=r"global step \d+.*none yet.*optim.lr"):
        train(tmp_path, dataset, optim={"lr": 1e30, "warmup_epochs": 0}, train={"epochs": 1})


def test_num_classes_must_match_the_dataset(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(ConfigError, match=r"model.num_classes=7 .*classes.txt lists 4"):
        train(tmp_path, dataset, model={"num_classes": 7})


def test_missing_train_dataset_is_a_clear_error(tmp_path: Path) -> None:
    cfg = validate_config(raw_config(tmp_path, data={"train_annotations": "oss://b/train.txt"}))
    with pytest.raises(ValueError, match=r"no train dataset: .*oss://b/train.txt"):
        run_training(TrainInput(config=cfg, train_dataset=None))
    with pytest.raises(FileNotFoundError, match="manifest.jsonl"):
        run_training(TrainInput(config=cfg, train_dataset=str(tmp_path / "nothing")))


def test_m_per_class_batches(tmp_path: Path, dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[int]] = []
    step = Trainer.training_step

    def record(self, images, labels, *args):
        seen.append(sorted(labels.tolist()))
        return step(self, images, labels, *args)

    monkeypatch.setattr(Trainer, "training_step", record)
    train(tmp_path, dataset, train={"epochs": 1, "m_per_class": 4})
    assert len(seen) == STEPS_PER_EPOCH
    for labels in seen:  # 2 classes x 4 images each
        assert len(set(labels)) == 2 and all(labels.count(c) == 4 for c in set(labels))


# --- pure parts ---------------------------------------------------------------------------------


def test_lr_schedules() -> None:
    kw = {"total_steps": 100, "warmup_steps": 10}
    cosine = [lr_factor(s, schedule=Scheduler.COSINE, **kw) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == 1.0 and cosine[10] == 1.0
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:])) and 0 < cosine[-1] < 0.01
    assert cosine[55] == pytest.approx(0.5)
    step = [lr_factor(s, schedule=Scheduler.STEP, **kw) for s in range(100)]
    assert step[10] == step[54] == 1.0 and step[55] == pytest.approx(0.1) and step[99] == pytest.approx(0.01)
    assert lr_factor(99, schedule=Scheduler.CONSTANT, **kw) == 1.0


def test_latest_checkpoint_orders_mid_epoch_after_its_epoch(tmp_path: Path) -> None:
    d = tmp_path / "checkpoints"
    d.mkdir()
    for name in ("epoch-0001.ckpt", "epoch-0002-batch-000004.ckpt", "epoch-0002.ckpt", "notes.txt"):
        (d / name).write_bytes(b"")
    assert ckpt.latest_checkpoint(str(d)).endswith("epoch-0002-batch-000004.ckpt")
    assert ckpt.parse_checkpoint_name("epoch-0002-batch-000004.ckpt") == (2, 4)
    assert ckpt.checkpoint_name(3) == "epoch-0003.ckpt"
    assert ckpt.latest_checkpoint(str(tmp_path / "missing")) is None


def test_rng_state_survives_a_checkpoint_file(tmp_path: Path) -> None:
    import random

    url = str(tmp_path / "epoch-0001.ckpt")
    ckpt.save_checkpoint(url, {"epoch": 1, "rng": ckpt.capture_rng_state()})
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    ckpt.restore_rng_state(ckpt.load_checkpoint(url)["rng"])  # weights_only load of the states
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_unreadable_checkpoint_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "epoch-0001.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="epoch-0001.ckpt: not a readable checkpoint"):
        ckpt.load_checkpoint(str(bad))


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path, dataset: str, caplog: pytest.LogCaptureFixture) -> None:
    """KFP and Airflow logs are not terminals: a line every train.log_every_steps steps with step, loss, images/s, ETA."""
    with caplog.at_level(logging.INFO, logger="imlt.trainer.history"):
        train(tmp_path, dataset, train={"epochs": 1, "log_every_steps": 2})
    lines = [r.getMessage() for r in caplog.records if r.name == "imlt.trainer.history"]
    assert [line.split(":")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"], lines
    assert all("images/s" in line and "ETA" in line and "loss" in line for line in lines)
    assert lines[-1].endswith("ETA 0:00:00")


def test_channels_last_trains_the_same_model_in_the_other_memory_layout(tmp_path: Path, dataset: str) -> None:
    """train.channels_last reaches the weights and every batch, and changes only rounding."""
    cfg = validate_config(raw_config(tmp_path / "cl", train={"epochs": 1, "channels_last": True}))
    trainer = Trainer(cfg, dataset, resume=False)
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    conv.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    trained = trainer.fit()
    assert seen and all(seen)
    default = train(tmp_path / "default", dataset, train={"epochs": 1})
    assert trained.history[0]["loss"] == pytest.approx(default.history[0]["loss"], rel=1e-2)


def test_a_scale_far_above_the_class_count_scale_is_warned_about_and_auto_scale_logged(
    tmp_path: Path, dataset: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="imlt.trainer.engine"):
        train(tmp_path / "ref", dataset, loss={"name": "ArcFace", "auto_scale": False}, train={"epochs": 1})
        train(tmp_path / "auto", dataset, loss={"name": "ArcFace"}, train={"epochs": 1})
    messages = [r.getMessage() for r in caplog.records]
    # 4 classes: sqrt(2) ln 3 = 1.55; 64 is 41x that
    assert any("loss.scale=64 is 41x the class-count scale 1.6 for 4 classes" in m for m in messages)
    assert any("ArcFace: logit scale 1.55 from 4 classes (loss.auto_scale)" in m for m in messages)
