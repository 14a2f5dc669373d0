"""The local-path backend (plain paths and file:// URLs): atomic writes via temp file + os.replace."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imlt.trainer.storage.errors import StorageError, StorageNotFoundError
from imlt.trainer.storage.urls import _local

_TMP_SUFFIX = ".imlt-tmp"  # marks in-progress local writes; list_files skips them


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
