"""trainer.storage against local paths, memory:// (fsspec) and oss:// through the real oss2 client.

The oss:// tests talk HTTP to tests/support/oss_server.py, which checks signatures and can inject
connection resets and 5xx answers.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.support.oss_server import OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET
from tests.support.oss_server import OssTestServer, StoredObject
from imlt.trainer import storage
from imlt.trainer.storage import OssSettings, StorageError, StorageNotFoundError


@pytest.fixture(params=["local", "memory", "oss"])
def base_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A folder URL on each backend."""
    if request.param == "local":
        yield str(tmp_path / "root")
    elif request.param == "memory":
        import fsspec

        root = f"memory://imlt-test-{uuid.uuid4().hex[:8]}/root"
        yield root
        fs, path = fsspec.core.url_to_fs(root)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        server = request.getfixturevalue("oss_server")
        yield server.url("root")


# ---------------------------------------------------------------------------------------------
# Every backend
# ---------------------------------------------------------------------------------------------


def test_write_read_and_ranges(base_url: str) -> None:
    url = storage.join(base_url, "a", "b.txt")
    storage.write_text(url, "hello wörld")
    assert storage.read_text(url) == "hello wörld"
    data = "hello wörld".encode()
    for rng in [(0, 0), (2, 4), (6, 100), (len(data) - 1, len(data) - 1), (len(data), len(data) + 5), (50, 60)]:
        assert storage.read_bytes(url, rng) == data[rng[0] : rng[1] + 1], rng
    storage.write_bytes(url, b"\x00new")  # overwrite replaces the whole object
    assert storage.read_bytes(url) == b"\x00new"
    with pytest.raises(ValueError, match="byte_range"):
        storage.read_bytes(url, (3, 1))


def test_exists_list_delete(base_url: str) -> None:
    files = ["x.bin", "sub/y.bin", "sub/deeper/z.bin", "sub2/w.bin"]
    for i, rel in enumerate(files):
        storage.write_bytes(storage.join(base_url, rel), bytes([i]) * (i + 1))
    storage.write_bytes(base_url + "-sibling/q.bin", b"q")  # shares the string prefix only

    assert storage.list_files(base_url) == sorted(storage.join(base_url, f) for f in files)
    assert storage.list_files(storage.join(base_url, "sub")) == [
        storage.join(base_url, "sub/deeper/z.bin"),
        storage.join(base_url, "sub/y.bin"),
    ]
    assert storage.list_files(storage.join(base_url, "missing")) == []
    assert storage.exists(storage.join(base_url, "x.bin"))
    assert storage.exists(storage.join(base_url, "sub"))  # a folder / prefix
    assert not storage.exists(storage.join(base_url, "nope.bin"))
    assert not storage.exists(storage.join(base_url, "su"))  # not a partial name

    storage.delete(storage.join(base_url, "x.bin"))
    assert not storage.exists(storage.join(base_url, "x.bin"))
    storage.delete(storage.join(base_url, "sub"))
    assert storage.list_files(base_url) == [storage.join(base_url, "sub2/w.bin")]
    storage.delete(storage.join(base_url, "never-existed"))  # not an error
    storage.delete(base_url)
    assert storage.list_files(base_url) == []
    assert storage.read_bytes(base_url + "-sibling/q.bin") == b"q"


def test_missing_file_is_not_found(base_url: str) -> None:
    url = storage.join(base_url, "absent.txt")
    with pytest.raises(StorageNotFoundError, match="absent.txt") as info:
        storage.read_bytes(url)
    assert isinstance(info.value, FileNotFoundError)
    assert "not found" in str(info.value)


