"""Publishing: gate, exports that reproduce the eager model, versions, and a `latest` that survives crashes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from imlt.trainer import storage
from imlt.trainer.config import RunConfig
from imlt.trainer.data.manifest import DatasetSummary, ManifestRecord, write_dataset
from imlt.trainer.evaluate import write_metrics
from imlt.trainer.model import build_model, load_embedding_model, save_embedding_model
from imlt.trainer.publish import (
    LATEST,
    PublishError,
    check_exports,
    existing_versions,
    export_onnx,
    export_torchscript,
    publish_model,
    reserve_version,
    resolve_published,
)
from imlt.trainer.steps import PublishInput

IMAGE_SIZE = 32
CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A train-step output folder: an untrained resnet18 (not zero-init, so outputs vary)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = RunConfig(
        output_dir=str(root),
        data={"image_size": IMAGE_SIZE},
        model={"backbone": "resnet18", "feature_dim": 16, "zero_init_last": False},
        train={"device": "cpu"},
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, IMAGE_SIZE)
    with torch.no_grad():  # non-trivial BatchNorm statistics in the neck, as after training
        model.neck[1].running_mean.uniform_(-0.5, 0.5)
        model.neck[1].running_var.uniform_(0.5, 2.0)
    save_embedding_model(model.eval(), cfg, str(root), CLASSES)
    (root / "usage.json").write_text(json.dumps({"instance_minutes": 3, "gpu_type": None, "gpus": 0}))
    return str(root)


def _metrics_dir(tmp_path: Path, recall_at_1: float) -> str:
    out = tmp_path / f"metrics-{recall_at_1}"
    metrics = {"recall_at_1": recall_at_1, "recall_at_2": 0.7, "recall_at_4": 0.8, "recall_at_8": 0.9,
               "map_at_r": 0.3, "num_queries": 12, "num_classes": 3}
    write_metrics(str(out), metrics, [1, 2, 4, 8])
    return str(out)


def _dataset_dir(tmp_path: Path) -> str:
    out = tmp_path / "dataset"
    records = [ManifestRecord(uri=f"/img/{i}.png", labels=[i % 3], source=f"train.txt:{i + 1}") for i in range(6)]
    summary = DatasetSummary(split="train", annotations="train.txt", data_format="ClsSourceImageList",
                             num_samples=6, num_classes=3, images_per_class={c: 2 for c in CLASSES})
    write_dataset(str(out), records, CLASSES, summary)
    return str(out)


def _quick(model_dir: str, destination: Path, **kw: object) -> PublishInput:
    """No exports: the version and crash tests are about the files and the pointer, not exporting."""
    return PublishInput(model_dir=model_dir, destination=str(destination), export_onnx=False,
                        export_torchscript=False, **kw)


def _latest(destination: Path) -> dict:
    return json.loads((destination / LATEST).read_text())


def test_publish_exports_reload_and_reproduce_eager(model_dir: str, tmp_path: Path) -> None:
    import onnxruntime as ort
    from safetensors.torch import load_file

    dest = tmp_path / "published"
    out = publish_model(PublishInput(model_dir=model_dir, metrics_dir=_metrics_dir(tmp_path, 0.62),
                                     dataset_dir=_dataset_dir(tmp_path), destination=str(dest),
                                     min_recall_at_1=0.5))
    assert out.published and out.version == 1 and out.version_dir == str(dest / "v1")
    v1 = dest / "v1"
    names = {p.name for p in v1.iterdir()}
    assert {"model.safetensors", "model.ts", "model.onnx", "classes.txt", "config.json",
            "model_card.json", "MODEL_CARD.md"} <= names
    assert _latest(dest)["version"] == 1 and _latest(dest)["path"] == "v1"
    assert resolve_published(str(dest)) == str(v1)

    eager, _ = load_embedding_model(model_dir)
    reloaded, cfg = load_embedding_model(str(v1))  # a version folder loads like a model folder
    assert cfg.config_hash() == json.loads((v1 / "config.json").read_text())["config_hash"]
    weights = load_file(str(v1 / "model.safetensors"))
    assert weights.keys() == eager.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in eager.state_dict().items())
    scripted = torch.jit.load(str(v1 / "model.ts"))
    session = ort.InferenceSession(str(v1 / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # sizes the export check did not use
        x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            want = eager(x).numpy()
            assert np.abs(reloaded(x).numpy() - want).max() == 0
            assert np.abs(scripted(x).numpy() - want).max() <= 1e-5
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (batch, 16)
        assert np.abs(got - want).max() <= 1e-5
    assert np.std(want, axis=0).max() > 1e-3  # the inputs really produce different embeddings

    card = json.loads((v1 / "model_card.json").read_text())
    assert card["version"] == 1 and card["config_hash"] == cfg.config_hash()
    assert card["metrics"]["recall_at_1"] == 0.62
    assert card["data"]["num_samples"] == 6 and card["usage"]["instance_minutes"] == 3
    assert card["num_classes"] == 3 and card["config"]["model"]["backbone"] == "resnet18"
    assert set(card["export_check"]["max_abs_diff"]) == {"torchscript", "onnx"}
    import hashlib
    for name, info in card["files"].items():
        assert hashlib.sha256((v1 / name).read_bytes()).hexdigest() == info["sha256"], name
    md = (v1 / "MODEL_CARD.md").read_text()
    assert "resnet18" in md and "0.6200" in md and cfg.config_hash() in md


def test_versions_increment_and_latest_follows(model_dir: str, tmp_path: Path) -> None:
    dest = tmp_path / "published"
    first = publish_model(_quick(model_dir, dest))
    second = publish_model(_quick(model_dir, dest, metrics_dir=_metrics_dir(tmp_path, 0.7)))  # re-evaluated
    assert (first.version, second.version) == (1, 2)
    assert existing_versions(str(dest)) == [1, 2]
    assert _latest(dest)["version"] == 2
    assert resolve_published(str(dest)) == str(dest / "v2")
    assert (dest / "v1" / "model.safetensors").read_bytes() == (dest / "v2" / "model.safetensors").read_bytes()


def test_gate_refusal_writes_nothing(model_dir: str, tmp_path: Path) -> None:
    dest = tmp_path / "published"
    out = publish_model(_quick(model_dir, dest, metrics_dir=_metrics_dir(tmp_path, 0.41), min_recall_at_1=0.5))
    assert not out.published and out.version is None and out.version_dir is None
    assert out.reason == "Recall@1 0.41 is below the gate 0.50"
    assert not dest.exists()


def test_publishing_the_same_model_again_returns_its_version_and_leaves_latest(model_dir: str, tmp_path: Path) -> None:
    dest = tmp_path / "published"
    first = publish_model(_quick(model_dir, dest, metrics_dir=_metrics_dir(tmp_path, 0.6)))
    other = publish_model(_quick(model_dir, dest, metrics_dir=_metrics_dir(tmp_path, 0.7)))
    pointer = (dest / LATEST).read_bytes()
    mtime = (dest / LATEST).stat().st_mtime_ns
    again = publish_model(_quick(model_dir, dest, metrics_dir=_metrics_dir(tmp_path, 0.6)))  # a retried task
    assert (first.version, other.version, again.version) == (1, 2, 1)
    assert again.published and again.version_dir == str(dest / "v1") and again.reason == "already published as v1"
    assert existing_versions(str(dest)) == [1, 2]  # nothing new reserved or uploaded
    assert (dest / LATEST).read_bytes() == pointer and (dest / LATEST).stat().st_mtime_ns == mtime


def test_gate_close_call_shows_enough_digits(model_dir: str, tmp_path: Path) -> None:
    out = publish_model(_quick(model_dir, tmp_path / "d", metrics_dir=_metrics_dir(tmp_path, 0.4999), min_recall_at_1=0.5))
    assert out.reason == "Recall@1 0.4999 is below the gate 0.5000"


def test_gate_without_metrics_is_an_error(model_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs metrics_dir"):
        publish_model(_quick(model_dir, tmp_path / "d", min_recall_at_1=0.3))


def test_crash_before_latest_leaves_previous_version(model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "published"
    publish_model(_quick(model_dir, dest))
    real_write = storage.write_text

    def crash_on_latest(url: str, text: str) -> None:
        if url.endswith("/" + LATEST):
            raise OSError("simulated crash: the process died before writing latest")
        real_write(url, text)

    monkeypatch.setattr(storage, "write_text", crash_on_latest)
    newer = _metrics_dir(tmp_path, 0.7)  # a re-evaluated model: a new version
    with pytest.raises(OSError, match="simulated crash"):
        publish_model(_quick(model_dir, dest, metrics_dir=newer))
    assert (dest / "v2" / "model.safetensors").exists()  # the upload had finished
    assert _latest(dest)["version"] == 1
    assert resolve_published(str(dest)) == str(dest / "v1")

    monkeypatch.setattr(storage, "write_text", real_write)
    again = publish_model(_quick(model_dir, dest, metrics_dir=newer))  # the retried task finds its v2, finishes
    assert again.version == 2 and _latest(dest)["version"] == 2
    assert existing_versions(str(dest)) == [1, 2]


def test_racing_publishes_get_distinct_versions(model_dir: str, tmp_path: Path) -> None:
    dest = tmp_path / "published"
    results, errors = [], []

    metrics = [_metrics_dir(tmp_path, 0.6 + i / 100) for i in range(4)]  # four different models' publishes

    def run(i: int) -> None:
        try:
            results.append(publish_model(_quick(model_dir, dest, metrics_dir=metrics[i])).version)
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [1, 2, 3, 4]
    pointer = _latest(dest)  # valid JSON naming a complete version
    assert pointer["version"] in results
    assert (dest / pointer["path"] / "model_card.json").exists()


def test_reserve_version_is_exclusive(tmp_path: Path) -> None:
    dest = str(tmp_path / "d")
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(reserve_version(dest))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 9))


def test_resolve_published_without_latest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing published"):
        resolve_published(str(tmp_path / "empty"))


class _Tiny(nn.Module):
    """A few-layer network: the export check is about the check, not about timm."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.fc(self.conv(x).mean(dim=(2, 3))), dim=1)


