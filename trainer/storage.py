"""URL IO for local paths, oss://bucket/key (oss2) and any other fsspec URL (memory://, s3://, ...).

Every step moves data only through these functions, so a step runs the same against a laptop
folder and an OSS bucket. Design points:

- Writes are atomic: a reader sees the old object or the whole new one. Local files go through a
  temp file + os.replace; OSS objects are one PutObject, or a multipart upload that only becomes
  visible on CompleteMultipartUpload (an interrupted upload is aborted and leaves nothing).
- OSS credentials come from `configure_oss(settings)` (Airflow connection, KFP secret) or else
  from the conventional environment variables (`OssSettings.from_env`). They are SecretStr, are
  scrubbed from oss2's own log records and never reach an exception message: oss2 errors (whose
  bodies can echo the access key id) are translated into `StorageError`s built from status and
  code only, raised `from None`.
- Transient failures (connection reset, truncated body, 5xx, checksum mismatch) are retried a
  bounded number of times with exponential backoff, then fail with a message naming the URL.
- `oss2`, `fsspec`, `requests` and `tqdm` are imported inside functions: DAG parsing and the
  CLI's --help import this module and must stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr

log = logging.getLogger(__name__)

T = TypeVar("T")

# Tunables (module attributes so a deployment or a test can change them).
RETRY_ATTEMPTS = 4  # total tries of one request on a transient failure
RETRY_BASE_DELAY = 0.2  # seconds; doubles per try, with jitter
RETRY_MAX_DELAY = 5.0
OSS_TIMEOUT = 30.0  # seconds, connect and read (oss2 uses one value for both)
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # payloads above this use a multipart upload
PART_SIZE = 16 * 1024 * 1024  # OSS minimum for non-last parts is 100 KiB
LIST_PAGE_SIZE = 1000  # OSS's maximum max-keys
DELETE_BATCH = 1000  # OSS's maximum keys per DeleteMultipleObjects
TRANSFER_THREADS = 8  # parallel object transfers in upload_dir/download_dir for remote URLs

_TMP_SUFFIX = ".imlt-tmp"  # marks in-progress local writes; list_files skips them


class StorageError(OSError):
    """An IO failure at a URL; the message names the URL and the problem, never a credential."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object, file or bucket does not exist (also catchable as FileNotFoundError)."""


# --------------------------------------------------------------------------------------------
# OSS settings and credentials
# --------------------------------------------------------------------------------------------


class OssSettings(BaseModel):
    """Where OSS is and who we are. Secrets are SecretStr so reprs and dumps show '**********'."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str | None = Field(
        None,
        description="OSS endpoint, e.g. https://oss-cn-hangzhou.aliyuncs.com (https:// added if no "
        "scheme). Derived from region when omitted.",
    )
    access_key_id: SecretStr | None = Field(None, description="AccessKey ID (or STS temporary id).")
    access_key_secret: SecretStr | None = Field(None, description="AccessKey secret.")
    session_token: SecretStr | None = Field(None, description="STS security token, if temporary.")
    region: str | None = Field(
        None,
        description="Region id, e.g. cn-hangzhou. Enables V4 signatures; derived from an "
        "aliyuncs.com endpoint when omitted.",
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OssSettings:
        """Read OSS_ENDPOINT, OSS_REGION, OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET, OSS_SESSION_TOKEN."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        return cls(
            endpoint=get("OSS_ENDPOINT"),
            access_key_id=get("OSS_ACCESS_KEY_ID"),
            access_key_secret=get("OSS_ACCESS_KEY_SECRET"),
            session_token=get("OSS_SESSION_TOKEN"),
            region=get("OSS_REGION"),
        )

    def resolved_region(self) -> str | None:
        """Explicit region, else the one an `oss-<region>[-internal].aliyuncs.com` endpoint names."""
        if self.region:
            return self.region.removeprefix("oss-")
        if self.endpoint:
            host = re.sub(r"^[a-z]+://", "", self.endpoint).split("/")[0].split(":")[0]
            m = re.fullmatch(r"oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com", host)
            if m:
                return m.group(1)
        return None

    def resolved_endpoint(self) -> str | None:
        """Endpoint with a scheme (https unless given), else one derived from the region."""
        if self.endpoint:
            ep = self.endpoint.strip().rstrip("/")
            return ep if re.match(r"^https?://", ep) else f"https://{ep}"
        if self.region:
            return f"https://oss-{self.region.removeprefix('oss-')}.aliyuncs.com"
        return None


