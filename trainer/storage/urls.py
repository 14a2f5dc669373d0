"""URL helpers shared by the backends and the public API: which backend a URL belongs to, joining."""

from __future__ import annotations

from pathlib import Path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def is_oss(url: str) -> bool:
    return url.startswith("oss://")


def local_path(url: str) -> Path:
    """The filesystem path of a local URL (a plain path or file://...)."""
    return Path(url.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def check_range(byte_range: tuple[int, int] | None) -> None:
    if byte_range is not None:
        start, end = byte_range
        if start < 0 or end < start:
            raise ValueError(f"byte_range must be (start, end) with 0 <= start <= end, got {byte_range}")
