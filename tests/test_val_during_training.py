"""Validation during training (issue 14 item 2): val Recall@1 / MAP@R per epoch, the best epoch
as the model with the last beside it, early stopping, exact resume, and 2-process runs.

Tiny real task: resnet18 (test_resnet under torchrun) on 16 px colour classes, val split of
other images of the same colours plus an unseen one. Where a test needs a given sequence of val
scores (a best epoch that is not the last, a stop after N epochs without progress), it replaces
the measurement only (`Trainer._measure_val`); the selection, checkpoints, resume and outputs
under test stay the real ones, and the real measurement is exercised by the other tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.images import write_colour_dataset
from imlt.trainer import checkpoint as ckpt
from imlt.trainer.config import validate_config
from imlt.trainer.engine import Trainer, TrainingInterrupted, run_training
from imlt.trainer.history import EpochStats
from imlt.trainer.model_files import HISTORY, LAST, WEIGHTS
from imlt.trainer.steps import TrainInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    train = write_colour_dataset(tmp_path_factory.mktemp("train"), ["red", "green", "blue", "grey"], 8)
    val = write_colour_dataset(tmp_path_factory.mktemp("val"), ["yellow", "grey", "blue", "green", "red"], 3)
    return train, val


def raw_config(output_dir: Path, **train: object) -> dict:
    return {
        "output_dir": str(output_dir),
        "data": {"image_size": 16, "reader_threads": 0},
        "model": {"backbone": "resnet18", "feature_dim": 16},
        "optim": {"lr": 0.05, "warmup_epochs": 1},
        "train": {"batch_size": 8, "epochs": 3, "checkpoint_every": 1, "device": "cpu", "seed": 5, "threads": 1,
                  **train},
    }


def train(output_dir: Path, datasets: tuple[str, str], val: bool = True, **settings: object):
    cfg = validate_config(raw_config(output_dir, **settings))
    return run_training(TrainInput(config=cfg, train_dataset=datasets[0], val_dataset=datasets[1] if val else None))


def checkpoint_weights(output_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    state = ckpt.load_checkpoint(str(Path(f"{output_dir}{ckpt.CHECKPOINTS_SUFFIX}") / ckpt.checkpoint_name(epoch)))
    return state["model"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(f"{output_dir}{ckpt.CHECKPOINTS_SUFFIX}").glob("*.ckpt"))


def scripted(monkeypatch: pytest.MonkeyPatch, recalls: list[float]) -> None:
    """Val Recall@1 of epoch i is recalls[i-1] (MAP@R half of it)."""
    def measure(self: Trainer) -> tuple[float, float]:
        r = recalls[self.epoch - 1]
        return r, r / 2

    monkeypatch.setattr(Trainer, "_measure_val", measure)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, datasets: tuple[str, str]):
    out = tmp_path_factory.mktemp("reference") / "model"
    return out, train(out, datasets, keep_checkpoints=3)


@contextlib.contextmanager
def sigterm_at(monkeypatch: pytest.MonkeyPatch, *, epoch: int, batch: int) -> Iterator[None]:
    """A real SIGTERM to this process right after training step (epoch, batch); the real step again after."""
    step = Trainer.training_step

    def terminated(self, images, labels, epoch_, batch_index):
        out = step(self, images, labels, epoch_, batch_index)
        if (epoch_, batch_index) == (epoch, batch):
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "training_step", terminated)
    try:
        yield
    finally:
        monkeypatch.setattr(Trainer, "training_step", step)


def test_val_metrics_per_epoch_and_best_epoch_is_the_model(reference, caplog: pytest.LogCaptureFixture) -> None:
    out, result = reference
    history = [EpochStats.model_validate(h) for h in json.loads((out / HISTORY).read_text())]
    assert [h.epoch for h in history] == [1, 2, 3]
    assert all(0.0 <= h.val_recall_at_1 <= 1.0 and 0.0 <= h.val_map_at_r <= 1.0 for h in history)
    assert result.history == [h.model_dump() for h in history]
    recalls = [h.val_recall_at_1 for h in history]
    best = 1 + recalls.index(max(recalls))  # ties: the earliest
    assert same(load_file(out / WEIGHTS), checkpoint_weights(out, best))
    assert same(load_file(out / LAST / WEIGHTS), checkpoint_weights(out, 3))
    from imlt.trainer.model import load_embedding_model

    model, _ = load_embedding_model(str(out / LAST))  # the last epoch is a model folder of its own
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 16)


def test_without_val_the_last_epoch_is_the_model(tmp_path: Path, datasets: tuple[str, str]) -> None:
    out = tmp_path / "model"
    result = train(out, datasets, val=False, epochs=2)
    assert not (out / LAST).exists()
    assert same(load_file(out / WEIGHTS), checkpoint_weights(out, 2))
    assert all("val_recall_at_1" not in h for h in json.loads((out / HISTORY).read_text()))
    assert result.history[-1]["val_recall_at_1"] is None


def test_validation_does_not_change_training(reference, tmp_path: Path, datasets: tuple[str, str]) -> None:
    """Validation runs under a forked RNG: the last epoch's weights equal a run without a val split."""
    out = tmp_path / "model"
    train(out, datasets, val=False)
    assert same(load_file(out / WEIGHTS), load_file(reference[0] / LAST / WEIGHTS))