def test_upload_download_dir_round_trip(base_url: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    contents = {"a.txt": b"A", "nested/b.bin": os.urandom(1000), "nested/more/c.json": b"{}"}
    for rel, data in contents.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    storage.upload_dir(src, storage.join(base_url, "model"))
    assert storage.list_files(storage.join(base_url, "model")) == sorted(
        storage.join(base_url, "model", rel) for rel in contents
    )
    dest = storage.download_dir(storage.join(base_url, "model"), tmp_path / "dest")
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == contents


def test_read_text_rejects_non_utf8(base_url: str) -> None:
    url = storage.join(base_url, "bin.txt")
    storage.write_bytes(url, b"ok\xff\xfe")
    with pytest.raises(StorageError, match=r"bin\.txt: not UTF-8 text \(bad byte at offset 2\)"):
        storage.read_text(url)


# ---------------------------------------------------------------------------------------------
# Local specifics
# ---------------------------------------------------------------------------------------------


def test_local_atomic_write_leaves_no_temp_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), object())  # type: ignore[arg-type]  # fails mid-write
    assert target.read_bytes() == b"old"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "inside").write_text("x")
    with pytest.raises(OSError):
        storage.write_bytes(str(tmp_path / "dir"), b"new")  # os.replace onto a folder fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "out.bin"]


def test_local_listing_skips_in_progress_writes_and_accepts_file_urls(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / ".b.txt.x1y2.imlt-tmp").write_text("partial")
    assert storage.list_files(f"file://{tmp_path}") == [f"file://{tmp_path}/a.txt"]
    assert storage.read_text(f"file://{tmp_path}/a.txt") == "a"


# ---------------------------------------------------------------------------------------------
# OSS specifics
# ---------------------------------------------------------------------------------------------


def test_oss_uses_path_style_on_the_test_server(oss_server: OssTestServer) -> None:
    storage.write_text(oss_server.url("k.txt"), "v")
    assert oss_server.keys() == ["k.txt"]
    assert oss_server.calls[-1].bucket == "test-bucket"


def test_oss_listing_and_delete_paginate(oss_server: OssTestServer) -> None:
    oss_server.max_keys_cap = 2
    urls = [oss_server.url(f"data/{i:02d}/img.jpg") for i in range(7)]
    for u in urls:
        storage.write_bytes(u, b"x")
    oss_server.buckets["test-bucket"]["data/"] = StoredObject(b"", "application/x-directory")  # console folder
    before = oss_server.count("ListObjects")
    assert storage.list_files(oss_server.url("data")) == urls
    assert oss_server.count("ListObjects") - before == 4  # 8 keys (with the marker), 2 a page
    storage.delete(oss_server.url("data"))
    assert oss_server.keys() == []


def test_oss_multipart_write(oss_server: OssTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.oss, "MULTIPART_THRESHOLD", 300 * 1024)
    monkeypatch.setattr(storage.oss, "PART_SIZE", 100 * 1024)  # OSS's minimum part size
    data = os.urandom(350 * 1024)
    storage.write_bytes(oss_server.url("big.bin"), data)
    assert storage.read_bytes(oss_server.url("big.bin")) == data
    assert oss_server.count("UploadPart") == 4
    assert oss_server.count("CompleteMultipartUpload") == 1
    assert oss_server.uploads == {}


def test_oss_interrupted_multipart_leaves_no_object(oss_server: OssTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.oss, "MULTIPART_THRESHOLD", 300 * 1024)
    monkeypatch.setattr(storage.oss, "PART_SIZE", 100 * 1024)
    monkeypatch.setattr(storage.oss, "RETRY_BASE_DELAY", 0.01)
    oss_server.fail_next(1000, op="UploadPart", status=503, code="ServiceUnavailable")
    with pytest.raises(StorageError, match=r"big\.bin: OSS server error \(503 ServiceUnavailable\) after 4 attempts"):
        storage.write_bytes(oss_server.url("big.bin"), os.urandom(350 * 1024))
    assert not storage.exists(oss_server.url("big.bin"))
    assert oss_server.count("AbortMultipartUpload") == 1
    assert oss_server.uploads == {}


def test_oss_small_write_is_single_put(oss_server: OssTestServer) -> None:
    storage.write_bytes(oss_server.url("small.bin"), b"s" * 1000)
    assert oss_server.count("PutObject") == 1
    assert oss_server.count("InitiateMultipartUpload") == 0


