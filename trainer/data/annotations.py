"""Parsers for the two annotation formats: ClsSourceImageList (text) and ClsSourceItag (JSON Lines).

Parsers are pure: bytes in, samples and problems out, no IO, so they behave the same for local
and oss:// files and never stop at the first bad line. Labels stay as written (class names or
index strings); trainer.data.classes turns them into label ids against the class list.

Image paths: a URL with a scheme (oss://bucket/key, s3://...) is kept; a relative path is joined
to the data root and must not climb out of it with `..`; an absolute local path is kept when the
data root is local and refused when it is remote (a pod cannot see the annotator's disk).
iTAG and the OSS console write `oss://bucket.oss-<region>.aliyuncs.com/key`: that is read as
oss://bucket/key, and its region must be the configured endpoint's (the only settings the parsers
look at; they do no IO).
"""

from __future__ import annotations

import codecs
import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from imlt.trainer import storage
from imlt.trainer.config import DataFormat
from imlt.trainer.errors import Problem
from imlt.trainer.storage.urls import oss_bucket_has_dot, parse_endpoint_style

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# iTAG stage keys, least to most reviewed: a verify pass overrides a check pass, which
# overrides the first labelling pass. Keys naming none of these are not label stages.
STAGE_RANKS: tuple[tuple[str, int], ...] = (("verify", 3), ("check", 2), ("label", 1))


@dataclass(frozen=True)
class Sample:
    """One annotated image. `labels` are class names or index strings as written; the first is primary."""

    uri: str
    labels: tuple[str, ...]
    line: int


@dataclass
class ParseResult:
    file: str
    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, line: int | None, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))


class PathError(ValueError):
    """An image path that cannot be resolved against the data root."""


def has_scheme(path: str) -> bool:
    return bool(_SCHEME.match(path))


def normalize_root(root: str) -> str:
    """A data root as an absolute URL without a trailing slash (local roots become absolute paths)."""
    if has_scheme(root) and not root.startswith("file://"):
        return root.rstrip("/") if not root.endswith("://") else root
    return os.path.abspath(root.removeprefix("file://"))


def default_data_root(annotation_url: str) -> str:
    """The annotation file's folder: relative image paths are relative to the file that names them."""
    if has_scheme(annotation_url) and not annotation_url.startswith("file://"):
        scheme, _, rest = annotation_url.partition("://")
        folder = posixpath.dirname(rest)
        return f"{scheme}://{folder}" if folder else f"{scheme}://{rest}"
    return os.path.dirname(os.path.abspath(annotation_url.removeprefix("file://")))


def resolve_image_path(path: str, data_root: str) -> str:
    """The absolute image URL for a path as written in an annotation; raises PathError."""
    remote_root = has_scheme(data_root) and not data_root.startswith("file://")
    if has_scheme(path) and not path.startswith("file://"):
        return _oss_object_url(path)
    local_abs = path.startswith("file://") or path.startswith("/")
    if local_abs:
        if remote_root:
            raise PathError(f"absolute local path {path!r} but the data root {data_root} is remote; use a path relative to the data root or a full URL")
        return os.path.normpath(path.removeprefix("file://"))
    rel = posixpath.normpath(path)
    if rel == ".." or rel.startswith("../"):
        raise PathError(f"path {path!r} climbs out of the data root {data_root}")
    if rel == ".":
        raise PathError(f"path {path!r} names the data root, not an image")
    return storage.join(data_root, rel)


def _oss_object_url(url: str) -> str:
    """oss://bucket.oss-<region>.aliyuncs.com/key as oss://bucket/key, its region checked; other URLs as given."""
    styled = parse_endpoint_style(url)
    if styled is None:
        if oss_bucket_has_dot(url):
            raise PathError(f"{url!r}: OSS bucket names have no dots; write oss://bucket/key "
                            "or oss://bucket.oss-<region>.aliyuncs.com/key")
        return url
    settings = storage.current_oss_settings()
    configured = settings.resolved_endpoint()
    region = settings.resolved_region()
    if configured is not None and region != styled.region:
        where = f"region {region}" if region else "no region: set OSS_REGION if it is one"
        raise PathError(f"{url!r} names OSS endpoint {styled.host} (region {styled.region}) but the configured "
                        f"endpoint is {configured} ({where}); point OSS_ENDPOINT/OSS_REGION (or the connection) "
                        "at the bucket's region, or write the image as oss://bucket/key")
    return styled.url


