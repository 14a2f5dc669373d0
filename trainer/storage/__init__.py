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
  CLI's --help import this package and must stay fast.

This module is the public API. Each call looks up its URL's backend once (`backend.backend_for`:
`local`, `oss` with its settings, clients and retries, or `fsspec_backend`), and delegates to the
`Backend` interface; credential scrubbing lives in `redact`, URL helpers in `urls`, the exceptions
in `errors`. Tunables are attributes of the module that reads them: set `storage.oss.PART_SIZE`,
not `storage.PART_SIZE`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TypeVar

from imlt.trainer.storage.backend import Backend, backend_for
from imlt.trainer.storage.errors import EndpointUnavailableError, StorageError, StorageNotFoundError
from imlt.trainer.storage.local import TMP_SUFFIX
from imlt.trainer.storage.oss import OssSettings, configure_oss, current_oss_settings, reset_clients
from imlt.trainer.storage.redact import scrub
from imlt.trainer.storage.urls import check_range, is_local, join

__all__ = [
    "Backend",
    "EndpointUnavailableError",
    "OssSettings",
    "StorageError",
    "StorageNotFoundError",
    "backend_for",
    "configure_oss",
    "create_exclusive",
    "current_oss_settings",
    "delete",
    "download_dir",
    "exists",
    "is_local",
    "join",
    "list_files",
    "read_bytes",
    "read_text",
    "reset_clients",
    "scrub",
    "upload_dir",
    "write_bytes",
    "write_text",
]

T = TypeVar("T")

TRANSFER_THREADS = 8  # parallel object transfers in upload_dir/download_dir for remote URLs


def read_bytes(url: str, byte_range: tuple[int, int] | None = None) -> bytes:
    """The object's bytes; byte_range=(start, end) is inclusive and behaves like data[start:end+1]."""
    check_range(byte_range)
    return backend_for(url).read(url, byte_range)


def read_text(url: str) -> str:
    data = read_bytes(url)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StorageError(f"{url}: not UTF-8 text (bad byte at offset {e.start})") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write atomically: readers see the old object or the whole new one, never a part."""
    backend_for(url).write(url, data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def create_exclusive(url: str, data: bytes) -> bool:
    """Create an object only if none exists; False if one does. Lets racing writers claim a name.

    Local: O_EXCL. OSS: PutObject with x-oss-forbid-overwrite (409 FileAlreadyExists when taken).
    Other fsspec URLs have no conditional create: check-then-write, with a small race window.
    """
    return backend_for(url).create_exclusive(url, data)


def exists(url: str) -> bool:
    """True for an existing file/object or a non-empty folder/prefix."""
    return backend_for(url).exists(url)


def list_files(url: str) -> list[str]:
    """Every file below a folder URL, recursively, as full URLs, sorted."""
    return [join(url, rel) for rel in backend_for(url).list_relative(url)]


def delete(url: str) -> None:
    """Delete a file/object, or a folder/prefix with everything below it; missing is not an error."""
    backend_for(url).delete(url)


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
    files = sorted(p for p in local_dir.rglob("*") if p.is_file() and not p.name.endswith(TMP_SUFFIX))
    backend = backend_for(url)

    def one(p: Path) -> None:
        target = join(url, p.relative_to(local_dir).as_posix())
        backend.write(target, p.read_bytes())

    _transfer(files, one, remote=backend.remote, desc=f"upload {url}")


def download_dir(url: str, local_dir: str | Path) -> Path:
    """Copy every file below a folder URL into a local folder; returns the local folder."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    backend = backend_for(url)

    def one(rel: str) -> None:
        dest = local_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        backend.download(join(url, rel), dest)

    _transfer(backend.list_relative(url), one, remote=backend.remote, desc=f"download {url}")
    return local_dir
