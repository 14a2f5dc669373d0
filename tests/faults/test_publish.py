"""Case 6: publishing under faults: a publisher killed before it moves `latest`, two publishers
racing to one destination, and a model below the recall gate.

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
def test_publisher_killed_before_latest_moves_leaves_the_previous_version_served(oss_server, trained) -> None:
    model_dir, metrics_dir = trained
    dest = oss_server.url("models/products")
    first = imlt("publish", "--model-dir", model_dir, "--metrics-dir", metrics_dir, "--destination", dest)
    assert first.exit_code == 0, first.output
    assert latest(dest)["version"] == 1

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
    assert again.exit_code == 0, again.output
    assert latest(dest)["version"] == 3  # v2 stays orphaned; a number is never reused


@pytest.mark.slow
def test_two_concurrent_publishers_never_corrupt_latest(oss_server, trained) -> None:
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
    cmd = imlt_cmd("publish", "--model-dir", model_dir, "--metrics-dir", metrics_dir, "--destination", dest)
    children = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
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