@pytest.mark.parametrize("region", [None, "cn-test"], ids=["sig-v1", "sig-v4"])
@pytest.mark.parametrize("wrong", ["key_id", "secret"])
def test_oss_wrong_credentials_403_names_bucket_hides_credentials(
    oss_server: OssTestServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    region: str | None, wrong: str,
) -> None:
    if region:
        monkeypatch.setenv("OSS_REGION", region)
    storage.write_text(oss_server.url("a.txt"), "a")  # right credentials work on either signature
    bad_id, bad_secret = "LTAIbadKeyId0000", "badSecretValue0000"
    if wrong == "key_id":
        monkeypatch.setenv("OSS_ACCESS_KEY_ID", bad_id)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", bad_secret)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as info:
        storage.read_bytes(oss_server.url("a.txt"))
    err = info.value
    text = "".join(traceback.format_exception(err)) + repr(err) + caplog.text
    assert "oss://test-bucket/a.txt" in str(err) and "'test-bucket'" in str(err)
    assert "access denied" in str(err) and "403" in str(err)
    assert "OSS_ACCESS_KEY_ID" in str(err)
    code = "InvalidAccessKeyId" if wrong == "key_id" else "SignatureDoesNotMatch"
    assert code in str(err)
    for secret in (bad_id, bad_secret, OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET):
        assert secret not in text
    assert any(r.name.startswith("oss2") for r in caplog.records)  # oss2 did log; it was scrubbed
    assert err.__cause__ is None and err.__suppress_context__


