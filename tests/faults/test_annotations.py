"""Case 1: bad annotation files, each through a real `imlt read-data` (and `imlt validate`) run.

A rejected file exits 1, prints `file:line: problem` for every bad line and writes nothing; the
accepted oddities (BOM, CRLF, non-ASCII names, duplicates) give the same dataset as a clean file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import imlt
from tests.support.images import png_bytes, write_text
from imlt.trainer.data.manifest import read_classes, read_manifest

CLEAN = "img/a0.png cat\nimg/a1.png cat\nimg/b0.png dog\nimg/b1.png dog\n"


def itag(source: str | None, answer: object) -> str:
    data = {} if source is None else {"source": source}
    return json.dumps({"data": data, "label-1433000711494508544": {"results": [
        {"questionId": "1", "data": answer, "markTitle": "单选", "type": "survey/value"}]}}, ensure_ascii=False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for i, name in enumerate(["a0", "a1", "b0", "b1"]):
        write_text(tmp_path / "set" / "img" / f"{name}.png", png_bytes((40 * i, 90, 200), seed=i))
    return tmp_path / "set"


# (case id, file name, file bytes, extra read-data flags, bad line numbers, words in each line's message)
REJECTED = [
    ("malformed-line", "ann.txt", b"img/a0.png cat\nimg/a1.png\nimg/b0.png dog\n", [], {2: "got 1 field"}),
    ("empty-file", "ann.txt", b"", [], {None: "no samples: the file holds no annotation lines"}),
    ("wrong-delimiter", "ann.txt", b"img/a0.png,cat\nimg/a1.png,cat\n", [], {1: "separated by whitespace, got 1 field", 2: "got 1 field"}),
    ("wrong-delimiter-flag", "ann.txt", CLEAN.encode(), ["--delimiter", ","], {1: "separated by ',', got 1 field", 2: "got 1 field", 3: "got 1 field", 4: "got 1 field"}),
    ("non-utf8-bytes", "ann.txt", b"img/a0.png cat\nimg/a\xff1.png cat\nimg/b0.png dog\n", [], {2: "not valid UTF-8 (byte 0xff at column 6)"}),
    ("label-index-out-of-range", "ann.txt", b"img/a0.png 0\nimg/a1.png 7\n", ["--class-names", "cat,dog"], {2: "label 7 out of range: the class list has 2 classes"}),
    ("unknown-class-name", "ann.txt", b"img/a0.png cat\nimg/a1.png cow\n", ["--class-names", "cat,dog"], {2: "unknown class 'cow'"}),
    ("itag-without-data-source", "m.jsonl", (itag("img/a0.png", "cat") + "\n" + itag(None, "dog") + "\n").encode(), ["--data-format", "ClsSourceItag"], {2: "data.source"}),
    ("itag-multi-choice-for-single", "m.jsonl", (itag("img/a0.png", "cat") + "\n" + itag("img/b0.png", ["cat", "dog"]) + "\n").encode(), ["--data-format", "ClsSourceItag"], {2: "single-choice expected"}),
    ("path-escapes-root", "ann.txt", b"img/a0.png cat\n../../etc/passwd cat\nimg/../../x.png dog\n", [], {2: "climbs out of the data root", 3: "climbs out of the data root"}),
]


@pytest.mark.parametrize(("name", "data", "flags", "bad"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_rejected_annotation_files_name_file_and_line_and_write_nothing(
    root: Path, tmp_path: Path, name: str, data: bytes, flags: list[str], bad: dict[int | None, str]
) -> None:
    ann = write_text(root / name, data)
    out = tmp_path / "dataset"
    ran = imlt("read-data", "--annotations", ann, "--output-dir", out, *flags)
    assert ran.exit_code == 1, ran.output
    assert ran.exception is None  # a message, not a traceback
    assert f"rejected: {len(bad)} problem" in ran.output
    for line, words in bad.items():
        where = f"{ann}:{line}: " if line else f"{ann}: "
        shown = [row for row in ran.output.splitlines() if row.startswith(where)]
        assert shown and words in shown[0], ran.output
    assert not out.exists()


def test_absolute_local_path_in_an_oss_annotation_file(oss_server, tmp_path: Path) -> None:
    from imlt.trainer import storage

    storage.write_bytes(oss_server.url("set/img/a0.png"), png_bytes((200, 0, 0), seed=0))
    ann = oss_server.url("set/ann.txt")
    storage.write_text(ann, f"img/a0.png cat\n{tmp_path}/img/a1.png cat\nfile:///data/b0.png dog\n")
    before, puts = set(oss_server.keys()), oss_server.count("PutObject")
    ran = imlt("read-data", "--annotations", ann, "--output-dir", oss_server.url("dataset"))
    assert ran.exit_code == 1, ran.output
    assert f"{ann}:2: absolute local path '{tmp_path}/img/a1.png' but the data root oss://test-bucket/set is remote" in ran.output
    assert f"{ann}:3: absolute local path 'file:///data/b0.png'" in ran.output
    assert set(oss_server.keys()) == before  # nothing written
    assert oss_server.count("PutObject") == puts


def test_bom_and_crlf_give_the_same_dataset_as_a_clean_file(root: Path, tmp_path: Path) -> None:
    clean = write_text(root / "clean.txt", CLEAN)
    windows = write_text(root / "windows.txt", b"\xef\xbb\xbf" + CLEAN.replace("\n", "\r\n").encode())
    for ann, out in ((clean, tmp_path / "a"), (windows, tmp_path / "b")):
        ran = imlt("read-data", "--annotations", ann, "--output-dir", out)
        assert ran.exit_code == 0, ran.output
    a, b = read_manifest(str(tmp_path / "a")), read_manifest(str(tmp_path / "b"))
    assert [(r.uri, r.labels) for r in a] == [(r.uri, r.labels) for r in b]
    assert read_classes(str(tmp_path / "b")) == ["cat", "dog"]  # no '\ufeff' glued to a name, no '\r'


def test_non_ascii_class_names_round_trip(root: Path, tmp_path: Path) -> None:
    classes = write_text(tmp_path / "classes.txt", "猫\nsobaka собака\nÉlan\n")
    ann = write_text(root / "ann.txt", "img/a0.png 猫\nimg/a1.png 猫\nimg/b0.png 2\nimg/b1.png Élan\n")
    ran = imlt("read-data", "--annotations", ann, "--output-dir", tmp_path / "ds", "--class-names", classes)
    assert ran.exit_code == 0, ran.output
    assert read_classes(str(tmp_path / "ds")) == ["猫", "sobaka собака", "Élan"]
    assert [r.labels for r in read_manifest(str(tmp_path / "ds"))] == [[0], [0], [2], [2]]
    assert "猫" in (tmp_path / "ds" / "classes.txt").read_bytes().decode("utf-8")  # stored as UTF-8, not escaped


def test_duplicate_lines_are_a_warning_with_both_lines_named(root: Path, tmp_path: Path) -> None:
    ann = write_text(root / "ann.txt", CLEAN + "img/a0.png cat\n")
    assert imlt("read-data", "--annotations", ann, "--output-dir", tmp_path / "ds").exit_code == 0
    ran = imlt("validate", "--dataset-dir", tmp_path / "ds", "--output-dir", tmp_path / "val", "--workers", "1")
    assert ran.exit_code == 0, ran.output
    report = json.loads((tmp_path / "val" / "validation.json").read_text())
    assert report["ok"] and report["errors"] == []
    assert {"file": str(ann), "line": 5, "message": f"duplicate of {ann}:1 (same image and labels)"} in report["warnings"]
