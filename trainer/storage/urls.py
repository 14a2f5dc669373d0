"""URL helpers shared by the backends and the public API: which backend a URL belongs to, joining."""

from __future__ import annotations

import re
from dataclasses import dataclass
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


# oss://bucket.oss-<region>[-internal].aliyuncs.com/key: how iTAG and the OSS console write object URLs.
_ENDPOINT_STYLE = re.compile(
    r"oss://(?P<bucket>[a-z0-9][a-z0-9-]*)\.(?P<host>oss-(?P<region>[a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com)"
    r"(?:/(?P<key>.*))?"
)


@dataclass(frozen=True)
class EndpointStyleUrl:
    url: str  # the same object as oss://bucket/key
    host: str  # oss-<region>[-internal].aliyuncs.com
    region: str


def parse_endpoint_style(url: str) -> EndpointStyleUrl | None:
    """An oss:// URL whose host is bucket.endpoint, read as bucket + key; None for any other URL."""
    m = _ENDPOINT_STYLE.fullmatch(url)
    if m is None:
        return None
    return EndpointStyleUrl(f"oss://{m['bucket']}/{m['key'] or ''}", m["host"], m["region"])


def oss_bucket_has_dot(url: str) -> bool:
    """OSS bucket names have no dots: a dotted host is an endpoint-style URL or a mistake."""
    return is_oss(url) and "." in url.removeprefix("oss://").partition("/")[0]