def test_oss_credentials_never_logged_on_success(
    oss_server: OssTestServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OSS_SESSION_TOKEN", "sts-token-value-123")
    oss_server.security_token = "sts-token-value-123"
    caplog.set_level(logging.DEBUG)
    storage.write_text(oss_server.url("t.txt"), "t")
    assert storage.read_text(oss_server.url("t.txt")) == "t"
    assert "Authorization" in caplog.text or "authorization" in caplog.text  # headers were logged
    for secret in (OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET, "sts-token-value-123"):
        assert secret not in caplog.text


def test_oss_sts_token_is_sent(oss_server: OssTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    oss_server.security_token = "sts-token-value-123"
    with pytest.raises(StorageError, match="access denied"):
        storage.write_text(oss_server.url("t.txt"), "t")
    monkeypatch.setenv("OSS_SESSION_TOKEN", "sts-token-value-123")
    storage.write_text(oss_server.url("t.txt"), "t")
    assert oss_server.keys() == ["t.txt"]


def test_oss_not_found_key_and_bucket(oss_server: OssTestServer) -> None:
    with pytest.raises(StorageNotFoundError, match=r"oss://test-bucket/nope\.bin: not found \(404 NoSuchKey\)"):
        storage.read_bytes(oss_server.url("nope.bin"))
    with pytest.raises(StorageNotFoundError, match=r"bucket 'other-bucket' not found at http://127\.0\.0\.1"):
        storage.read_bytes("oss://other-bucket/x.bin")
    with pytest.raises(StorageNotFoundError, match="NoSuchBucket"):
        storage.exists("oss://other-bucket/x.bin")  # a missing bucket is a config error, not False


def test_oss_read_retries_after_connection_resets(oss_server: OssTestServer) -> None:
    data = os.urandom(4096)
    storage.write_bytes(oss_server.url("r.bin"), data)
    oss_server.reset_next(2, op="GetObject")
    assert storage.read_bytes(oss_server.url("r.bin")) == data
    assert oss_server.count("GetObject") == 3
    oss_server.reset_next(1, op="GetObject")
    assert storage.read_bytes(oss_server.url("r.bin"), (10, 2000)) == data[10:2001]


def test_oss_write_and_list_retry_after_5xx_and_dropped_connections(oss_server: OssTestServer) -> None:
    oss_server.fail_next(2, op="PutObject", status=500)
    oss_server.reset_next(1, op="PutObject")
    storage.write_bytes(oss_server.url("w.bin"), b"w")
    assert oss_server.count("PutObject") == 4
    oss_server.fail_next(1, op="ListObjects", status=503, code="ServiceUnavailable")
    oss_server.reset_next(1, op="ListObjects")
    assert storage.list_files(oss_server.url("")) == [oss_server.url("w.bin")]


@pytest.mark.parametrize("fault", ["reset", "500"])
def test_oss_persistent_failure_is_bounded_and_clear(oss_server: OssTestServer, fault: str) -> None:
    storage.write_bytes(oss_server.url("p.bin"), b"p" * 100)
    if fault == "reset":
        oss_server.reset_next(1000, op="GetObject")
    else:
        oss_server.fail_next(1000, op="GetObject", status=500)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes(oss_server.url("p.bin"))
    assert time.monotonic() - start < 10
    assert oss_server.count("GetObject") == storage.oss.RETRY_ATTEMPTS
    assert str(info.value).startswith("oss://test-bucket/p.bin: ")
    assert f"after {storage.oss.RETRY_ATTEMPTS} attempts" in str(info.value)


def test_oss_missing_endpoint_or_credentials(oss_server: OssTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OSS_ENDPOINT")
    with pytest.raises(StorageError, match="OSS_ENDPOINT"):
        storage.read_bytes(oss_server.url("x"))
    monkeypatch.setenv("OSS_ENDPOINT", oss_server.endpoint)
    monkeypatch.delenv("OSS_ACCESS_KEY_SECRET")
    with pytest.raises(StorageError, match="OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET"):
        storage.read_bytes(oss_server.url("x"))


def test_configure_oss_overrides_environment(oss_server: OssTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "wrong-id-from-env")
    monkeypatch.delenv("OSS_ENDPOINT")
    settings = OssSettings(
        endpoint=oss_server.endpoint,
        access_key_id=OSS_TEST_ACCESS_KEY_ID,
        access_key_secret=OSS_TEST_ACCESS_KEY_SECRET,
    )
    assert OSS_TEST_ACCESS_KEY_SECRET not in repr(settings) + str(settings.model_dump())
    storage.configure_oss(settings)
    storage.write_text(oss_server.url("c.txt"), "configured")
    assert storage.read_text(oss_server.url("c.txt")) == "configured"
    storage.configure_oss(settings.model_copy(update={"access_key_secret": SecretStr("not-the-secret")}))
    with pytest.raises(StorageError, match=r"access denied .* check the credentials given to configure_oss\(\)"):
        storage.read_text(oss_server.url("c.txt"))
    storage.configure_oss(None)  # back to the (wrong) environment
    with pytest.raises(StorageError, match="OSS_ENDPOINT"):
        storage.read_text(oss_server.url("c.txt"))


def test_oss_settings_from_env_and_derivations() -> None:
    s = OssSettings.from_env(
        {"OSS_ENDPOINT": "oss-cn-hangzhou-internal.aliyuncs.com", "OSS_ACCESS_KEY_ID": "id",
         "OSS_ACCESS_KEY_SECRET": "sec", "OSS_SESSION_TOKEN": " "}
    )
    assert s.access_key_secret is not None and s.access_key_secret.get_secret_value() == "sec"
    assert s.session_token is None
    assert s.resolved_endpoint() == "https://oss-cn-hangzhou-internal.aliyuncs.com"
    assert s.resolved_region() == "cn-hangzhou"
    r = OssSettings(region="oss-cn-beijing")
    assert (r.resolved_region(), r.resolved_endpoint()) == ("cn-beijing", "https://oss-cn-beijing.aliyuncs.com")
    assert OssSettings(endpoint="http://127.0.0.1:9000").resolved_region() is None


def test_importing_storage_does_not_import_oss2_or_fsspec() -> None:
    code = "import sys, trainer.storage; print(sorted(m for m in ('oss2', 'fsspec', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", ["local", "oss"])
def test_create_exclusive_claims_a_name_once(backend: str, tmp_path, request) -> None:
    if backend == "oss":
        url = request.getfixturevalue("oss_server").url("claims/v1/.reserved")
    else:
        url = str(tmp_path / "claims" / "v1" / ".reserved")
    assert storage.create_exclusive(url, b"first") is True
    assert storage.create_exclusive(url, b"second") is False
    assert storage.read_bytes(url) == b"first"


def test_exclusive_create_decides_on_the_oss_error_code(oss_server: OssTestServer) -> None:
    url = oss_server.url("claims/v2/.reserved")
    oss_server.fail_next(1, op="PutObject", status=409, code="FileAlreadyExists")  # message: "Injected failure."
    assert storage.create_exclusive(url, b"x") is False
    oss_server.fail_next(1, op="PutObject", status=409, code="ObjectNotAppendable")  # another 409 is an error
    with pytest.raises(StorageError, match=r"409 ObjectNotAppendable"):
        storage.create_exclusive(url, b"x")
    assert storage.create_exclusive(url, b"x") is True


def test_each_url_has_one_backend(tmp_path: Path) -> None:
    from imlt.trainer.storage import backend_for

    kinds = {u: type(backend_for(u)).__name__ for u in
             (str(tmp_path), f"file://{tmp_path}", "oss://b/k", "memory://x/y")}
    assert kinds == {str(tmp_path): "LocalBackend", f"file://{tmp_path}": "LocalBackend",
                     "oss://b/k": "OssBackend", "memory://x/y": "FsspecBackend"}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_local_writes_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        storage.write_bytes(str(tmp_path / "w.bin"), b"w")
        storage.create_exclusive(str(tmp_path / "x.bin"), b"x")
    finally:
        os.umask(old)
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("w.bin", "x.bin")} == {mode}


def test_exclusive_create_recognises_its_own_object_after_a_lost_answer(oss_server: OssTestServer) -> None:
    url = oss_server.url("claims/v3/.reserved")
    oss_server.reset_next(1, op="PutObject")  # stored, then the connection drops before the answer
    assert storage.create_exclusive(url, b"mine") is True
    assert oss_server.count("PutObject") == 2 and storage.read_bytes(url) == b"mine"
    oss_server.reset_next(1, op="PutObject")
    assert storage.create_exclusive(url, b"someone else's") is False  # taken by another claim


@pytest.mark.parametrize("backend", ["local", "oss"])
def test_lease_one_holder_renews_expires_and_is_taken_over(backend: str, tmp_path: Path, request) -> None:
    import json as _json

    from imlt.trainer.storage.lease import Lease, LeaseHeldError, current_holder

    folder = request.getfixturevalue("oss_server").url("run") if backend == "oss" else str(tmp_path / "run")
    first = Lease(folder, purpose="training", ttl=2.0).acquire()
    holder = current_holder(folder)
    assert holder is not None and holder.info["purpose"] == "training" and holder.generation == 1
    start = time.monotonic()
    with pytest.raises(LeaseHeldError, match=r"in use by .*:\d+ \(training since .*renewed \d+s ago\)"):
        Lease(folder, ttl=2.0).acquire()  # waits until it sees the holder renew: alive
    assert time.monotonic() - start < 6
    first.release()
    assert current_holder(folder) is None and storage.list_files(folder) == []
    with Lease(folder, ttl=2.0) as second:  # free again
        assert second.generation == 1

    # a holder that died without releasing: its lease expires and the next claimant takes generation 2
    dead = {"holder": "gone:1", "token": "x", "purpose": "training", "acquired_at": time.time() - 10,
            "renewed_at": time.time() - 10, "ttl": 5}
    storage.write_text(storage.join(folder, ".lease", "00000001.json"), _json.dumps(dead))
    with Lease(folder, ttl=2.0) as third:
        assert third.generation == 2
        assert [u.rsplit("/", 1)[1] for u in storage.list_files(folder)] == ["00000002.json"]

    # a holder killed on this machine: seen dead at once, although its lease was renewed just now
    from imlt.trainer.storage.lease import process_identity

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    here = process_identity(os.getpid())
    if here is not None:
        killed = {**dead, "pid": pid, "renewed_at": time.time(), "ttl": 600,
                  "process": ":".join(here.split(":")[:2] + [str(pid), "12345"])}
        storage.write_text(storage.join(folder, ".lease", "00000007.json"), _json.dumps(killed))
        start = time.monotonic()
        with Lease(folder) as fourth:
            assert fourth.generation == 8 and time.monotonic() - start < 5
