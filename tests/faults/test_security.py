"""Case 7: no one let in. Credentials never leave the process (grep every output of full runs
with known fake credentials), and no file the trainer loads can run code.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import (
    BACKBONE, IMAGE_SIZE, REPO, checkpoints, ckpt_dir, imlt, imlt_cmd, subprocess_env, train_args,
)
from tests.support.images import write_colour_images
from tests.support.oss_server import OssTestServer

# Distinctive values: any of them (or a long piece of one) in an output is a leak.
FAKE_KEY_ID = "LTAI5tFaKeKeyId7Qx93Hd2"
FAKE_SECRET = "fAkEsEcReT0nLy4tEsTs9ZmWq2Lk8Rv"
FAKE_TOKEN = "CAIS-fake-sts-token-Vq8mN3xB7cK1pR6tY0wE"
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN)


def leaks(blob: bytes) -> list[str]:
    """Which credential values (whole, or their distinctive second half) a blob holds."""
    found = []
    for secret in SECRETS:
        for piece in (secret, secret[len(secret) // 2:]):
            if piece.encode() in blob:
                found.append(piece)
    return found


@pytest.fixture
def sts_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[OssTestServer]:
    """An OSS test server that only accepts the fake STS credentials above (from the environment)."""
    from imlt.trainer import storage

    with OssTestServer(FAKE_KEY_ID, FAKE_SECRET, security_token=FAKE_TOKEN) as server:
        server.create_bucket("secure-bucket")
        server.default_bucket = "secure-bucket"
        for name, value in (("OSS_ENDPOINT", server.endpoint), ("OSS_ACCESS_KEY_ID", FAKE_KEY_ID),
                            ("OSS_ACCESS_KEY_SECRET", FAKE_SECRET), ("OSS_SESSION_TOKEN", FAKE_TOKEN)):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("OSS_REGION", raising=False)
        storage.configure_oss(None)
        storage.reset_clients()
        try:
            yield server
        finally:
            storage.reset_clients()


def upload_colour_split(server: OssTestServer, local: Path, split: str) -> str:
    from imlt.trainer import storage

    lines = write_colour_images(local / split, per_class=4)
    storage.upload_dir(local / split, server.url(f"data/{split}"))
    ann = server.url(f"data/{split}.txt")
    storage.write_text(ann, "\n".join(f"{split}/{line}" for line in lines) + "\n")
    return ann


def all_objects(server: OssTestServer) -> dict[str, bytes]:
    return server.objects()


def all_local_files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


_DEBUG_LOGGING = "import logging\nlogging.basicConfig(level=logging.DEBUG)"


@pytest.mark.slow
def test_full_run_on_oss_leaks_no_credential(sts_server: OssTestServer, tmp_path: Path) -> None:
    from imlt.trainer import storage

    train_ann = upload_colour_split(sts_server, tmp_path / "src", "train")
    val_ann = upload_colour_split(sts_server, tmp_path / "src", "val")
    run_file = sts_server.url("runs/run.yaml")  # the run file itself is read from OSS
    storage.write_text(run_file, f"""