_lock = threading.RLock()
_explicit_settings: OssSettings | None = None
_buckets: dict[tuple[Any, ...], Any] = {}
_secrets_lock = threading.Lock()  # separate from _lock: scrub() runs inside logging calls
_secret_values: set[str] = set()  # every credential string seen, for scrubbing
_redacting_loggers: set[str] = set()
_logger_count_seen = 0


def configure_oss(settings: OssSettings | None) -> None:
    """Use these credentials for every oss:// URL in this process (None: back to the environment)."""
    global _explicit_settings
    with _lock:
        _explicit_settings = settings
        _buckets.clear()


def reset_clients() -> None:
    """Drop cached oss2 clients (e.g. after the environment's credentials changed)."""
    with _lock:
        _buckets.clear()


def current_oss_settings() -> OssSettings:
    """The settings oss:// URLs use now: configure_oss's, else the environment's."""
    with _lock:
        return _explicit_settings if _explicit_settings is not None else OssSettings.from_env()


def _remember_secrets(settings: OssSettings) -> None:
    with _secrets_lock:
        for s in (settings.access_key_id, settings.access_key_secret, settings.session_token):
            if s is not None and len(s.get_secret_value()) >= 4:
                _secret_values.add(s.get_secret_value())


# Signatures and credential fields as they appear in oss2's debug logs and in OSS error bodies.
_SCRUB_PATTERNS = [
    (re.compile(r"(OSS4-HMAC-SHA256\s+Credential=)[^,\s'\"]+"), r"\1***"),
    (re.compile(r"(Signature=)[^,\s'\"&]+"), r"\1***"),
    (re.compile(r"\bOSS [^\s:'\"]+:[^\s'\",}]+"), "OSS ***:***"),
    (re.compile(r"((?:security-token|SecurityToken)['\"]?\s*[:=]\s*['\"]?)[^\s'\",}&]+", re.I), r"\1***"),
    (re.compile(r"(<OSSAccessKeyId>)[^<]*"), r"\1***"),
    (re.compile(r"(<SignatureProvided>)[^<]*"), r"\1***"),
]


