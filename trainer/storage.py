"""URL IO for local paths, oss://bucket/key and other fsspec URLs.

(Local-only first cut; the OSS backend replaces the bodies below without changing signatures.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def read_bytes(url: str, byte_range: tuple[int, int] | None = None) -> bytes:
    with open(_local(url), "rb") as f:
        if byte_range is None:
            return f.read()
        f.seek(byte_range[0])
        return f.read(byte_range[1] - byte_range[0] + 1)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write atomically: readers see the old object or the whole new one, never a part."""
    path = _local(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def exists(url: str) -> bool:
    return _local(url).exists()


def list_files(url: str) -> list[str]:
    """Every file below a folder URL, recursively, as full URLs, sorted."""
    root = _local(url)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def delete(url: str) -> None:
    p = _local(url)
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def upload_dir(local_dir: str | Path, url: str) -> None:
    """Copy a local folder's files under a URL (each file written atomically)."""
    local_dir = Path(local_dir)
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            write_bytes(join(url, p.relative_to(local_dir).as_posix()), p.read_bytes())


def download_dir(url: str, local_dir: str | Path) -> Path:
    local_dir = Path(local_dir)
    prefix = url.rstrip("/") + "/"
    for f in list_files(url):
        dest = local_dir / f[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(f))
    return local_dir
