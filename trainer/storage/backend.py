"""The one interface every storage backend implements, and the choice of backend for a URL.

The public functions in `imlt.trainer.storage` look the backend up once per call with
`backend_for(url)` and delegate; nothing else branches on a URL's scheme.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Backend(Protocol):
    """What the public storage API needs from a place that holds objects."""

    remote: bool  # transfers of many files run in parallel threads when True

    def read(self, url: str, byte_range: tuple[int, int] | None) -> bytes:
        """The object's bytes; byte_range=(start, end) is inclusive (already validated)."""

    def write(self, url: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one."""

    def create_exclusive(self, url: str, data: bytes) -> bool:
        """Create only if nothing exists there; False if something does."""

    def exists(self, url: str) -> bool:
        """An existing object, or a non-empty folder/prefix."""

    def list_relative(self, url: str) -> list[str]:
        """Every file below a folder URL, relative to it, sorted."""

    def delete(self, url: str) -> None:
        """An object, or a folder/prefix with everything below; missing is not an error."""

    def download(self, url: str, dest: Path) -> None:
        """Copy one object to a local file (whose folder exists), streaming where possible."""


def backend_for(url: str) -> Backend:
    """Local paths and file:// URLs, oss://, or any other scheme fsspec knows."""
    from imlt.trainer.storage import fsspec_backend, local, oss
    from imlt.trainer.storage.urls import is_local, is_oss

    if is_local(url):
        return local.BACKEND
    if is_oss(url):
        return oss.BACKEND
    return fsspec_backend.BACKEND