def scrub(text: str) -> str:
    """Remove every known credential and signature from a text before it is logged or raised."""
    with _secrets_lock:
        secrets = sorted(_secret_values, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    for pattern, repl in _SCRUB_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class _RedactFilter(logging.Filter):
    """oss2 logs request headers and error bodies at DEBUG/INFO; rewrite them without credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is not ours to fix
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_REDACT_FILTER = _RedactFilter()


def _install_log_redaction() -> None:
    # Logger filters apply only to records logged on that very logger, so attach to each oss2 one.
    global _logger_count_seen
    with _lock:
        if len(logging.root.manager.loggerDict) == _logger_count_seen:
            return
        _logger_count_seen = len(logging.root.manager.loggerDict)
        for name in list(logging.root.manager.loggerDict):
            if (name == "oss2" or name.startswith("oss2.")) and name not in _redacting_loggers:
                logging.getLogger(name).addFilter(_REDACT_FILTER)
                _redacting_loggers.add(name)


# --------------------------------------------------------------------------------------------
# URL helpers
# --------------------------------------------------------------------------------------------


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _is_oss(url: str) -> bool:
    return url.startswith("oss://")


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _check_range(byte_range: tuple[int, int] | None) -> None:
    if byte_range is not None:
        start, end = byte_range
        if start < 0 or end < start:
            raise ValueError(f"byte_range must be (start, end) with 0 <= start <= end, got {byte_range}")


# --------------------------------------------------------------------------------------------
# OSS backend
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OssTarget:
    url: str
    bucket_name: str
    key: str
    endpoint: str
    bucket: Any  # oss2.Bucket


def _split_oss(url: str) -> tuple[str, str]:
    rest = url.removeprefix("oss://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url}: not an oss://bucket/key URL (no bucket name)")
    return bucket, key


def _oss_target(url: str) -> _OssTarget:
    import oss2

    _install_log_redaction()
    bucket_name, key = _split_oss(url)
    settings = current_oss_settings()
    endpoint = settings.resolved_endpoint()
    if not endpoint:
        raise StorageError(
            f"{url}: no OSS endpoint configured - set OSS_ENDPOINT (e.g. "
            "https://oss-cn-hangzhou.aliyuncs.com) or OSS_REGION, or pass one to configure_oss()"
        )
    if settings.access_key_id is None or settings.access_key_secret is None:
        raise StorageError(
            f"{url}: no OSS credentials - set OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET "
            "(and OSS_SESSION_TOKEN for STS), or call configure_oss()"
        )
    _remember_secrets(settings)
    akid = settings.access_key_id.get_secret_value()
    secret = settings.access_key_secret.get_secret_value()
    token = settings.session_token.get_secret_value() if settings.session_token else None
    region = settings.resolved_region()
    # The fingerprint keys the cache on the credentials without keeping them in the key itself;
    # the pid gives forked DataLoader workers their own HTTP connection pools.
    fingerprint = hashlib.sha256("\0".join([akid, secret, token or "", region or ""]).encode()).hexdigest()
    cache_key = (os.getpid(), endpoint, bucket_name, fingerprint)
    with _lock:
        bucket = _buckets.get(cache_key)
        if bucket is None:
            version = oss2.AUTH_VERSION_4 if region else oss2.AUTH_VERSION_1
            if token:
                auth = oss2.StsAuth(akid, secret, token, auth_version=version)
            elif region:
                auth = oss2.AuthV4(akid, secret)
            else:
                auth = oss2.Auth(akid, secret)
            try:
                bucket = oss2.Bucket(
                    auth, endpoint, bucket_name, connect_timeout=OSS_TIMEOUT, app_name="imlt", region=region
                )
            except oss2.exceptions.ClientError as e:
                raise StorageError(f"{url}: invalid OSS endpoint or bucket name: {scrub(str(e.body))}") from None
            _install_log_redaction()  # Bucket() may create new oss2 loggers on first use
            for old in [k for k in _buckets if k[:3] == cache_key[:3]]:
                del _buckets[old]  # rotated (e.g. STS) credentials replace the old client
            _buckets[cache_key] = bucket
    return _OssTarget(url=url, bucket_name=bucket_name, key=key, endpoint=endpoint, bucket=bucket)


class _TruncatedBody(Exception):
    """The server closed the body early (retryable)."""


def _is_transient(e: BaseException) -> bool:
    import oss2
    import requests
    import urllib3

    if isinstance(e, (_TruncatedBody, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, (requests.exceptions.RequestException, urllib3.exceptions.HTTPError)):
        return True
    if isinstance(e, (oss2.exceptions.RequestError, oss2.exceptions.InconsistentError)):
        return True
    if isinstance(e, oss2.exceptions.ServerError):
        return e.status // 100 == 5 or e.status == 429
    return False


def _translate(e: BaseException, t: _OssTarget, attempts: int) -> BaseException:
    """A StorageError naming the URL and the problem; credentials and raw bodies left out."""
    import oss2

    if isinstance(e, StorageError):
        return e
    url = t.url
    tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(e, oss2.exceptions.ServerError):
        code = e.code or ""
        rid = f"; request id {e.request_id}" if e.request_id else ""
        status_code = f"{e.status} {code}".strip()
        message = f": {scrub(e.message)}" if e.message else ""
        if e.status == 403:
            source = (
                "the credentials given to configure_oss() (e.g. the Airflow OSS connection)"
                if _explicit_settings is not None
                else "OSS_ACCESS_KEY_ID/OSS_ACCESS_KEY_SECRET (and OSS_SESSION_TOKEN)"
            )
            return StorageError(
                f"{url}: access denied to bucket '{t.bucket_name}' ({status_code}{message}) - check "
                f"{source} and the bucket's permissions{rid}"
            )
        if e.status == 404 and code == "NoSuchBucket":
            return StorageNotFoundError(
                f"{url}: bucket '{t.bucket_name}' not found at {t.endpoint} (404 NoSuchBucket){rid}"
            )
        if e.status == 404:
            return StorageNotFoundError(f"{url}: not found ({e.status} {code or 'NotFound'}){rid}")
        if e.status // 100 == 5 or e.status == 429:
            return StorageError(f"{url}: OSS server error ({status_code}){tries}{rid}")
        return StorageError(f"{url}: OSS request failed ({status_code}{message}){rid}")
    if isinstance(e, oss2.exceptions.InconsistentError):
        return StorageError(f"{url}: data corrupted in transfer (CRC64 mismatch){tries}")
    if isinstance(e, oss2.exceptions.RequestError):
        inner = getattr(e, "exception", None)
        detail = type(inner).__name__ if inner is not None else "request error"
        return StorageError(f"{url}: cannot reach OSS endpoint {t.endpoint} ({detail}){tries}")
    if isinstance(e, oss2.exceptions.ClientError):
        return StorageError(f"{url}: OSS client error: {scrub(str(e.body))}")
    if _is_transient(e):
        return StorageError(f"{url}: connection to {t.endpoint} failed ({type(e).__name__}: {scrub(str(e))}){tries}")
    return e


def _describe(e: BaseException) -> str:
    status, code = getattr(e, "status", None), getattr(e, "code", None)
    if isinstance(status, int) and status > 0:
        return f"{type(e).__name__} {status} {code or ''}".strip()
    inner = getattr(e, "exception", None)  # oss2.RequestError wraps the requests exception
    return type(e).__name__ + (f"/{type(inner).__name__}" if inner is not None else "")


def _retrying(t: _OssTarget, what: str, fn: Callable[[], T]) -> T:
    """Run one OSS request, retrying transient failures with exponential backoff and jitter."""
    # oss2 itself retries only inside its list iterators, and not on connection errors or a
    # reset mid-body, so the policy lives here.
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:
            if attempt >= RETRY_ATTEMPTS or not _is_transient(e):
                err = _translate(e, t, attempt)
                if err is e:
                    raise
                raise err from None
            delay = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning(
                "%s: %s failed (%s), retry %d of %d in %.2fs",
                t.url, what, _describe(e), attempt, RETRY_ATTEMPTS - 1, delay,
            )
            time.sleep(delay)


def _oss_read(url: str, byte_range: tuple[int, int] | None) -> bytes:
    import oss2

    t = _oss_target(url)
    # "standard" range behaviour: a range starting past the end is a 416 instead of OSS's legacy
    # answer of silently returning the whole object.
    headers = {"x-oss-range-behavior": "standard"} if byte_range else None

    def once() -> bytes:
        try:
            result = t.bucket.get_object(t.key, byte_range=byte_range, headers=headers)
        except oss2.exceptions.ServerError as e:
            if e.status == 416:
                return b""
            raise
        data = result.read()
        if result.content_length is not None and len(data) != result.content_length:
            raise _TruncatedBody(f"got {len(data)} of {result.content_length} bytes")
        if byte_range is None:
            oss2.utils.check_crc("get", result.client_crc, result.server_crc, result.request_id)
        elif result.status == 200:  # server ignored the range: cut it ourselves
            data = data[byte_range[0] : byte_range[1] + 1]
        return data

    return _retrying(t, "read", once)


def _oss_download(url: str, dest: Path) -> None:
    """Stream one object to a local file (no whole-object buffer), retrying from the start."""
    import oss2

    t = _oss_target(url)

    def once() -> None:
        result = t.bucket.get_object(t.key)
        n = 0
        with open(dest, "wb") as f:
            for chunk in iter(lambda: result.read(1 << 20), b""):
                f.write(chunk)
                n += len(chunk)
        if result.content_length is not None and n != result.content_length:
            raise _TruncatedBody(f"got {n} of {result.content_length} bytes")
        oss2.utils.check_crc("get", result.client_crc, result.server_crc, result.request_id)

    _retrying(t, "download", once)


def _oss_write(url: str, data: bytes) -> None:
    t = _oss_target(url)
    if not t.key or t.key.endswith("/"):
        raise StorageError(f"{url}: cannot write an object without a key name")
    if len(data) <= MULTIPART_THRESHOLD:
        _retrying(t, "write", lambda: t.bucket.put_object(t.key, data))
    else:
        _oss_multipart_write(t, data)


def _oss_multipart_write(t: _OssTarget, data: bytes) -> None:
    """Upload parts, then complete; on any failure abort so no part or object is left visible."""
    import oss2

    upload_id = _retrying(t, "start multipart upload", lambda: t.bucket.init_multipart_upload(t.key).upload_id)
    try:
        parts = []
        for number, offset in enumerate(range(0, len(data), PART_SIZE), start=1):
            chunk = data[offset : offset + PART_SIZE]  # bytes: oss2's CRC adapter needs them
            result = _retrying(
                t, f"upload part {number}", lambda: t.bucket.upload_part(t.key, upload_id, number, chunk)
            )
            parts.append(oss2.models.PartInfo(number, result.etag, size=len(chunk), part_crc=result.crc))
            log.debug("%s: uploaded part %d (%d bytes)", t.url, number, len(chunk))

        def complete() -> None:
            try:
                t.bucket.complete_multipart_upload(t.key, upload_id, parts)
            except oss2.exceptions.NoSuchUpload:
                # An earlier try may have completed before its response was lost.
                head = t.bucket.head_object(t.key)
                if head.content_length != len(data):
                    raise
        _retrying(t, "complete multipart upload", complete)
    except BaseException:
        with contextlib.suppress(Exception):
            t.bucket.abort_multipart_upload(t.key, upload_id)
        raise


def _oss_exists(url: str) -> bool:
    import oss2

    t = _oss_target(url)

    def once() -> bool:
        if t.key and not t.key.endswith("/"):
            try:
                t.bucket.head_object(t.key)
                return True
            except oss2.exceptions.NotFound as e:
                if e.code == "NoSuchBucket":
                    raise
        prefix = _folder_prefix(t.key)
        return bool(t.bucket.list_objects(prefix=prefix, max_keys=1).object_list)

    return _retrying(t, "exists", once)


def _folder_prefix(key: str) -> str:
    return key.rstrip("/") + "/" if key.strip("/") else ""


def _oss_list_keys(t: _OssTarget, prefix: str) -> list[str]:
    # Paged by hand (not oss2.ObjectIterator) so every page gets this module's retry policy.
    keys: list[str] = []
    marker = ""
    while True:
        page = _retrying(
            t, "list", lambda: t.bucket.list_objects(prefix=prefix, marker=marker, max_keys=LIST_PAGE_SIZE)
        )
        keys.extend(o.key for o in page.object_list)
        if not page.is_truncated:
            return keys
        if not page.next_marker or page.next_marker == marker:
            raise StorageError(f"{t.url}: OSS listing did not advance past marker {marker!r}")
        marker = page.next_marker


def _oss_list_relative(url: str) -> list[str]:
    t = _oss_target(url)
    prefix = _folder_prefix(t.key)
    # Keys ending in '/' are the console's zero-byte "folder" markers, not files.
    return sorted(k[len(prefix) :] for k in _oss_list_keys(t, prefix) if not k.endswith("/"))


def _oss_delete(url: str) -> None:
    t = _oss_target(url)
    if not t.key.strip("/"):
        raise StorageError(f"{url}: refusing to delete a whole bucket")
    keys = _oss_list_keys(t, _folder_prefix(t.key))
    if not t.key.endswith("/"):
        keys.append(t.key)  # deleting a missing key is not an error in OSS
    for i in range(0, len(keys), DELETE_BATCH):
        batch = keys[i : i + DELETE_BATCH]
        _retrying(t, "delete", lambda: t.bucket.batch_delete_objects(batch))


# --------------------------------------------------------------------------------------------
# fsspec backend (memory://, s3://, gs://, ...)
# --------------------------------------------------------------------------------------------


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{url}: no filesystem for this URL scheme ({e})") from None


@contextlib.contextmanager
def _fs_errors(url: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageNotFoundError(f"{url}: not found") from None
    except OSError as e:
        raise StorageError(f"{url}: {type(e).__name__}: {scrub(str(e))}") from None


def _fs_list_relative(url: str) -> list[str]:
    fs, path = _fs(url)
    root = path.rstrip("/")
    with _fs_errors(url):
        if not fs.isdir(path):
            return []
        found = fs.find(path)
    return sorted(p[len(root) + 1 :] for p in found if p.startswith(root + "/"))


# --------------------------------------------------------------------------------------------
# Local backend
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _local_errors(url: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise StorageNotFoundError(f"{url}: not found") from None
    except IsADirectoryError:
        raise StorageError(f"{url}: is a folder, not a file") from None


def _local_write(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _local_list_relative(url: str) -> list[str]:
    root = _local(url)
    if not root.is_dir():
        return []
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.endswith(_TMP_SUFFIX)
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def read_bytes(url: str, byte_range: tuple[int, int] | None = None) -> bytes:
    """The object's bytes; byte_range=(start, end) is inclusive and behaves like data[start:end+1]."""
    _check_range(byte_range)
    if is_local(url):
        with _local_errors(url), open(_local(url), "rb") as f:
            if byte_range is None:
                return f.read()
            f.seek(byte_range[0])
            return f.read(byte_range[1] - byte_range[0] + 1)
    if _is_oss(url):
        return _oss_read(url, byte_range)
    fs, path = _fs(url)
    with _fs_errors(url):
        if byte_range is None:
            return fs.cat_file(path)
        return fs.cat_file(path, start=byte_range[0], end=byte_range[1] + 1)


def read_text(url: str) -> str:
    data = read_bytes(url)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StorageError(f"{url}: not UTF-8 text (bad byte at offset {e.start})") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write atomically: readers see the old object or the whole new one, never a part."""
    if is_local(url):
        try:
            _local_write(_local(url), data)
        except OSError as e:  # disk full (ENOSPC), file-size limit (EFBIG), read-only, permissions
            raise StorageError(
                f"{url}: cannot write: {e.strerror or type(e).__name__}; any earlier version of the file is unchanged"
            ) from e
    elif _is_oss(url):
        _oss_write(url, bytes(data))
    else:
        fs, path = _fs(url)  # object stores behind fsspec create objects in one PUT
        with _fs_errors(url):
            parent = posixpath.dirname(path.rstrip("/"))
            if parent and parent != path:
                fs.makedirs(parent, exist_ok=True)  # hierarchical filesystems need it; stores ignore it
            fs.pipe_file(path, bytes(data))


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def create_exclusive(url: str, data: bytes) -> bool:
    """Create an object only if none exists; False if one does. Lets racing writers claim a name.

    Local: O_EXCL. OSS: PutObject with x-oss-forbid-overwrite (409 FileAlreadyExists when taken).
    Other fsspec URLs have no conditional create: check-then-write, with a small race window.
    """
    if is_local(url):
        path = _local(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if _is_oss(url):
        t = _oss_target(url)
        try:
            _retrying(t, "create", lambda: t.bucket.put_object(t.key, data, headers={"x-oss-forbid-overwrite": "true"}))
        except StorageError as e:
            if "409 FileAlreadyExists" in str(e):
                return False
            raise
        return True
    if exists(url):
        return False
    write_bytes(url, data)
    return True


def exists(url: str) -> bool:
    """True for an existing file/object or a non-empty folder/prefix."""
    if is_local(url):
        return _local(url).exists()
    if _is_oss(url):
        return _oss_exists(url)
    fs, path = _fs(url)
    with _fs_errors(url):
        return fs.exists(path)


def _list_relative(url: str) -> list[str]:
    if is_local(url):
        return _local_list_relative(url)
    if _is_oss(url):
        return _oss_list_relative(url)
    return _fs_list_relative(url)


def list_files(url: str) -> list[str]:
    """Every file below a folder URL, recursively, as full URLs, sorted."""
    return [join(url, rel) for rel in _list_relative(url)]


def delete(url: str) -> None:
    """Delete a file/object, or a folder/prefix with everything below it; missing is not an error."""
    if is_local(url):
        p = _local(url)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    elif _is_oss(url):
        _oss_delete(url)
    else:
        fs, path = _fs(url)
        with _fs_errors(url):
            if fs.exists(path):
                fs.rm(path, recursive=True)


def _download_file(url: str, dest: Path) -> None:
    """Copy one file to a local path, streaming where the backend allows."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_local(url):
        with _local_errors(url):
            shutil.copyfile(_local(url), dest)
    elif _is_oss(url):
        _oss_download(url, dest)
    else:
        fs, path = _fs(url)
        with _fs_errors(url):
            fs.get_file(path, str(dest))


def _transfer(items: list[T], work: Callable[[T], None], remote: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    threads = TRANSFER_THREADS if remote else 1
    with tqdm(total=len(items), desc=desc, unit="file", disable=len(items) < 50, leave=False) as bar:
        if threads == 1:
            for item in items:
                work(item)
                bar.update()
            return
        pool = ThreadPoolExecutor(threads)
        try:
            for future in as_completed([pool.submit(work, item) for item in items]):
                future.result()  # re-raises the first failure
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on failure, skip what has not started


def upload_dir(local_dir: str | Path, url: str) -> None:
    """Copy a local folder's files under a URL (each file written atomically)."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageNotFoundError(f"{local_dir}: not a folder")
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.endswith(_TMP_SUFFIX))

    def one(p: Path) -> None:
        write_bytes(join(url, p.relative_to(local_dir).as_posix()), p.read_bytes())

    _transfer(files, one, remote=not is_local(url), desc=f"upload {url}")


def download_dir(url: str, local_dir: str | Path) -> Path:
    """Copy every file below a folder URL into a local folder; returns the local folder."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)

    def one(rel: str) -> None:
        _download_file(join(url, rel), local_dir / rel)

    _transfer(_list_relative(url), one, remote=not is_local(url), desc=f"download {url}")
    return local_dir


@contextlib.contextmanager
def open_local(url: str) -> Iterator[Path]:
    """A local path holding the file at `url` (for torch.load, safetensors, onnxruntime...).

    Local URLs yield their own path; remote ones are downloaded to a temp file, removed on exit.
    """
    if is_local(url):
        path = _local(url)
        if path.is_dir():
            raise StorageError(f"{url}: is a folder, not a file")
        if not path.is_file():
            raise StorageNotFoundError(f"{url}: not found")
        yield path
        return
    name = url.rstrip("/").rsplit("/", 1)[-1] or "object"
    with tempfile.TemporaryDirectory(prefix="imlt-open-") as tmp:
        dest = Path(tmp) / name
        _download_file(url, dest)
        yield dest


@contextlib.contextmanager
def local_staging_dir(url: str | None = None) -> Iterator[Path]:
    """An empty temp folder; if `url` is given and the block succeeds, its files are uploaded there.

    For code that can only write local files (exporters, plotting) but whose output belongs at a
    URL. On an exception nothing is uploaded. The folder is removed on exit either way.
    """
    with tempfile.TemporaryDirectory(prefix="imlt-stage-") as tmp:
        yield Path(tmp)
        if url is not None:
            upload_dir(tmp, url)