def test_export_check_rejects_an_export_of_other_weights(tmp_path: Path) -> None:
    export_torchscript(_Tiny(seed=1).eval(), 8, tmp_path / "model.ts")
    assert check_exports(_Tiny(seed=1).eval(), tmp_path, 8)["torchscript"] <= 1e-5
    with pytest.raises(PublishError, match="torchscript differs"):
        check_exports(_Tiny(seed=2).eval(), tmp_path, 8)


def test_export_check_rejects_a_fixed_batch_onnx(tmp_path: Path) -> None:
    model = _Tiny(seed=1).eval()
    export_onnx(model, 8, tmp_path / "model.onnx")
    assert check_exports(model, tmp_path, 8)["onnx"] <= 1e-5
    # the same export without a dynamic batch dimension: the batch of 3 must fail
    torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), str(tmp_path / "model.onnx"), dynamo=True,
                      external_data=False, input_names=["images"], output_names=["embeddings"])
    with pytest.raises(PublishError, match="onnx"):
        check_exports(model, tmp_path, 8)


def test_publish_to_oss_and_load_back(model_dir: str, oss_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dest = oss_server.url("models/emb")
    first = publish_model(_quick(model_dir, dest, metrics_dir=_metrics_dir(tmp_path, 0.9), min_recall_at_1=0.5))
    second = publish_model(_quick(model_dir, dest))
    assert (first.version, second.version) == (1, 2)
    assert second.version_dir == f"{dest}/v2"
    keys = set(oss_server.keys())
    assert {"models/emb/latest", "models/emb/v1/model.safetensors", "models/emb/v2/model_card.json"} <= keys
    assert json.loads(storage.read_text(f"{dest}/latest"))["version"] == 2
    assert resolve_published(dest) == f"{dest}/v2"
    model, cfg = load_embedding_model(resolve_published(dest))
    eager, _ = load_embedding_model(model_dir)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.inference_mode():
        assert torch.equal(model(x), eager(x))


def test_published_files_follow_the_umask_and_other_users_can_read_them(model_dir: str) -> None:
    """Under umask 022 every published file is 0644 and a process running as `nobody` reads it."""
    import os
    import shutil
    import stat
    import subprocess
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("reading as another user needs root (to switch to nobody)")
    old = os.umask(0o022)
    # pytest's tmp_path is 0700: publish below a folder other users can traverse
    root = Path(tempfile.mkdtemp(prefix="imlt-umask-"))
    try:
        root.chmod(0o755)
        dest = root / "published"
        out = publish_model(_quick(model_dir, dest))
        assert out.published
        files = sorted(p for p in dest.rglob("*") if p.is_file())
        assert {p.name for p in files} >= {"latest", "model.safetensors", "config.json", "model_card.json", ".reserved"}
        modes = {str(p.relative_to(dest)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
        assert set(modes.values()) == {"0o644"}, modes
        try:
            ran = subprocess.run(["cat", *map(str, files)], capture_output=True, user=65534, group=65534, timeout=60)
        except PermissionError as e:
            pytest.skip(f"cannot switch to nobody here: {e}")
        assert ran.returncode == 0, ran.stderr.decode()
        assert len(ran.stdout) == sum(p.stat().st_size for p in files)
    finally:
        os.umask(old)
        shutil.rmtree(root, ignore_errors=True)
