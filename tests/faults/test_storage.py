"""Case 5: OSS faults under real runs: wrong credentials, an unreachable endpoint, connections
reset mid-read, and multipart uploads that fail or whose process is killed.

The OSS side is tests/support/oss_server.py (the oss2 client is real); faults are injected there
(`fail_next`, `reset_next`) or by pointing at a closed port.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.oss_server import OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET
from tests.support.cli import ckpt_dir, imlt, imlt_cmd, run_imlt, subprocess_env, train_args
from tests.support.images import png_bytes
from imlt.trainer import storage


def put_small_set(oss_server, n: int = 4) -> str:
    """Images and an annotation file on the test server; returns the annotation URL."""
    lines = []
    for i in range(n):
        storage.write_bytes(oss_server.url(f"set/img/{i}.png"), png_bytes((60 * i, 90, 200), seed=i))
        lines.append(f"img/{i}.png {'cat' if i % 2 else 'dog'}")
    storage.write_text(oss_server.url("set/ann.txt"), "\n".join(lines) + "\n")
    oss_server.calls.clear()
    return oss_server.url("set/ann.txt")


def test_wrong_credentials_fail_fast_naming_the_bucket_not_the_keys(
    oss_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ann = put_small_set(oss_server)
    wrong_secret = "Wr0ngSecretValue-9f8e7d"
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", wrong_secret)
    caplog.set_level(logging.DEBUG)  # oss2 logs request headers at DEBUG: they must be scrubbed too
    start = time.monotonic()
    ran = imlt("read-data", "--annotations", ann, "--output-dir", tmp_path / "ds")
    assert ran.exit_code == 1 and ran.exception is None, ran.output
    assert time.monotonic() - start < 5
    assert len(oss_server.calls) == 1, oss_server.calls  # a 403 is not retried
    assert f"{ann}: access denied to bucket 'test-bucket' (403 SignatureDoesNotMatch" in ran.output, ran.output
    assert "check OSS_ACCESS_KEY_ID/OSS_ACCESS_KEY_SECRET" in ran.output
    everything = ran.output + caplog.text
    assert any(r.name.startswith("oss2") for r in caplog.records)  # oss2 did log the exchange
    for value in (wrong_secret, OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET):
        assert value not in everything
    assert not (tmp_path / "ds").exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


_RETRY = re.compile(r"(\w+) failed \((\w+/\w+)\), retry (\d) of (\d) in ([\d.]+)s")


def test_unreachable_endpoint_is_retried_with_backoff_then_fails_clearly(
    oss_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("OSS_ENDPOINT", endpoint)
    caplog.set_level(logging.WARNING, logger="imlt.trainer.storage")
    ann = oss_server.url("set/ann.txt")
    ran = imlt("read-data", "--annotations", ann, "--output-dir", tmp_path / "ds")
    assert ran.exit_code == 1, ran.output
    attempts = storage.oss.RETRY_ATTEMPTS
    assert f"{ann}: cannot reach OSS endpoint {endpoint} (ConnectionError) after {attempts} attempts" in ran.output, ran.output
    retries = [_RETRY.search(r.getMessage()) for r in caplog.records if _RETRY.search(r.getMessage())]
    assert [int(m.group(3)) for m in retries] == list(range(1, attempts))
    for m in retries:  # exponential backoff with jitter: base * 2^(n-1) * [0.5, 1]
        n, delay = int(m.group(3)), float(m.group(5))
        full = min(storage.oss.RETRY_MAX_DELAY, storage.oss.RETRY_BASE_DELAY * 2 ** (n - 1))
        assert full * 0.5 - 0.01 <= delay <= full + 0.01, (n, delay)


def test_connection_resets_mid_read_are_retried(oss_server, tmp_path: Path) -> None:
    ann = put_small_set(oss_server)
    assert imlt("read-data", "--annotations", ann, "--output-dir", oss_server.url("ds")).exit_code == 0
    oss_server.calls.clear()
    oss_server.reset_next(2, op="GetObject", key="set/img/1.png")  # two cut bodies, then a whole one
    ran = imlt("validate", "--dataset-dir", oss_server.url("ds"), "--output-dir", tmp_path / "val", "--workers", "2")
    assert ran.exit_code == 0, ran.output
    assert sum(1 for c in oss_server.calls if c.op == "GetObject" and c.key == "set/img/1.png") == 3


def test_persistent_resets_fail_clearly_naming_the_image_and_its_line(
    oss_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ann = put_small_set(oss_server)
    assert imlt("read-data", "--annotations", ann, "--output-dir", oss_server.url("ds")).exit_code == 0
    monkeypatch.setattr(storage.oss, "RETRY_BASE_DELAY", 0.02)  # a module tunable; keeps the test short
    oss_server.reset_next(1000, op="GetObject", key="set/img/2.png")
    ran = imlt("validate", "--dataset-dir", oss_server.url("ds"), "--output-dir", tmp_path / "val", "--workers", "2")
    assert ran.exit_code == 1, ran.output
    image = oss_server.url("set/img/2.png")
    assert f"{ann}:3: cannot read image: StorageError: {image}: connection to {oss_server.endpoint} failed" in ran.output, ran.output
    assert f"after {storage.oss.RETRY_ATTEMPTS} attempts" in ran.output


def big_png(seed: int) -> bytes:
    """~400 KB of PNG noise: above the lowered multipart threshold below."""
    rng = np.random.default_rng(seed)
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (370, 370, 3), dtype=np.uint8)).save(buf, "PNG")
    assert len(buf.getvalue()) > 350 * 1024
    return buf.getvalue()


def test_failed_multipart_upload_is_aborted_and_leaves_no_object(
    oss_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    ann = put_small_set(oss_server)
    storage.write_bytes(oss_server.url("set/img/0.png"), big_png(0))
    oss_server.calls.clear()
    monkeypatch.setattr(storage.oss, "MULTIPART_THRESHOLD", 300 * 1024)
    monkeypatch.setattr(storage.oss, "PART_SIZE", 100 * 1024)
    monkeypatch.setattr(storage.oss, "RETRY_BASE_DELAY", 0.02)
    oss_server.fail_next(1000, op="UploadPart", status=503, code="ServiceUnavailable")
    ran = imlt("read-data", "--annotations", ann, "--output-dir", oss_server.url("ds"), "--cache-images")
    assert ran.exit_code == 1, ran.output
    assert f"{ann}:1: cannot copy image {oss_server.url('set/img/0.png')}" in ran.output
    assert "OSS server error (503 ServiceUnavailable) after 4 attempts" in ran.output
    assert oss_server.count("AbortMultipartUpload") == 1 and oss_server.uploads == {}
    assert not [k for k in oss_server.keys() if k.startswith("ds/")]  # no object, no half cache, no manifest


_SLOW_MULTIPART = """
from imlt.trainer import storage
storage.oss.MULTIPART_THRESHOLD, storage.oss.PART_SIZE, storage.oss.RETRY_BASE_DELAY = 300 * 1024, 100 * 1024, 2.0
"""


def test_killed_multipart_upload_leaves_no_visible_object(oss_server, tmp_path: Path) -> None:
    ann = put_small_set(oss_server, n=2)
    storage.write_bytes(oss_server.url("set/img/0.png"), big_png(0))
    oss_server.fail_next(1000, op="UploadPart", status=503, code="ServiceUnavailable")  # the upload stalls in retries
    env = subprocess_env(OSS_ENDPOINT=oss_server.endpoint, OSS_ACCESS_KEY_ID=OSS_TEST_ACCESS_KEY_ID,
                         OSS_ACCESS_KEY_SECRET=OSS_TEST_ACCESS_KEY_SECRET)
    child = subprocess.Popen(imlt_cmd("read-data", "--annotations", ann, "--output-dir", oss_server.url("ds"),
                                      "--cache-images", prelude=_SLOW_MULTIPART),
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while oss_server.count("UploadPart") == 0:
            assert child.poll() is None, "read-data ended before uploading a part"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    from imlt.trainer.data.reader import cache_name

    assert len(oss_server.uploads) == 1  # started, never completed: its parts are not an object
    big = f"ds/images/{cache_name(oss_server.url('set/img/0.png'))}"
    assert big not in oss_server.keys() and not storage.exists(oss_server.url(big))
    assert oss_server.url(big) not in storage.list_files(oss_server.url("ds"))
    assert not storage.exists(oss_server.url("ds/manifest.jsonl"))


def test_endpoint_dying_mid_read_stops_the_step_with_one_error_naming_it(
    oss_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ann = put_small_set(oss_server, n=40)
    assert imlt("read-data", "--annotations", ann, "--output-dir", tmp_path / "ds").exit_code == 0
    endpoint = oss_server.endpoint

    oss_server.calls.clear()
    oss_server.die_after(5)  # the endpoint dies while validate is reading images
    caplog.set_level(logging.WARNING, logger="imlt.trainer.storage")
    ran = imlt("validate", "--dataset-dir", tmp_path / "ds", "--output-dir", tmp_path / "val", "--workers", "2")
    assert ran.exit_code == 1, ran.output
    assert ran.output.count(f"OSS endpoint {endpoint} is unreachable") == 1, ran.output
    assert "cannot read image" not in ran.output  # not one error per image
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) <= storage.oss.CIRCUIT_FAILURES  # instead of 3 for each of ~35 images (about a minute)
    assert not (tmp_path / "val" / "validation.json").exists()


def _itag_line(source: str, label: str) -> str:
    return json.dumps({"data": {"source": source},
                       "label-1": {"results": [{"questionId": "1", "data": label, "type": "survey/value"}]}})


def test_itag_endpoint_style_sources_are_read_as_bucket_and_key(
    oss_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_small_set(oss_server)
    monkeypatch.setenv("OSS_REGION", "cn-test")  # the test server stands for oss-cn-test.aliyuncs.com
    host = "test-bucket.oss-cn-test.aliyuncs.com"
    lines = [_itag_line(f"oss://{host}/set/img/{i}.png", "cat" if i % 2 else "dog") for i in range(4)]
    storage.write_text(oss_server.url("set/m.jsonl"), "\n".join(lines) + "\n")
    ran = imlt("read-data", "--annotations", oss_server.url("set/m.jsonl"), "--data-format", "ClsSourceItag",
               "--output-dir", tmp_path / "ds")
    assert ran.exit_code == 0, ran.output
    manifest = (tmp_path / "ds" / "manifest.jsonl").read_text()
    assert oss_server.url("set/img/0.png") in manifest and host not in manifest
    ran = imlt("validate", "--dataset-dir", tmp_path / "ds", "--output-dir", tmp_path / "val")
    assert ran.exit_code == 0, ran.output  # the images are really read through the configured endpoint

    lines[2] = _itag_line("oss://test-bucket.oss-cn-beijing.aliyuncs.com/set/img/2.png", "dog")
    storage.write_text(oss_server.url("set/m.jsonl"), "\n".join(lines) + "\n")
    ran = imlt("read-data", "--annotations", oss_server.url("set/m.jsonl"), "--data-format", "ClsSourceItag",
               "--output-dir", tmp_path / "ds2")
    assert ran.exit_code == 1, ran.output
    assert (f"{oss_server.url('set/m.jsonl')}:3: 'oss://test-bucket.oss-cn-beijing.aliyuncs.com/set/img/2.png' "
            f"names OSS endpoint oss-cn-beijing.aliyuncs.com (region cn-beijing) but the configured endpoint is "
            f"{oss_server.endpoint} (region cn-test)") in ran.output, ran.output
    assert not (tmp_path / "ds2").exists()


_SHORT_LEASE = "from imlt.trainer.storage import lease\nlease.LEASE_SECONDS = 10.0"  # renewed every 3.3 s: slack for a loaded machine


@pytest.mark.slow
def test_second_training_attempt_on_one_folder_stops_naming_the_holder_and_a_dead_holder_expires(
    dataset: str, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    lease = ckpt_dir(out) / ".lease"  # the run's lease lives with its checkpoints, not in the model folder
    cmd = imlt_cmd(*train_args(dataset, out, 500), prelude=_SHORT_LEASE)
    first = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (lease / "00000001.json").exists():
            assert first.poll() is None, "the first attempt ended before taking the lease"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # a retry while the first attempt still trains: stops at once, naming the holder
        second = run_imlt(*train_args(dataset, out, 500), prelude=_SHORT_LEASE, timeout=120)
        assert second.exit_code == 1, second.output
        assert f"{ckpt_dir(out)}: in use by {socket.gethostname()}:{first.pid} (training since" in second.output, second.output
        assert "another attempt is still writing this folder" in second.output
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (lease / "00000001.json").exists()  # a killed holder cannot release ...

    # ... but its lease expires: here at once, as its process is gone from this machine (elsewhere after
    # the lease's 60 s); the next attempt takes it over (and stops at its time limit)
    third = run_imlt(*train_args(dataset, out, 500), timeout=300, env=subprocess_env(IMLT_MAX_SECONDS="2"))
    assert third.exit_code == 0, third.output
    assert "took over the expired lease" in third.output, third.output
    assert not lease.exists()  # released at the end
