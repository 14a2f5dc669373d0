"""The oss://bucket/key backend through oss2: settings and credentials, cached clients, retries.

oss2 errors are translated into StorageErrors built from status and code only (their bodies can
echo the access key id), and transient failures are retried here (tenacity) with exponential
backoff. `oss2`, `requests`, `urllib3` and `tenacity` are imported inside functions so importing
this module stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from imlt.trainer.storage.errors import EndpointUnavailableError, StorageError, StorageNotFoundError
from imlt.trainer.storage.redact import REDACT_FILTER, remember_secrets, scrub

if TYPE_CHECKING:
    import tenacity

log = logging.getLogger(__name__)

T = TypeVar("T")

# Tunables (module attributes so a deployment or a test can change them).
RETRY_ATTEMPTS = 4  # total tries of one request on a transient failure
RETRY_BASE_DELAY = 0.2  # seconds; doubles per try, with jitter
RETRY_MAX_DELAY = 5.0
CIRCUIT_FAILURES = 8  # connection failures in a row, across all objects, that stop every request to an endpoint
CIRCUIT_COOLDOWN = 30.0  # seconds the stopped endpoint fails fast before one request may probe it again
OSS_TIMEOUT = 30.0  # seconds, connect and read (oss2 uses one value for both)
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # payloads above this use a multipart upload
PART_SIZE = 16 * 1024 * 1024  # OSS minimum for non-last parts is 100 KiB
LIST_PAGE_SIZE = 1000  # OSS's maximum max-keys
DELETE_BATCH = 1000  # OSS's maximum keys per DeleteMultipleObjects


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
_breakers: dict[str, _CircuitBreaker] = {}  # per endpoint
_redacting_loggers: set[str] = set()
_logger_count_seen = 0


def configure_oss(settings: OssSettings | None) -> None:
    """Use these credentials for every oss:// URL in this process (None: back to the environment)."""
    global _explicit_settings
    with _lock:
        _explicit_settings = settings
        _buckets.clear()
        _breakers.clear()


def reset_clients() -> None:
    """Drop cached oss2 clients (e.g. after the environment's credentials changed) and endpoint states."""
    with _lock:
        _buckets.clear()
        _breakers.clear()


def current_oss_settings() -> OssSettings:
    """The settings oss:// URLs use now: configure_oss's, else the environment's."""
    with _lock:
        return _explicit_settings if _explicit_settings is not None else OssSettings.from_env()


def _install_log_redaction() -> None:
    # Logger filters apply only to records logged on that very logger, so attach to each oss2 one.
    global _logger_count_seen
    with _lock:
        if len(logging.root.manager.loggerDict) == _logger_count_seen:
            return
        _logger_count_seen = len(logging.root.manager.loggerDict)
        for name in list(logging.root.manager.loggerDict):
            if (name == "oss2" or name.startswith("oss2.")) and name not in _redacting_loggers:
                logging.getLogger(name).addFilter(REDACT_FILTER)
                _redacting_loggers.add(name)


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
    remember_secrets(*(s.get_secret_value() for s in (settings.access_key_id, settings.access_key_secret,
                                                       settings.session_token) if s is not None))
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


def _is_connection_failure(e: BaseException) -> bool:
    """No answer from the endpoint (refused, reset, timed out, cut body), as opposed to an error answer."""
    import oss2
    import requests
    import urllib3

    return isinstance(e, (_TruncatedBody, ConnectionError, TimeoutError, oss2.exceptions.RequestError,
                          requests.exceptions.RequestException, urllib3.exceptions.HTTPError))