def test_best_epoch_not_last_and_checkpoint_kept(tmp_path: Path, datasets: tuple[str, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, [0.5, 0.9, 0.7])
    out = tmp_path / "model"
    result = train(out, datasets)
    assert [h["val_recall_at_1"] for h in result.history] == [0.5, 0.9, 0.7]
    assert not result.stopped_early
    assert same(load_file(out / WEIGHTS), checkpoint_weights(out, 2))
    assert same(load_file(out / LAST / WEIGHTS), checkpoint_weights(out, 3))
    # kept: the last epoch and the best by val Recall@1 (not by training loss)
    assert checkpoints(out) == ["epoch-0002.ckpt", "epoch-0003.ckpt"]


def test_early_stop_after_patience(tmp_path: Path, datasets: tuple[str, str], monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    scripted(monkeypatch, [0.6, 0.5, 0.6, 0.9, 0.9])
    out = tmp_path / "model"
    with caplog.at_level("INFO", logger="imlt.trainer.engine"):
        result = train(out, datasets, epochs=5, early_stop_patience=2)
    assert result.stopped_early and result.epochs_completed == 3
    assert [h["val_recall_at_1"] for h in result.history] == [0.6, 0.5, 0.6]  # a tie is no progress
    assert same(load_file(out / WEIGHTS), checkpoint_weights(out, 1))
    assert checkpoints(out) == ["epoch-0001.ckpt", "epoch-0003.ckpt"]
    assert "early stop" in caplog.text and "val Recall@1 0.5000, MAP@R 0.2500" in caplog.text
    # a rerun of the stopped run resumes into the stop: nothing more is trained
    again = train(out, datasets, epochs=5, early_stop_patience=2)
    assert again.epochs_completed == 3 and again.history == result.history


def test_validate_every_n_epochs(tmp_path: Path, datasets: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, [0.1, 0.2, 0.3])
    result = train(tmp_path / "model", datasets, validate_every=2)
    assert [h["val_recall_at_1"] for h in result.history] == [None, 0.2, 0.3]  # every 2nd, and the last


def test_sigterm_and_resume_with_val_and_patience_is_bit_identical(
    tmp_path: Path, datasets: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Best-so-far weights, metric and patience counter survive a stop mid-epoch 3."""
    scripted(monkeypatch, [0.5, 0.4, 0.45, 0.3, 0.9])
    settings = {"epochs": 5, "early_stop_patience": 3}
    ref = tmp_path / "ref"
    expected = train(ref, datasets, **settings)
    out = tmp_path / "stopped"
    with sigterm_at(monkeypatch, epoch=2, batch=1), pytest.raises(TrainingInterrupted):
        train(out, datasets, **settings)
    result = train(out, datasets, **settings)
    assert expected.stopped_early and expected.epochs_completed == 4
    timing = ("seconds", "images_per_second", "val_seconds")
    assert result.history == [{**h, **{k: r[k] for k in timing}} for h, r in zip(expected.history, result.history)]
    assert all(r["val_seconds"] > 0 for r in result.history)
    assert result.stopped_early == expected.stopped_early and result.epochs_completed == 4
    assert same(load_file(out / WEIGHTS), load_file(ref / WEIGHTS))
    assert same(load_file(out / LAST / WEIGHTS), load_file(ref / LAST / WEIGHTS))
    assert same(load_file(out / WEIGHTS), checkpoint_weights(out, 1))


def test_real_val_resume_is_bit_identical(reference, tmp_path: Path, datasets: tuple[str, str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model"
    with sigterm_at(monkeypatch, epoch=1, batch=1), pytest.raises(TrainingInterrupted):
        train(out, datasets, keep_checkpoints=3)
    result = train(out, datasets, keep_checkpoints=3)
    ref_out, ref = reference
    assert [h["val_recall_at_1"] for h in result.history] == [h["val_recall_at_1"] for h in ref.history]
    assert [h["val_map_at_r"] for h in result.history] == [h["val_map_at_r"] for h in ref.history]
    assert same(load_file(out / WEIGHTS), load_file(ref_out / WEIGHTS))
    assert same(load_file(out / LAST / WEIGHTS), load_file(ref_out / LAST / WEIGHTS))


# --- 2 gloo processes under torchrun ------------------------------------------------------------------


@pytest.mark.slow
def test_validation_under_torchrun_data_and_model_parallel(tmp_path: Path) -> None:
    """Rank 0 measures, every rank takes the same best-epoch and early-stop decisions; no deadlock
    when the run stops early (patience 1), and a model-parallel run SIGTERMed on rank 1 only
    resumes, with its best-so-far, to the same model as the uninterrupted one."""
    from tests.test_engine_distributed import WORKER, torchrun

    colours = ["red", "green", "blue", "grey", "yellow"]
    train_ds = write_colour_dataset(tmp_path / "train", colours, 8)  # 40 images: 5 steps of 8 an epoch
    val_ds = write_colour_dataset(tmp_path / "val", colours[::-1], 3)

    def raw(name: str, model_parallel: bool = False) -> dict:
        cfg = raw_config(tmp_path / name, epochs=4, early_stop_patience=1, keep_checkpoints=4)
        cfg["model"] = {"backbone": "test_resnet", "feature_dim": 16}
        if model_parallel:
            cfg["loss"] = {"name": "ModelParallelAMSoftmax"}
            cfg["compute"] = {"model_type": "model-parallel"}
        return cfg

    runs = [
        {"name": "dp", "config": raw("dp"), "dataset": train_ds, "val_dataset": val_ds},
        {"name": "mp", "config": raw("mp", True), "dataset": train_ds, "val_dataset": val_ds},
        {"name": "mp-term", "config": raw("mp-term", True), "dataset": train_ds, "val_dataset": val_ds,
         "sigterm_at_step": {"1": 7}},
        {"name": "mp-resume", "config": raw("mp-term", True), "dataset": train_ds, "val_dataset": val_ds},
    ]
    (tmp_path / "spec.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "out").mkdir()
    torchrun(WORKER, str(tmp_path / "spec.json"), str(tmp_path / "out"))
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        for name in ("dp", "mp", "mp-resume"):
            assert "error" not in r[name], f"{name}: {r[name].get('trace')}"
        assert r["mp-term"]["error"] == "TrainingInterrupted", r["mp-term"].get("trace")
    for name in ("dp", "mp", "mp-resume"):
        results = [r[name]["result"] for r in ranks]
        hist = [[(h["epoch"], h["val_recall_at_1"], h["val_map_at_r"]) for h in res["history"]] for res in results]
        assert hist[0] == hist[1], name  # every rank took the same numbers and stopped at the same epoch
        assert all(v is not None for _, v, _ in hist[0])
        assert results[0]["epochs_completed"] == results[1]["epochs_completed"] == len(hist[0])
        assert results[0]["stopped_early"] and results[1]["stopped_early"], name  # patience 1 ended it before epoch 4
        out = tmp_path / ("mp-term" if name == "mp-resume" else name)
        recalls = [v for _, v, _ in hist[0]]
        best = 1 + recalls.index(max(recalls))
        assert same(load_file(out / WEIGHTS), _replicated_model(out, best)), name
        assert (out / LAST / WEIGHTS).exists()
    assert [h["val_recall_at_1"] for h in ranks[0]["mp"]["result"]["history"]] == \
           [h["val_recall_at_1"] for h in ranks[0]["mp-resume"]["result"]["history"]]
    assert same(load_file(tmp_path / "mp" / WEIGHTS), load_file(tmp_path / "mp-term" / WEIGHTS))
    assert same(load_file(tmp_path / "mp" / LAST / WEIGHTS), load_file(tmp_path / "mp-term" / LAST / WEIGHTS))


def _replicated_model(output_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    """The model weights of an epoch checkpoint, plain or sharded (the model is in the replicated part)."""
    url = Path(f"{output_dir}{ckpt.CHECKPOINTS_SUFFIX}") / ckpt.checkpoint_name(epoch)
    if url.is_dir():
        return torch.load(url / ckpt.REPLICATED_FILE, weights_only=True)["model"]
    return ckpt.load_checkpoint(str(url))["model"]


def test_kfp_val_metrics_artifact_holds_the_best_epoch(reference, tmp_path: Path) -> None:
    from kfp import dsl

    from imlt.components.kfp._run import fill_model_artifacts

    out, result = reference
    cfg = validate_config(raw_config(out, keep_checkpoints=3))
    metrics = dsl.Metrics(uri=str(tmp_path / "val_metrics"))
    fill_model_artifacts(result, cfg, dsl.Model(uri=str(tmp_path / "model")), dsl.HTML(uri=str(tmp_path / "c.html")),
                         metrics)
    recalls = [h["val_recall_at_1"] for h in result.history]
    best = recalls.index(max(recalls))
    assert metrics.metadata == {"recall_at_1": recalls[best], "map_at_r": result.history[best]["val_map_at_r"],
                                "best_epoch": best + 1}
