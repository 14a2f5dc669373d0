"""Case 6: publishing under faults: a publisher killed before it moves `latest`, two publishers
racing to one destination, a retried publish, a lost answer to the version claim, and a model
below the recall gate.

The destination is on the OSS test server (or a local folder): a consumer only ever follows
DEST/latest, so what matters is that `latest` always names a complete version.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.oss_server import OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET
from tests.support.cli import imlt, imlt_cmd, subprocess_env
from imlt.trainer import storage

VERSION_FILES = {".reserved", "MODEL_CARD.md", "classes.txt", "config.json", "model.onnx", "model.safetensors",
                 "model.ts", "model_card.json"}


def oss_env(oss_server) -> dict[str, str]:
    return subprocess_env(OSS_ENDPOINT=oss_server.endpoint, OSS_ACCESS_KEY_ID=OSS_TEST_ACCESS_KEY_ID,
                          OSS_ACCESS_KEY_SECRET=OSS_TEST_ACCESS_KEY_SECRET)


def reevaluated(metrics_dir: str, out: Path, recall_at_1: float) -> str:
    """A copy of an evaluate output with another Recall@1: publishing it is a new version, not a retry."""
    from imlt.trainer.evaluate import read_metrics, write_metrics

    metrics = {**read_metrics(metrics_dir), "recall_at_1": recall_at_1}
    write_metrics(str(out), metrics, [1, 2, 4, 8])
    return str(out)


def latest(destination: str) -> dict:
    return json.loads(storage.read_text(storage.join(destination, "latest")))


def assert_complete_version(destination: str, version: int) -> None:
    """Every file of vN is there and matches the sha256 its model card records."""
    folder = storage.join(destination, f"v{version}")
    names = {url.rsplit("/", 1)[1] for url in storage.list_files(folder)}
    assert names == VERSION_FILES, names
    card = json.loads(storage.read_text(storage.join(folder, "model_card.json")))
    for name, meta in card["files"].items():
        if name in ("model_card.json", "MODEL_CARD.md"):
            continue  # written after the hashes were taken
        assert hashlib.sha256(storage.read_bytes(storage.join(folder, name))).hexdigest() == meta["sha256"], name


@pytest.mark.slow
def test_publisher_killed_before_latest_moves_leaves_the_previous_version_served(
    oss_server, trained, tmp_path: Path
) -> None:
    model_dir, first_metrics = trained
    dest = oss_server.url("models/products")
    first = imlt("publish", "--model-dir", model_dir, "--metrics-dir", first_metrics, "--destination", dest)
    assert first.exit_code == 0, first.output
    assert latest(dest)["version"] == 1
    metrics_dir = reevaluated(first_metrics, tmp_path / "metrics", 0.99)  # the next model to publish

    # The pointer write fails (the server answers 503) and is retried with backoff; the publisher
    # is killed in that window: all of v2 is uploaded, `latest` is not yet moved.
    oss_server.calls.clear()
    oss_server.fail_next(1000, op="PutObject", status=503, code="ServiceUnavailable", key="models/products/latest")
    child = subprocess.Popen(imlt_cmd("publish", "--model-dir", model_dir, "--metrics-dir", metrics_dir,
                                      "--destination", dest), env=oss_env(oss_server),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(c.op == "PutObject" and c.key == "models/products/latest" for c in oss_server.calls):
            assert child.poll() is None, child.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the publisher never tried to move latest"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    oss_server.clear_faults()

    assert latest(dest)["version"] == 1  # consumers still get v1 ...
    assert_complete_version(dest, 1)  # ... complete and intact
    from imlt.trainer.model import load_embedding_model
    from imlt.trainer.publish import resolve_published

    assert resolve_published(dest) == storage.join(dest, "v1")
    load_embedding_model(resolve_published(dest))
    assert_complete_version(dest, 2)  # uploaded in full, but never pointed at

    again = imlt("publish", "--model-dir", model_dir, "--metrics-dir", metrics_dir, "--destination", dest)
    assert again.exit_code == 0, again.output  # the retried task recognises its v2 and moves latest
    assert again.json()["version"] == 2 and latest(dest)["version"] == 2
    assert sorted({k.split("/")[2] for k in oss_server.keys() if k.startswith("models/products/v")}) == ["v1", "v2"]


@pytest.mark.slow
def test_two_concurrent_publishers_never_corrupt_latest(oss_server, trained, tmp_path: Path) -> None:
    # On OSS (version claims via x-oss-forbid-overwrite); the local O_EXCL claim is raced by
    # threads in tests/test_publish.py::test_racing_publishes_get_distinct_versions.
    model_dir, metrics_dir = trained
    dest, env = oss_server.url("models/race"), oss_env(oss_server)

    seen: list[str] = []  # every `latest` a consumer read during the race
    stop = threading.Event()

    def consumer() -> None:
        while not stop.is_set():
            try:
                text = storage.read_text(storage.join(dest, "latest"))
            except FileNotFoundError:
                text = None
            if text is not None:
                seen.append(text)
            time.sleep(0.005)

    reader = threading.Thread(target=consumer, daemon=True)
    reader.start()
    models = [metrics_dir, reevaluated(metrics_dir, tmp_path / "metrics", 0.99)]  # two models, not one retried
    cmds = [imlt_cmd("publish", "--model-dir", model_dir, "--metrics-dir", m, "--destination", dest) for m in models]
    children = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in cmds]
    outputs = [c.communicate(timeout=600)[0] for c in children]
    stop.set()
    reader.join()

    assert [c.returncode for c in children] == [0, 0], outputs
    versions = sorted(json.loads(o[o.index("{"):])["version"] for o in outputs)
    assert versions == [1, 2]  # distinct numbers, none lost
    for text in seen:  # never a torn or half-written pointer
        pointer = json.loads(text)
        assert pointer["path"] == f"v{pointer['version']}" and pointer["version"] in versions
    final = latest(dest)
    assert final["version"] in versions
    for v in versions:
        assert_complete_version(dest, v)


def test_below_the_gate_writes_nothing(oss_server, trained, tmp_path: Path) -> None:
    from imlt.trainer.evaluate import write_metrics

    model_dir, _ = trained
    metrics = str(tmp_path / "metrics")
    write_metrics(metrics, {"recall_at_1": 0.41, "recall_at_2": 0.5, "recall_at_4": 0.6, "recall_at_8": 0.7,
                            "map_at_r": 0.2, "num_queries": 24, "num_classes": 4}, [1, 2, 4, 8])
    oss_server.calls.clear()
    ran = imlt("publish", "--model-dir", model_dir, "--metrics-dir", metrics, "--destination",
               oss_server.url("models/gated"), "--min-recall-at-1", "0.5")
    assert ran.exit_code == 1, ran.output
    assert '"published": false' in ran.output and "Recall@1 0.41 is below the gate 0.50" in ran.output
    writes = [c for c in oss_server.calls if c.op not in ("GetObject", "HeadObject", "ListObjects")]
    assert writes == [] and oss_server.keys() == []


def quick_publish(model_dir: str, metrics_dir: str, dest: str):  # type: ignore[no-untyped-def]
    """The publish step without exports (the CLI has no flag for that): these cases are about versions."""
    from imlt.trainer.publish import publish_model
    from imlt.trainer.steps import PublishInput

    return publish_model(PublishInput(model_dir=model_dir, metrics_dir=metrics_dir, destination=dest,
                                      export_onnx=False, export_torchscript=False))


def test_publishing_the_same_model_again_returns_its_version_and_leaves_latest(oss_server, trained) -> None:
    model_dir, metrics_dir = trained
    dest = oss_server.url("models/retried")
    assert quick_publish(model_dir, metrics_dir, dest).version == 1
    objects = oss_server.objects()
    oss_server.calls.clear()
    again = quick_publish(model_dir, metrics_dir, dest)  # a retried task: same model, metrics and destination
    assert again.published and again.version == 1 and again.reason == "already published as v1"
    writes = [c for c in oss_server.calls if c.op not in ("GetObject", "HeadObject", "ListObjects")]
    assert writes == [] and oss_server.objects() == objects  # nothing reserved, uploaded or moved


def test_version_claim_whose_answer_was_lost_is_recognised(oss_server, trained) -> None:
    model_dir, metrics_dir = trained
    dest = oss_server.url("models/lost")
    # OSS stores v1/.reserved but the connection drops before the answer: the retry gets 409
    oss_server.reset_next(1, op="PutObject", key="models/lost/v1/.reserved")
    out = quick_publish(model_dir, metrics_dir, dest)
    assert out.version == 1 and latest(dest)["version"] == 1
    assert sum(1 for c in oss_server.calls if c.op == "PutObject" and c.key.endswith("v1/.reserved")) == 2
    assert not [k for k in oss_server.keys() if k.startswith("models/lost/v2")]  # no orphan claim