workdir: {sts_server.url("work")}
publish: {{destination: {sts_server.url("published")}}}
data: {{train_annotations: {train_ann}, val_annotations: {val_ann}, image_size: {IMAGE_SIZE}, reader_threads: 0}}
model: {{backbone: {BACKBONE}, feature_dim: 16}}
optim: {{lr: 0.05}}
train: {{batch_size: 8, epochs: 1, device: cpu}}
""")
    work = tmp_path / "cwd"
    work.mkdir()
    (tmp_path / "tmp").mkdir()  # the run's temp files land here, and are grepped too
    proc = subprocess.run(imlt_cmd("run", run_file, prelude=_DEBUG_LOGGING), cwd=work, capture_output=True,
                          env=subprocess_env(TMPDIR=str(tmp_path / "tmp")), timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log.decode(errors="replace")[-5000:]

    # the run really went through OSS with these credentials, and DEBUG logs were captured
    objects = all_objects(sts_server)
    for key in ("work/model/config.json", "work/model-checkpoints/epoch-0001.ckpt", "work/metrics/metrics.json",
                "published/latest", "published/v1/model_card.json", "published/v1/MODEL_CARD.md",
                "published/v1/config.json", "work/validation/train/report.html"):
        assert f"secure-bucket/{key}" in objects, sorted(objects)
    assert b"Authorization" in log or b"authorization" in log  # oss2 logged its request headers

    assert leaks(log) == [], "credential in the captured output"
    leaked = {name: leaks(data) for name, data in {**objects, **all_local_files(tmp_path)}.items()}
    leaked = {name: found for name, found in leaked.items() if found and not name.startswith(str(tmp_path / "src"))}
    assert leaked == {}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
def test_kfp_pipeline_on_oss_leaks_no_credential_into_artifacts(
    sts_server: OssTestServer, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from kfp import local

    from imlt.pipelines.training import training_pipeline

    train_ann = upload_colour_split(sts_server, tmp_path / "src", "train")
    val_ann = upload_colour_split(sts_server, tmp_path / "src", "val")
    root = tmp_path / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    training_pipeline(train_annotations=train_ann, val_annotations=val_ann, destination=sts_server.url("published"),
                      min_recall_at_1=0.0, backbone=BACKBONE, image_size=IMAGE_SIZE, feature_dim=16, epochs=1,
                      batch_size=8, reader_threads=0, lr=0.05, weight_decay=5e-4, max_hours=1.0, margin=0.4, scale=30.0,
                      auto_scale=False, zero_init_last=True, warmup_epochs=0,
                      pretrained="")  # the pipelines default to ImageNet weights; tests never touch the network
    out, err = capfd.readouterr()
    assert "secure-bucket/published/latest" in all_objects(sts_server)  # published through OSS
    artifacts = all_local_files(root)
    assert any(name.endswith("executor_output.json") for name in artifacts)
    assert leaks((out + err).encode()) == []
    assert {name: leaks(data) for name, data in artifacts.items() if leaks(data)} == {}
    assert {name: leaks(data) for name, data in all_objects(sts_server).items() if leaks(data)} == {}


# --- files that could run code ---------------------------------------------------------------------------


class _OpensAFile:
    """Unpickling this calls open(path, "w"): proof that a loader ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def pickle_bomb(path: Path, marker: Path, state: dict) -> None:
    import torch

    torch.save({**state, "extra": _OpensAFile(marker)}, path)
    control = path.with_suffix(".control")
    shutil.copy(path, control)  # the payload is live: an unsafe load does create the marker ...
    torch.load(control, weights_only=False)
    assert marker.exists()
    marker.unlink()  # ... and the real test below must not


def test_a_checkpoint_holding_a_pickled_object_is_refused_on_resume(dataset: str, tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert imlt(*train_args(dataset, out, 1)).exit_code == 0
    marker = tmp_path / "pwned"
    import torch

    real = torch.load(ckpt_dir(out) / "epoch-0001.ckpt", weights_only=True)
    bomb = ckpt_dir(out) / "epoch-0002.ckpt"  # the newest checkpoint: resume reads it
    pickle_bomb(bomb, marker, {**real, "epoch": 2})
    bomb.with_suffix(".control").unlink()
    ran = imlt(*train_args(dataset, out, 1))
    assert ran.exit_code == 1, ran.output
    assert f"{bomb}: not a readable checkpoint" in ran.output, ran.output
    assert "Unsupported global: GLOBAL io.open" in ran.output or "Unsupported global: GLOBAL builtins.open" in ran.output
    assert not marker.exists()


def test_a_pickle_bearing_pretrained_file_is_refused(dataset: str, tmp_path: Path) -> None:
    from imlt.trainer.config import ModelConfig
    from imlt.trainer.model import build_model

    marker = tmp_path / "pwned"
    weights = tmp_path / "pretrained.pth"
    model = build_model(ModelConfig(backbone=BACKBONE, feature_dim=16), IMAGE_SIZE)
    pickle_bomb(weights, marker, model.backbone.state_dict())
    ran = imlt(*train_args(dataset, tmp_path / "model", 1, "--pretrained", str(weights)))
    assert ran.exit_code == 1, ran.output
    assert f"{weights}: refusing to load: the file holds pickled Python objects" in ran.output, ran.output
    assert not marker.exists()
    assert checkpoints(tmp_path / "model") == []


def test_every_torch_load_in_the_product_is_weights_only() -> None:
    """A static guard: a new torch.load without weights_only=True fails here, not in production."""
    calls = []
    for path in sorted([*(REPO / "trainer").rglob("*.py"), *(REPO / "components").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert calls, "no torch.load found: the guard looks in the wrong place"
    assert [where for where, safe in calls if not safe] == []