def iter_lines(data: bytes, result: ParseResult) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) of each line, reporting lines that are not UTF-8.

    Hand-split on b"\\n" instead of str.splitlines(): that also splits on \\x0b, \\x1c, U+2028 and
    friends, which would shift line numbers away from what an editor shows.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        result.problem(None, "file is UTF-16; save it as UTF-8")
        return
    data = data.removeprefix(codecs.BOM_UTF8)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            result.problem(number, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8")


def _split_fields(line: str, delimiter: str) -> list[str]:
    if delimiter == " ":
        return line.split()  # runs of spaces or tabs are one separator
    fields = [f.strip() for f in line.split(delimiter)]
    while fields and fields[-1] == "":  # a trailing delimiter (spreadsheet exports) is harmless
        fields.pop()
    return fields


def _add(result: ParseResult, line: int, path: str, labels: list[str], data_root: str) -> None:
    try:
        uri = resolve_image_path(path, data_root)
    except PathError as e:
        result.problem(line, str(e))
        return
    unique = tuple(dict.fromkeys(labels))  # a label repeated on one line counts once
    result.samples.append(Sample(uri=uri, labels=unique, line=line))


def parse_image_list(data: bytes, file: str, data_root: str, delimiter: str = " ") -> ParseResult:
    """ClsSourceImageList: `path label [label...]` a line; blank lines and `#` comments skipped."""
    result = ParseResult(file)
    if delimiter == "":
        raise ValueError("delimiter must not be empty (use ' ' for whitespace)")
    root = normalize_root(data_root)
    shown_delim = "whitespace" if delimiter == " " else repr(delimiter)
    for number, text in iter_lines(data, result):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        fields = _split_fields(text, delimiter)
        if len(fields) < 2:
            result.problem(number, f"expected `path{delimiter}label[{delimiter}label...]` separated by {shown_delim}, got {len(fields)} field: {text.strip()[:80]!r}")
            continue
        if "" in fields:
            result.problem(number, f"empty field (two {shown_delim} delimiters in a row): {text.strip()[:80]!r}")
            continue
        _add(result, number, fields[0], fields[1:], root)
    return result


def stage_rank(key: str) -> int | None:
    """How reviewed an iTAG stage key is (higher wins), or None if the key is not a label stage."""
    k = key.lower()
    if k == "data":
        return None
    return next((rank for word, rank in STAGE_RANKS if word in k), None)


def _answers(results: list[object]) -> list[str] | str:
    """Labels given in a stage's `results`, or an error message."""
    labels: list[str] = []
    for r in results:
        if not isinstance(r, dict):
            return f"a result is {type(r).__name__}, expected an object"
        data = r.get("data")
        items = data if isinstance(data, list) else [] if data is None else [data]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                return f"unsupported answer {item!r} (expected a string or a list of strings)"
            if str(item).strip():
                labels.append(str(item).strip())
    return labels


def _itag_labels(obj: dict[str, object], multi_label: bool) -> tuple[str, list[str]] | str:
    """(stage key, labels) of the most-reviewed stage that has an answer, or an error message.

    Rule: verify > check > label; among keys of one rank the later key in the object wins
    (iTAG appends later passes). A stage with no answer is skipped, so an unfinished review
    falls back to the pass before it.
    """
    stages = [(rank, pos, key) for pos, key in enumerate(obj) if (rank := stage_rank(key)) is not None]
    if not stages:
        return "no label stage (a key containing 'label', 'check' or 'verify')"
    for _, _, key in sorted(stages, reverse=True):
        value = obj[key]
        results = value.get("results") if isinstance(value, dict) else None
        if not isinstance(results, list):
            return f"stage {key!r} has no `results` list"
        labels = _answers(results)
        if isinstance(labels, str):
            return f"stage {key!r}: {labels}"
        if not labels:
            continue
        labels = list(dict.fromkeys(labels))
        if len(labels) > 1 and not multi_label:
            return f"single-choice expected but stage {key!r} gives {len(labels)} labels {labels}; set multi_label=true to accept multi-choice answers"
        return key, labels
    return "no answer in any label stage (" + ", ".join(k for _, _, k in stages) + ")"


def parse_itag(data: bytes, file: str, data_root: str, multi_label: bool = False) -> ParseResult:
    """ClsSourceItag: one JSON object a line; the image is `data.source`, the label a stage's answer."""
    result = ParseResult(file)
    root = normalize_root(data_root)
    for number, text in iter_lines(data, result):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            result.problem(number, f"not valid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            result.problem(number, f"expected a JSON object, got {type(obj).__name__}")
            continue
        data_obj = obj.get("data")
        source = data_obj.get("source") if isinstance(data_obj, dict) else None
        if not isinstance(source, str) or not source.strip():
            result.problem(number, "no image: `data.source` is missing or empty")
            continue
        picked = _itag_labels(obj, multi_label)
        if isinstance(picked, str):
            result.problem(number, picked)
            continue
        _add(result, number, source.strip(), picked[1], root)
    return result


def parse_annotations(
    data: bytes,
    file: str,
    data_format: DataFormat | str,
    data_root: str | None = None,
    delimiter: str = " ",
    multi_label: bool = False,
) -> ParseResult:
    """Parse either format; `data_root` defaults to the annotation file's folder."""
    root = data_root if data_root else default_data_root(file)
    fmt = DataFormat(data_format)
    if fmt == DataFormat.IMAGE_LIST:
        return parse_image_list(data, file, root, delimiter)
    return parse_itag(data, file, root, multi_label)
