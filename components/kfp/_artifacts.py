"""Turning step outputs into files the Pipelines UI renders (HTML artifacts).

Imported inside component bodies (the image installs this package). The UI shows an HTML
artifact as one self-contained page, so plots are embedded as base64 data URIs rather
than linked: a link to a PNG in the artifact store would not load in the UI's sandbox.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Mapping, Sequence

from imlt.trainer import storage


def png_urls(folder: str) -> list[str]:
    """Every PNG below a step's output folder (plots), in path order."""
    return [u for u in storage.list_files(folder) if u.lower().endswith(".png")]


def html_page(title: str, images: Sequence[str] = (), rows: Sequence[Mapping[str, Any]] = ()) -> str:
    """A standalone page: the images (URLs, embedded) above a table of the rows."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
             f"<h2>{html.escape(title)}</h2>"]
    for url in images:
        data = base64.b64encode(storage.read_bytes(url)).decode("ascii")
        parts.append(f"<img alt='{html.escape(url.rsplit('/', 1)[-1])}' src='data:image/png;base64,{data}'><br>")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    if columns:
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(c, '')))}</td>" for c in columns) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_text(path: str, text: str) -> None:
    """Write a local artifact file (the launcher uploads it after the task)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


def copy_file(url: str, path: str) -> None:
    """Copy one file from a step's output URL (local or oss://) to a local artifact path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(storage.read_bytes(url))
