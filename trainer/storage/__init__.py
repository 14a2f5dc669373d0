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

This module is the public API and dispatches each call on the URL's scheme; the backends live in
`local`, `oss` (with its settings, clients and retries) and `fsspec_backend`, credential
scrubbing in `redact`, URL helpers in `urls`, the exceptions in `errors`. Tunables are attributes
of the module that reads them: set `storage.oss.PART_SIZE`, not `storage.PART_SIZE`.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TypeVar

from imlt.trainer.storage.errors import StorageError, StorageNotFoundError
from imlt.trainer.storage.fsspec_backend import _fs, _fs_errors, _fs_list_relative
from imlt.trainer.storage.local import _TMP_SUFFIX, _local_errors, _local_list_relative, _local_write
from imlt.trainer.storage.oss import (
    OssSettings,
    _oss_create_exclusive,
    _oss_delete,
    _oss_download,
    _oss_exists,
    _oss_list_relative,
    _oss_read,
    _oss_write,
    configure_oss,
    current_oss_settings,
    reset_clients,
)
from imlt.trainer.storage.redact import scrub
from imlt.trainer.storage.urls import _check_range, _is_oss, _local, is_local, join

__all__ = [
    "OssSettings",
    "StorageError",
    "StorageNotFoundError",
    "configure_oss",
    "create_exclusive",
    "current_oss_settings",
    "delete",
    "download_dir",
    "exists",
    "is_local",
    "join",
    "list_files",
    "local_staging_dir",
    "open_local",
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
        return _oss_create_exclusive(url, data)
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
