"""Annotation parsers and the class list: pure parsing, every problem named by file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imlt.trainer.config import DataFormat, RunConfig
from imlt.trainer.data.annotations import (
    default_data_root,
    parse_annotations,
    parse_image_list,
    parse_itag,
    resolve_image_path,
    PathError,
    stage_rank,
)
from imlt.trainer.data.classes import load_class_names, resolve_labels
from imlt.trainer.errors import DataError

ROOT = "/data/root"
OSS_ROOT = "oss://bkt/set"


def lines(result) -> dict[int, str]:
    return {p.line: p.message for p in result.problems}


# --- ClsSourceImageList ------------------------------------------------------------------------


def test_image_list_space_delimiter_whitespace_runs_comments_blank_lines() -> None:
    text = "# a comment\n\nimg/a.jpg   3\n  \nimg/b.jpg\t1 2\n   # indented comment\noss://bkt/x/c.jpg 0\n"
    r = parse_image_list(text.encode(), "ann.txt", ROOT)
    assert r.problems == []
    assert [(s.uri, s.labels, s.line) for s in r.samples] == [
        ("/data/root/img/a.jpg", ("3",), 3),
        ("/data/root/img/b.jpg", ("1", "2"), 5),
        ("oss://bkt/x/c.jpg", ("0",), 7),
    ]


def test_image_list_custom_delimiter_keeps_spaces_in_paths() -> None:
    text = "my photos/a 1.jpg, cat ,dog\nb.jpg,dog,\n"
    r = parse_image_list(text.encode(), "ann.csv", ROOT, delimiter=",")
    assert r.problems == []
    assert [(s.uri, s.labels) for s in r.samples] == [
        ("/data/root/my photos/a 1.jpg", ("cat", "dog")),
        ("/data/root/b.jpg", ("dog",)),  # a trailing delimiter is tolerated
    ]


def test_image_list_malformed_lines_are_all_reported() -> None:
    text = "a.jpg 1\nlonely.jpg\nb.jpg,,2\nc.jpg 2\n"
    r = parse_image_list(text.encode(), "ann.txt", ROOT)
    assert set(lines(r)) == {2, 3}  # 'b.jpg,,2' is one field when the delimiter is a space
    assert [s.line for s in r.samples] == [1, 4]
    # with ',' the empty middle field is an error of its own
    r2 = parse_image_list("a.jpg,1\nb.jpg,,2\nlonely.jpg\n".encode(), "ann.csv", ROOT, delimiter=",")
    assert set(lines(r2)) == {2, 3}
    assert "empty field" in lines(r2)[2] and "got 1 field" in lines(r2)[3]
    assert [s.line for s in r2.samples] == [1]


def test_image_list_bom_crlf_and_non_utf8_line() -> None:
    data = "\ufeffa.jpg 猫\r\n".encode() + b"b\xff.jpg 1\r\n" + "c.jpg 犬\r\n".encode()
    r = parse_image_list(data, "ann.txt", ROOT)
    assert [(s.uri, s.labels, s.line) for s in r.samples] == [
        ("/data/root/a.jpg", ("猫",), 1),
        ("/data/root/c.jpg", ("犬",), 3),
    ]
    assert set(lines(r)) == {2} and "UTF-8" in lines(r)[2] and "0xff" in lines(r)[2]


def test_utf16_file_is_refused_clearly() -> None:
    r = parse_image_list("a.jpg 1\n".encode("utf-16"), "ann.txt", ROOT)
    assert r.samples == [] and "UTF-16" in r.problems[0].message


def test_repeated_label_on_a_line_counts_once_and_order_is_kept() -> None:
    r = parse_image_list(b"a.jpg 2 0 2\n", "ann.txt", ROOT)
    assert r.samples[0].labels == ("2", "0")


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("img/a.jpg", ROOT, "/data/root/img/a.jpg"),
        ("./img/../img/a.jpg", ROOT, "/data/root/img/a.jpg"),
        ("img/a.jpg", OSS_ROOT, "oss://bkt/set/img/a.jpg"),
        ("oss://other/img/1.jpg", OSS_ROOT, "oss://other/img/1.jpg"),
        ("oss://other/img/1.jpg", ROOT, "oss://other/img/1.jpg"),
        ("/abs/img/a.jpg", ROOT, "/abs/img/a.jpg"),
    ],
)
def test_resolve_image_path(path: str, root: str, expected: str) -> None:
    assert resolve_image_path(path, root) == expected


@pytest.mark.parametrize(
    ("path", "root", "words"),
    [
        ("../secret.jpg", ROOT, "climbs out"),
        ("img/../../x.jpg", OSS_ROOT, "climbs out"),
        ("/home/me/a.jpg", OSS_ROOT, "absolute local path"),
        ("file:///home/me/a.jpg", OSS_ROOT, "absolute local path"),
    ],
)
def test_resolve_image_path_refuses(path: str, root: str, words: str) -> None:
    with pytest.raises(PathError, match=words):
        resolve_image_path(path, root)


def test_path_problems_name_their_line() -> None:
    text = "ok.jpg 1\n../up.jpg 1\n/local/a.jpg 1\n"
    r = parse_image_list(text.encode(), "oss://bkt/set/ann.txt", OSS_ROOT)
    assert [s.line for s in r.samples] == [1]
    assert "climbs out" in lines(r)[2] and "absolute local path" in lines(r)[3]


def test_default_data_root_is_the_annotation_folder(tmp_path: Path) -> None:
    assert default_data_root("oss://bkt/a/b/ann.txt") == "oss://bkt/a/b"
    assert default_data_root("oss://bkt/ann.txt") == "oss://bkt"
    assert default_data_root(str(tmp_path / "ann.txt")) == str(tmp_path)
    r = parse_annotations(b"x/1.jpg 0\n", "oss://bkt/a/ann.txt", DataFormat.IMAGE_LIST)
    assert r.samples[0].uri == "oss://bkt/a/x/1.jpg"
    r = parse_annotations(b"x/1.jpg 0\n", "oss://bkt/a/ann.txt", DataFormat.IMAGE_LIST, data_root="oss://img/base/")
    assert r.samples[0].uri == "oss://img/base/x/1.jpg"


# --- ClsSourceItag ----------------------------------------------------------------------------


def itag(source: str | None, **stages: object) -> str:
    obj: dict[str, object] = {"data": {} if source is None else {"source": source}}
    for key, data in stages.items():
        obj[key.replace("_", "-")] = {"results": [] if data is None else [{"questionId": "1", "data": data, "markTitle": "单选", "type": "survey/value"}]}
    return json.dumps(obj, ensure_ascii=False)


def test_itag_single_choice_the_reference_example() -> None:
    line = '{"data":{"source":"oss://bkt/img/a.jpg"},"label-1433000711494508544":{"results":[{"questionId":"1","data":"cat","markTitle":"单选","type":"survey/value"}]}}'
    r = parse_itag(line.encode(), "m.jsonl", OSS_ROOT)
    assert r.problems == []
    assert [(s.uri, s.labels, s.line) for s in r.samples] == [("oss://bkt/img/a.jpg", ("cat",), 1)]


def test_itag_endpoint_style_source_is_bucket_and_key_checked_against_the_configured_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from imlt.trainer import storage

    monkeypatch.setenv("OSS_ENDPOINT", "https://oss-cn-hangzhou-internal.aliyuncs.com")
    monkeypatch.delenv("OSS_REGION", raising=False)
    storage.configure_oss(None)
    text = "\n".join([
        itag("oss://bkt.oss-cn-hangzhou.aliyuncs.com/img/a.jpg", label_1="cat"),  # internal vs public: one region
        itag("oss://bkt.oss-cn-beijing.aliyuncs.com/img/b.jpg", label_1="dog"),
        itag("oss://bkt.example.com/img/c.jpg", label_1="dog"),
        itag("oss://bkt/img/d.jpg", label_1="dog"),
    ])
    r = parse_itag(text.encode(), "m.jsonl", OSS_ROOT)
    assert [(s.uri, s.line) for s in r.samples] == [("oss://bkt/img/a.jpg", 1), ("oss://bkt/img/d.jpg", 4)]
    problems = lines(r)
    assert set(problems) == {2, 3}
    assert "names OSS endpoint oss-cn-beijing.aliyuncs.com (region cn-beijing) but the configured endpoint is " \
           "https://oss-cn-hangzhou-internal.aliyuncs.com (region cn-hangzhou)" in problems[2]
    assert "OSS bucket names have no dots" in problems[3]


def test_itag_multi_choice_needs_multi_label() -> None:
    text = "\n".join([
        itag("a.jpg", label_1=["cat"]),  # a list with one answer is single-choice
        itag("b.jpg", label_1=["cat", "dog"]),
        itag("c.jpg", label_1="猫"),
    ])
    single = parse_itag(text.encode(), "m.jsonl", ROOT)
    assert [s.labels for s in single.samples] == [("cat",), ("猫",)]
    assert set(lines(single)) == {2} and "single-choice expected" in lines(single)[2]
    multi = parse_itag(text.encode(), "m.jsonl", ROOT, multi_label=True)
    assert multi.problems == []
    assert [s.labels for s in multi.samples] == [("cat",), ("cat", "dog"), ("猫",)]


def test_itag_most_reviewed_stage_wins() -> None:
    text = "\n".join([
        itag("a.jpg", label_1="cat", check_label_2="dog", verify_3="bird"),
        itag("b.jpg", verify_3="bird", label_1="cat", check_label_2="dog"),  # key order does not matter across ranks
        itag("c.jpg", label_1="cat", check_label_2="dog"),
        itag("d.jpg", label_1="cat", check_label_2="dog", verify_3=None),  # unfinished verify: falls back to check
        itag("e.jpg", label_1="cat", label_2="dog"),  # same rank: the later key (a later pass) wins
    ])
    r = parse_itag(text.encode(), "m.jsonl", ROOT)
    assert r.problems == []
    assert [s.labels[0] for s in r.samples] == ["bird", "bird", "dog", "dog", "dog"]
    assert stage_rank("data") is None and stage_rank("created_at") is None
    assert stage_rank("verify-9") > stage_rank("check-label-2") > stage_rank("label-1")


def test_itag_bad_lines_are_all_reported() -> None:
    text = "\n".join([
        itag("a.jpg", label_1="cat"),
        itag(None, label_1="cat"),
        "{not json",
        json.dumps({"data": {"source": "b.jpg"}}),
        itag("c.jpg", label_1=None),
        "[1, 2]",
        json.dumps({"data": {"source": "d.jpg"}, "label-1": {"results": [{"data": {"x": 1}}]}}),
        "",
        itag("e.jpg", label_1="dog"),
    ])
    r = parse_itag(text.encode(), "m.jsonl", ROOT)
    msgs = lines(r)
    assert [s.line for s in r.samples] == [1, 9]
    assert "data.source" in msgs[2]
    assert "not valid JSON" in msgs[3]
    assert "no label stage" in msgs[4]
    assert "no answer" in msgs[5]
    assert "JSON object" in msgs[6]
    assert "unsupported answer" in msgs[7]


# --- class list ---------------------------------------------------------------------------------


def test_class_list_inline_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a bare name must not be mistaken for a file here
    assert load_class_names(None) == (None, "")
    assert load_class_names(["b", "a", "猫"])[0] == ["b", "a", "猫"]
    assert load_class_names(" b, a ,猫 ")[0] == ["b", "a", "猫"]
    assert load_class_names("cat")[0] == ["cat"]
    with pytest.raises(DataError, match=r"class_names:3: class 'b' listed twice"):
        load_class_names("b,a,b")
    with pytest.raises(DataError, match="empty"):
        load_class_names(" , ")


def test_class_list_file(tmp_path: Path) -> None:
    f = tmp_path / "classes.txt"
    f.write_bytes("\ufeffzebra\r\n猫\r\n\r\nant\r\n".encode())
    assert load_class_names(str(f)) == (["zebra", "猫", "ant"], str(f))
    assert load_class_names([str(f)])[0] == ["zebra", "猫", "ant"]  # RunConfig's form of a path
    cfg = RunConfig(output_dir=str(tmp_path / "o"), data={"class_names": str(f)})
    assert load_class_names(cfg.data.class_names)[0] == ["zebra", "猫", "ant"]
    f.write_text("a\nb\na\n")
    with pytest.raises(DataError, match=rf"{f}:3: class 'a' listed twice \(first at {f}:1\)"):
        load_class_names(str(f))
    with pytest.raises(DataError, match="class list file not found"):
        load_class_names(str(tmp_path / "missing.txt"))


def _labels(text: str, classes: list[str] | None):
    parsed = parse_image_list(text.encode(), "ann.txt", ROOT)
    assert parsed.problems == []
    return resolve_labels(parsed, classes)


def test_labels_without_class_list() -> None:
    assert _labels("a.jpg 3\nb.jpg 1 0\n", None) == (["0", "1", "2", "3"], [[3], [1, 0]], [])
    assert _labels("a.jpg zebra\nb.jpg ant 猫\n", None) == (["ant", "zebra", "猫"], [[1], [0, 2]], [])
    classes, ids, problems = _labels("a.jpg 3\nb.jpg cat\n", None)
    assert len(problems) == 1 and problems[0].line == 2 and "mix class indices" in problems[0].message


def test_labels_with_class_list_names_and_indices() -> None:
    classes, ids, problems = _labels("a.jpg dog\nb.jpg 0 dog\nc.jpg 猫\n", ["cat", "dog", "猫"])
    assert (classes, ids, problems) == (["cat", "dog", "猫"], [[1], [0, 1], [2]], [])


def test_unknown_and_out_of_range_labels_name_their_line() -> None:
    classes, ids, problems = _labels("a.jpg dog\nb.jpg 7\nc.jpg cow\nd.jpg 2\n", ["cat", "dog", "猫"])
    assert [(p.file, p.line) for p in problems] == [("ann.txt", 2), ("ann.txt", 3)]
    assert "label 7 out of range" in problems[0].message and "3 classes" in problems[0].message
    assert "unknown class 'cow'" in problems[1].message
    assert ids == [[1], [], [], [2]]


def test_both_formats_give_the_same_samples() -> None:
    image_list = "a.jpg cat\nsub/b.jpg dog cat\noss://bkt/c.jpg 猫\n"
    itag_text = "\n".join([itag("a.jpg", label_1="cat"), itag("sub/b.jpg", label_1=["dog", "cat"]), itag("oss://bkt/c.jpg", label_1="猫")])
    a = parse_annotations(image_list.encode(), "/d/ann.txt", DataFormat.IMAGE_LIST)
    b = parse_annotations(itag_text.encode(), "/d/m.jsonl", DataFormat.ITAG, multi_label=True)
    assert a.problems == b.problems == []
    assert a.samples == b.samples
    assert resolve_labels(a, None) == resolve_labels(b, None)