class _CircuitBreaker:
    """Counts connection failures in a row to one endpoint, across every object and thread.

    Per-request retries alone turn a dead endpoint into minutes of warnings (every image retried
    with backoff); after CIRCUIT_FAILURES in a row the endpoint is declared down and every request
    fails at once with one error naming it, until CIRCUIT_COOLDOWN lets a request probe again.
    Hand-written: tenacity retries one call and has no state shared across calls.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.failures = 0
        self.opened_at: float | None = None
        self.lock = threading.Lock()

    def check(self, url: str) -> None:
        with self.lock:
            if self.opened_at is None or time.monotonic() - self.opened_at >= CIRCUIT_COOLDOWN:
                return
            failures = self.failures
        raise EndpointUnavailableError(
            f"OSS endpoint {self.endpoint} is unreachable: {failures} requests in a row got no answer "
            f"(the last for {url}); stopping instead of retrying object by object - check the endpoint "
            "and the network, then run the step again"
        )

    def record(self, failed: bool) -> None:
        with self.lock:
            if not failed:
                self.failures, self.opened_at = 0, None
                return
            self.failures += 1
            if self.failures >= CIRCUIT_FAILURES:
                self.opened_at = time.monotonic()


def _breaker(endpoint: str) -> _CircuitBreaker:
    with _lock:
        return _breakers.setdefault(endpoint, _CircuitBreaker(endpoint))


def _backoff(state: tenacity.RetryCallState) -> float:
    """RETRY_BASE_DELAY * 2^(n-1), capped, times a jitter in [0.5, 1] (read at call time: tests tune it).

    Hand-written rather than tenacity's wait_random_exponential, whose jitter draws from [0, x]:
    keeping at least half the backoff is today's policy.
    """
    full = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (state.attempt_number - 1))
    return full * random.uniform(0.5, 1.0)


def _retrying(t: _OssTarget, what: str, fn: Callable[[], T]) -> T:
    """Run one OSS request, retrying transient failures with exponential backoff and jitter.

    oss2 itself retries only inside its list iterators, and not on connection errors or a reset
    mid-body, so the policy lives here: RETRY_ATTEMPTS tries in all, waits of
    RETRY_BASE_DELAY * 2^(n-1) capped at RETRY_MAX_DELAY, times a jitter in [0.5, 1].
    """
    import tenacity

    def warn(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: %s failed (%s), retry %d of %d in %.2fs",
            t.url, what, _describe(error) if error else "?", state.attempt_number, RETRY_ATTEMPTS - 1, delay,
        )

    breaker = _breaker(t.endpoint)

    def attempt() -> T:
        breaker.check(t.url)
        try:
            result = fn()
        except Exception as e:
            breaker.record(failed=_is_connection_failure(e))
            raise
        breaker.record(failed=False)
        return result

    retryer = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(RETRY_ATTEMPTS),
        wait=_backoff,
        retry=tenacity.retry_if_exception(_is_transient),
        before_sleep=warn,
        reraise=True,
    )
    try:
        return retryer(attempt)
    except Exception as e:
        err = _translate(e, t, retryer.statistics.get("attempt_number", 1))
        if err is e:
            raise
        raise err from None


def _forbid_overwrite_put(t: _OssTarget, data: bytes) -> bool:
    """PutObject with x-oss-forbid-overwrite; False when the name is taken (409 FileAlreadyExists).

    A retry after a lost answer (the first PUT stored the object, then the connection dropped)
    gets 409 for our own object: then the object's ETag (the MD5 of a simple upload) is compared
    with our bytes, so the caller keeps its claim instead of moving on and leaving an orphan.
    """
    import oss2

    tries = 0

    def once() -> bool:
        nonlocal tries
        tries += 1
        try:
            t.bucket.put_object(t.key, data, headers={"x-oss-forbid-overwrite": "true"})
        except oss2.exceptions.ServerError as e:
            if e.status == 409 and e.code == "FileAlreadyExists":
                return tries > 1 and _etag(t.bucket.head_object(t.key).etag) == hashlib.md5(data).hexdigest()
            raise
        return True

    return _retrying(t, "create", once)


def _etag(value: str | None) -> str:
    return (value or "").strip('"').lower()


def _multipart_write(t: _OssTarget, data: bytes) -> None:
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


def _folder_prefix(key: str) -> str:
    return key.rstrip("/") + "/" if key.strip("/") else ""


def _list_keys(t: _OssTarget, prefix: str) -> list[str]:
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


class OssBackend:
    remote = True

    def read(self, url: str, byte_range: tuple[int, int] | None) -> bytes:
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

    def download(self, url: str, dest: Path) -> None:
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

    def write(self, url: str, data: bytes) -> None:
        data = bytes(data)
        t = _oss_target(url)
        if not t.key or t.key.endswith("/"):
            raise StorageError(f"{url}: cannot write an object without a key name")
        if len(data) <= MULTIPART_THRESHOLD:
            _retrying(t, "write", lambda: t.bucket.put_object(t.key, data))
        else:
            _multipart_write(t, data)

    def create_exclusive(self, url: str, data: bytes) -> bool:
        return _forbid_overwrite_put(_oss_target(url), bytes(data))

    def exists(self, url: str) -> bool:
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

    def list_relative(self, url: str) -> list[str]:
        t = _oss_target(url)
        prefix = _folder_prefix(t.key)
        # Keys ending in '/' are the console's zero-byte "folder" markers, not files.
        return sorted(k[len(prefix) :] for k in _list_keys(t, prefix) if not k.endswith("/"))

    def delete(self, url: str) -> None:
        t = _oss_target(url)
        if not t.key.strip("/"):
            raise StorageError(f"{url}: refusing to delete a whole bucket")
        keys = _list_keys(t, _folder_prefix(t.key))
        if not t.key.endswith("/"):
            keys.append(t.key)  # deleting a missing key is not an error in OSS
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i : i + DELETE_BATCH]
            _retrying(t, "delete", lambda: t.bucket.batch_delete_objects(batch))


BACKEND = OssBackend()
