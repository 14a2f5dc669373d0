"""The class list: where label order comes from, and turning written labels into label ids.

A class list may be given inline (a list, or 'a,b,c') or as a file (local or oss://) with one
name a line. With a list, a label is a class name, or else an index into the list; anything
else is an error. Without one, the labels decide: all indices -> classes "0".."max"; all names
-> the sorted unique names; a mix is ambiguous and refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from imlt.trainer import storage
from imlt.trainer.config import looks_like_path  # the same path-or-inline rule RunConfig applies
from imlt.trainer.data.annotations import ParseResult, iter_lines
from imlt.trainer.errors import DataError, Problem

_INDEX = re.compile(r"[0-9]+")  # not str.isdigit(): that accepts '²' and other digit forms
INLINE = "class_names"


def is_index(label: str) -> bool:
    return bool(_INDEX.fullmatch(label))


def _is_file_spec(spec: str) -> bool:
    return looks_like_path(spec) or ("," not in spec and storage.exists(spec))


def load_class_names(spec: Sequence[str] | str | None) -> tuple[list[str] | None, str]:
    """(names, where they came from) for a class_names value; (None, "") when none is given.

    A one-element list holding a path is a file too: RunConfig turns a path string into that.
    """
    if spec is None:
        return None, ""
    if isinstance(spec, str):
        if _is_file_spec(spec.strip()):
            return _read_class_file(spec.strip()), spec.strip()
        names = [s.strip() for s in spec.split(",")]
    else:
        names = [str(s).strip() for s in spec]
        if len(names) == 1 and _is_file_spec(names[0]):
            return _read_class_file(names[0]), names[0]
    names = [n for n in names if n]
    problems = _check_names([(i, n) for i, n in enumerate(names, start=1)], INLINE)
    if not names:
        problems.append(Problem(INLINE, None, "the class list is empty"))
    if problems:
        raise DataError(problems, "bad class list")
    return names, INLINE


def _read_class_file(url: str) -> list[str]:
    if not storage.exists(url):
        raise DataError([Problem(url, None, "class list file not found")], "bad class list")
    parsed = ParseResult(url)
    numbered = [(n, text.strip()) for n, text in iter_lines(storage.read_bytes(url), parsed) if text.strip()]
    problems = parsed.problems + _check_names(numbered, url)
    if not numbered and not parsed.problems:
        problems.append(Problem(url, None, "the class list file holds no names"))
    if problems:
        raise DataError(problems, "bad class list")
    return [name for _, name in numbered]


def _check_names(numbered: list[tuple[int, str]], file: str) -> list[Problem]:
    problems, first = [], {}
    for line, name in numbered:
        if "\n" in name or "\r" in name:
            problems.append(Problem(file, line, f"class name {name!r} holds a line break"))
        elif name in first:
            problems.append(Problem(file, line, f"class {name!r} listed twice (first at {file}:{first[name]})"))
        else:
            first[name] = line
    return problems


def _short(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} classes)" if len(names) > limit else "")


def resolve_labels(parsed: ParseResult, class_names: list[str] | None) -> tuple[list[str], list[list[int]], list[Problem]]:
    """(classes, label ids per sample, problems). Samples with a bad label get an empty id list."""
    if class_names is None:
        class_names, problems = _infer_classes(parsed)
        if problems:
            return class_names, [[] for _ in parsed.samples], problems
    ids_by_name = {name: i for i, name in enumerate(class_names)}
    n = len(class_names)
    all_ids: list[list[int]] = []
    problems = []
    for s in parsed.samples:
        ids: list[int] = []
        for label in s.labels:
            if label in ids_by_name:
                ids.append(ids_by_name[label])
            elif is_index(label) and int(label) < n:
                ids.append(int(label))
            elif is_index(label):
                problems.append(Problem(parsed.file, s.line, f"label {label} out of range: the class list has {n} classes (ids 0..{n - 1})"))
            else:
                problems.append(Problem(parsed.file, s.line, f"unknown class {label!r} (not in the class list: {_short(class_names)})"))
        all_ids.append(list(dict.fromkeys(ids)) if len(ids) == len(s.labels) else [])
    return class_names, all_ids, problems


def _infer_classes(parsed: ParseResult) -> tuple[list[str], list[Problem]]:
    first_index = next(((s.line, l) for s in parsed.samples for l in s.labels if is_index(l)), None)
    first_name = next(((s.line, l) for s in parsed.samples for l in s.labels if not is_index(l)), None)
    if first_index and first_name:
        line = max(first_index[0], first_name[0])
        return [], [Problem(parsed.file, line, (
            f"labels mix class indices ({first_index[1]!r} at line {first_index[0]}) and class names "
            f"({first_name[1]!r} at line {first_name[0]}); give class_names to fix the label order"))]
    if first_name:
        return sorted({l for s in parsed.samples for l in s.labels}), []
    top = max((int(l) for s in parsed.samples for l in s.labels), default=-1)
    return [str(i) for i in range(top + 1)], []
