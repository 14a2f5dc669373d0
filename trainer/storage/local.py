"""The local-path backend (plain paths and file:// URLs): atomic writes via temp file + os.replace."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from imlt.trainer.storage.errors import StorageError, StorageNotFoundError
from imlt.trainer.storage.urls import local_path

TMP_SUFFIX = ".imlt-tmp"  # marks in-progress local writes; listings skip them


@contextlib.contextmanager
def local_errors(url: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise StorageNotFoundError(f"{url}: not found") from None
    except IsADirectoryError:
        raise StorageError(f"{url}: is a folder, not a file") from None


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside `path`, created with mode 0666 so the kernel applies the umask.

    Not tempfile.mkstemp: it always creates mode 0600, and os.replace keeps the temp file's mode,
    so every output would be unreadable to other users (a model server, a pod running as another
    uid). The process umask decides, as for any other file the process creates (0644 under 022).
    """
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temp file beside it")


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Temp file in the same folder, fsync, os.replace: a reader never sees a partial file.

    The file's mode follows the process umask (0644 under the usual 022).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalBackend:
    remote = False

    def read(self, url: str, byte_range: tuple[int, int] | None) -> bytes:
        with local_errors(url), open(local_path(url), "rb") as f:
            if byte_range is None:
                return f.read()
            f.seek(byte_range[0])
            return f.read(byte_range[1] - byte_range[0] + 1)

    def write(self, url: str, data: bytes) -> None:
        try:
            atomic_write(local_path(url), data)
        except OSError as e:  # disk full (ENOSPC), file-size limit (EFBIG), read-only, permissions
            raise StorageError(
                f"{url}: cannot write: {e.strerror or type(e).__name__}; any earlier version of the file is unchanged"
            ) from e

    def create_exclusive(self, url: str, data: bytes) -> bool:
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # mode: the umask decides
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def exists(self, url: str) -> bool:
        return local_path(url).exists()

    def list_relative(self, url: str) -> list[str]:
        root = local_path(url)
        if not root.is_dir():
            return []
        return sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.endswith(TMP_SUFFIX)
        )

    def delete(self, url: str) -> None:
        p = local_path(url)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def download(self, url: str, dest: Path) -> None:
        with local_errors(url):
            shutil.copyfile(local_path(url), dest)


BACKEND = LocalBackend()
