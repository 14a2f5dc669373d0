"""The read_data and validate steps end to end on tiny real images in tmp_path."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support.images import image_bytes
from imlt.trainer.config import DataFormat
from imlt.trainer.data.manifest import read_classes, read_manifest, read_summary
from imlt.trainer.errors import DataError
from imlt.trainer.steps import ReadDataInput, ValidateInput, read_data, validate


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def itag_line(source: str, *labels: str) -> str:
    data: object = labels[0] if len(labels) == 1 else list(labels)
    return json.dumps({"data": {"source": source}, "label-14330007": {"results": [{"questionId": "1", "data": data}]}}, ensure_ascii=False)


@pytest.fixture
def images(make_image) -> Path:
    """img/{a0,a1,b0,b1,c0}.png: three classes' worth of tiny PNGs; returns their folder's parent."""
    for i, name in enumerate(["a0", "a1", "b0", "b1", "c0"]):
        root = make_image(f"img/{name}.png", seed=i).parent.parent
    return root


# --- read_data ----------------------------------------------------------------------------------


def test_read_data_writes_the_dataset_folder(tmp_path: Path, images: Path) -> None:
    ann = write(images / "ann.txt", "img/a0.png cat\nimg/a1.png cat\n# c\nimg/b0.png 狗 cat\n")
    out = read_data(ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=ann, class_names="cat,狗,bird"))
    assert out.classes == ["cat", "狗", "bird"] and out.num_samples == 3 and out.num_classes == 3
    records = read_manifest(out.dataset_dir)
    assert [(r.uri, r.labels, r.source) for r in records] == [
        (str(images / "img/a0.png"), [0], f"{ann}:1"),
        (str(images / "img/a1.png"), [0], f"{ann}:2"),
        (str(images / "img/b0.png"), [1, 0], f"{ann}:4"),
    ]
    assert read_classes(out.dataset_dir) == ["cat", "狗", "bird"]
    summary = read_summary(out.dataset_dir)
    assert summary.images_per_class == {"cat": 2, "狗": 1, "bird": 0}
    assert summary.multi_label_samples == 1 and summary.data_format == "ClsSourceImageList"


def test_acceptance_bad_lines_rejected_with_file_line_and_nothing_written(tmp_path: Path, images: Path) -> None:
    ann = write(images / "ann.txt", "img/a0.png 0\nimg/a1.png\nimg/b0.png 1\nimg/b1.png 5\nimg/c0.png 2\n")
    out_dir = tmp_path / "ds"
    with pytest.raises(DataError) as e:
        read_data(ReadDataInput(output_dir=str(out_dir), annotations=ann, class_names=["a", "b", "c"]))
    assert [(p.file, p.line) for p in e.value.problems] == [(ann, 2), (ann, 4)]
    msg = str(e.value)
    assert f"{ann}:2: expected" in msg
    assert f"{ann}:4: label 5 out of range" in msg
    assert "2 problems" in msg
    assert not out_dir.exists()


def test_unknown_class_name_is_fatal(tmp_path: Path, images: Path) -> None:
    ann = write(images / "ann.txt", "img/a0.png cat\nimg/a1.png cow\n")
    with pytest.raises(DataError, match=r"ann.txt:2: unknown class 'cow'"):
        read_data(ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=ann, class_names=["cat", "dog"]))
    assert not (tmp_path / "ds").exists()


def test_class_list_from_a_file(tmp_path: Path, images: Path) -> None:
    classes = write(tmp_path / "names" / "classes.txt", "狗\ncat\n")
    ann = write(images / "ann.txt", "img/a0.png cat\nimg/b0.png 狗\n")
    out = read_data(ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=ann, class_names=classes))
    assert out.classes == ["狗", "cat"]
    assert [r.labels for r in read_manifest(out.dataset_dir)] == [[1], [0]]


def test_upstream_annotations_win(tmp_path: Path, images: Path) -> None:
    mine = write(images / "mine.txt", "img/a0.png x\n")
    upstream = write(images / "up.txt", "img/b0.png y\n")
    out = read_data(ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=mine, upstream_annotations=upstream))
    assert out.classes == ["y"]
    assert read_summary(out.dataset_dir).annotations == upstream


def test_no_annotations_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no annotations: give annotations or connect an upstream step"):
        read_data(ReadDataInput(output_dir=str(tmp_path / "ds")))
    with pytest.raises(DataError, match="annotation file not found"):
        read_data(ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=str(tmp_path / "nope.txt")))


def test_data_root_and_custom_delimiter(tmp_path: Path, images: Path) -> None:
    ann = write(tmp_path / "elsewhere" / "ann.csv", "img/a0.png,0\nimg/c0.png,1,0\n")
    out = read_data(ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=ann, data_root=str(images), delimiter=","))
    assert out.classes == ["0", "1"]
    assert [(r.uri, r.labels) for r in read_manifest(out.dataset_dir)] == [
        (str(images / "img/a0.png"), [0]),
        (str(images / "img/c0.png"), [1, 0]),
    ]


def test_cache_images_copies_and_points_at_the_cache(tmp_path: Path, images: Path) -> None:
    ann = write(images / "ann.txt", "img/a0.png 0\nimg/a0.png 0\nimg/b1.png 1\n")
    ds = tmp_path / "ds"
    out = read_data(ReadDataInput(output_dir=str(ds), annotations=ann, cache_images=True))
    records = read_manifest(out.dataset_dir)
    assert all(r.uri.startswith(str(ds / "images") + "/") for r in records)
    assert records[0].uri == records[1].uri != records[2].uri
    assert Path(records[0].uri).read_bytes() == (images / "img/a0.png").read_bytes()
    assert Path(records[2].uri).read_bytes() == (images / "img/b1.png").read_bytes()
    assert len(list((ds / "images").iterdir())) == 2
    assert read_summary(out.dataset_dir).cached_images


def test_cache_images_of_a_missing_image_fails_without_a_dataset(tmp_path: Path, images: Path) -> None:
    ann = write(images / "ann.txt", "img/a0.png 0\nimg/gone.png 1\n")
    ds = tmp_path / "ds"
    with pytest.raises(DataError, match=r"ann.txt:2: cannot copy image"):
        read_data(ReadDataInput(output_dir=str(ds), annotations=ann, cache_images=True))
    assert not (ds / "manifest.jsonl").exists() and not (ds / "summary.json").exists()
    assert not any(p.is_file() for p in ds.rglob("*")) if ds.exists() else True


def test_both_formats_give_the_same_manifest(tmp_path: Path, images: Path) -> None:
    """The same data as an ImageList and as an iTAG export: identical records apart from source."""
    ann = write(images / "ann.txt", "img/a0.png cat\nimg/b0.png 狗 cat\noss://bkt/x.jpg 狗\n")
    manifest = write(images / "m.jsonl", "\n".join([
        itag_line("img/a0.png", "cat"), itag_line("img/b0.png", "狗", "cat"), itag_line("oss://bkt/x.jpg", "狗"),
    ]) + "\n")
    a = read_data(ReadDataInput(output_dir=str(tmp_path / "a"), annotations=ann))
    b = read_data(ReadDataInput(output_dir=str(tmp_path / "b"), annotations=manifest,
                                data_format=DataFormat.ITAG, multi_label=True))
    ra, rb = read_manifest(a.dataset_dir), read_manifest(b.dataset_dir)
    assert [r.model_dump(exclude={"source"}) for r in ra] == [r.model_dump(exclude={"source"}) for r in rb]
    assert [r.source for r in rb] == [f"{manifest}:{i}" for i in (1, 2, 3)]
    assert a.classes == b.classes == ["cat", "狗"]
    assert (tmp_path / "a/classes.txt").read_bytes() == (tmp_path / "b/classes.txt").read_bytes()


def test_itag_multi_choice_without_multi_label_is_rejected(tmp_path: Path, images: Path) -> None:
    manifest = write(images / "m.jsonl", itag_line("img/a0.png", "cat") + "\n" + itag_line("img/b0.png", "dog", "cat") + "\n")
    with pytest.raises(DataError, match=r"m.jsonl:2: single-choice expected"):
        read_data(ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=manifest, data_format=DataFormat.ITAG))


# --- validate -----------------------------------------------------------------------------------


def dataset(tmp_path: Path, ann_text: str, **kw: object) -> str:
    ann = write(tmp_path / "ann.txt", ann_text)
    return read_data(ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=ann, **kw)).dataset_dir


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_validate_missing_and_corrupt_images_fail_with_file_line(tmp_path: Path, make_image) -> None:
    make_image("img/a0.png", seed=1)
    make_image("img/a1.png", seed=2)
    make_image("img/b0.png", seed=3)
    good = image_bytes((32, 32), seed=4)
    (tmp_path / "img/b1.png").write_bytes(good[: len(good) // 2])  # truncated: header fine, data cut
    (tmp_path / "img/b2.jpg").write_bytes(b"")
    ds = dataset(tmp_path, "img/a0.png 0\nimg/a1.png 0\nimg/b0.png 1\nimg/b1.png 1\nimg/gone.png 1\nimg/b2.jpg 1\n")
    out = tmp_path / "val"
    with pytest.raises(DataError) as e:
        validate(ValidateInput(dataset_dir=ds, output_dir=str(out), workers=2))
    ann = str(tmp_path / "ann.txt")
    assert [(p.file, p.line) for p in e.value.problems] == [(ann, 4), (ann, 5), (ann, 6)]
    msg = str(e.value)
    assert f"{ann}:4: cannot decode image" in msg
    assert f"{ann}:5: image not found" in msg
    assert f"{ann}:6: image file is empty" in msg
    report = json.loads((out / "validation.json").read_text())
    assert report["ok"] is False
    assert [(x["file"], x["line"]) for x in report["errors"]] == [(ann, 4), (ann, 5), (ann, 6)]
    assert report["per_class"] == {"0": 2, "1": 4}
    page = _Text()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    assert "svg" in page.tags and "table" in page.tags
    assert "FAILED" in page.text and any("image not found" in t for t in page.text)


def test_validate_ok_with_warnings(tmp_path: Path, make_image) -> None:
    for i in range(11):
        make_image(f"img/a{i}.png", seed=i)
    make_image("img/gray.png", mode="L")
    make_image("img/cmyk.jpg", mode="CMYK")
    make_image("img/rgba.png", mode="RGBA")
    lines = [f"img/a{i}.png 狗" for i in range(11)]
    lines += ["img/gray.png 猫", "img/cmyk.jpg 猫", "img/a0.png 狗", "img/rgba.png 狗 猫", "img/a1.png 猫"]
    ds = dataset(tmp_path, "\n".join(lines) + "\n")
    out = validate(ValidateInput(dataset_dir=ds, output_dir=str(tmp_path / "val"), imbalance_ratio=4, workers=2))
    assert out.ok and out.num_errors == 0
    report = json.loads((tmp_path / "val/validation.json").read_text())
    assert report["ok"] is True and report["errors"] == []
    ann = str(tmp_path / "ann.txt")
    warnings = {(w["line"], w["message"].split(" ")[0]) for w in report["warnings"] if w["file"] == ann}
    assert (14, "duplicate") in warnings  # same image, same label as line 1
    assert (16, "image") in warnings  # a1.png again with another label
    messages = " ".join(w["message"] for w in report["warnings"])
    assert "with L images" in messages and "with CMYK images" in messages and "with RGBA images" in messages
    assert "class imbalance" in messages  # 狗 13 vs 猫 3: 4.3x > 4
    assert out.num_warnings == len(report["warnings"]) == 6
    assert report["per_class"] == {"狗": 13, "猫": 3}
    assert report["counts"]["modes"] == {"CMYK": 1, "L": 1, "RGB": 11, "RGBA": 1}
    assert "猫" in (tmp_path / "val/report.html").read_text(encoding="utf-8")


def test_validate_small_class_is_fatal_and_names_classes_txt(tmp_path: Path, make_image) -> None:
    for name in ["a0", "a1", "b0"]:
        make_image(f"img/{name}.png")
    ds = dataset(tmp_path, "img/a0.png x\nimg/a1.png x\nimg/b0.png y\n", class_names="x,y,unused")
    with pytest.raises(DataError, match=r"classes.txt:2: class 'y' has 1 image, fewer than min_images_per_class=2") as e:
        validate(ValidateInput(dataset_dir=ds, output_dir=str(tmp_path / "val"), workers=1))
    assert len(e.value.problems) == 1  # 'unused' has no images: fine
    out = validate(ValidateInput(dataset_dir=ds, output_dir=str(tmp_path / "val"), min_images_per_class=1, workers=1))
    assert out.ok


def test_validate_refuses_huge_images_without_decoding_them(tmp_path: Path, make_image) -> None:
    make_image("img/a0.png")
    make_image("img/a1.png")
    big = image_bytes((200, 100), seed=5)
    (tmp_path / "img/big.png").write_bytes(big[: len(big) // 3])  # cut: a full decode would fail differently
    ds = dataset(tmp_path, "img/a0.png 0\nimg/a1.png 0\nimg/big.png 0\n")
    with pytest.raises(DataError, match=r"ann.txt:3: image is 200x100 = 20000 pixels, above max_image_pixels=1000"):
        validate(ValidateInput(dataset_dir=ds, output_dir=str(tmp_path / "val"), max_image_pixels=1000, workers=1))


def test_validate_label_out_of_range_in_a_manifest(tmp_path: Path, make_image) -> None:
    """A dataset folder written by other tools: labels are checked against classes.txt."""
    a, b = make_image("img/a.png"), make_image("img/b.png")
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "classes.txt").write_text("cat\n")
    (ds / "manifest.jsonl").write_text(
        json.dumps({"uri": str(a), "labels": [0], "source": "src.txt:1"}) + "\n"
        + json.dumps({"uri": str(b), "labels": [0, 3], "source": "src.txt:2"}) + "\n"
    )
    with pytest.raises(DataError, match=r"src.txt:2: label id 3 out of range: classes.txt has 1 classes"):
        validate(ValidateInput(dataset_dir=str(ds), output_dir=str(tmp_path / "val"), workers=1))
    assert (tmp_path / "val/report.html").exists()


def test_validate_needs_a_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a dataset folder"):
        validate(ValidateInput(dataset_dir=str(tmp_path / "none"), output_dir=str(tmp_path / "val")))


def test_report_of_many_classes_shows_the_size_distribution() -> None:
    from imlt.trainer.data.report import MAX_BARS, class_chart_svg

    per_class = {f"c{i}": 1 + i % 7 for i in range(MAX_BARS * 3)}
    svg = class_chart_svg(per_class)
    assert svg.startswith("<svg") and "Class sizes (180 classes)" in svg
    assert "c17" not in svg  # no per-class tick labels at this size


# --- the same steps on oss:// (the OSS-dialect test server; the oss2 client is real) --------------


def test_read_and_validate_on_oss(oss_server, tmp_path: Path) -> None:
    from imlt.trainer import storage

    for i, name in enumerate(["a0", "a1", "b0", "b1"]):
        storage.write_bytes(oss_server.url(f"set/img/{name}.png"), image_bytes(seed=i))
    storage.write_bytes(oss_server.url("set/img/bad.png"), b"not an image")
    storage.write_text(oss_server.url("meta/classes.txt"), "猫\n狗\n")
    ann = oss_server.url("set/ann.txt")
    storage.write_text(ann, "img/a0.png 猫\nimg/a1.png 猫\nimg/b0.png 狗\nimg/b1.png 1\n")
    out = read_data(ReadDataInput(output_dir=oss_server.url("ds"), annotations=ann,
                                  class_names=oss_server.url("meta/classes.txt"), cache_images=True))
    assert out.dataset_dir == oss_server.url("ds") and out.classes == ["猫", "狗"]
    records = read_manifest(out.dataset_dir)
    assert all(r.uri.startswith(oss_server.url("ds/images/")) for r in records)
    assert [r.source for r in records] == [f"{ann}:{n}" for n in (1, 2, 3, 4)]
    ok = validate(ValidateInput(dataset_dir=out.dataset_dir, output_dir=oss_server.url("val"), workers=2))
    assert ok.ok and ok.report_html == oss_server.url("val/report.html")
    assert json.loads(storage.read_text(oss_server.url("val/validation.json")))["counts"]["images"] == 4

    # rejected input writes nothing; a bad image fails validate with its oss:// file:line
    keys = set(oss_server.keys())
    storage.write_text(ann, "img/a0.png 猫\n/home/me/x.png 狗\nimg/bad.png 狗\nimg/b0.png 狗\nimg/gone.png 猫\n")
    with pytest.raises(DataError, match=rf"{ann}:2: absolute local path"):
        read_data(ReadDataInput(output_dir=oss_server.url("ds2"), annotations=ann))
    assert set(oss_server.keys()) == keys
    storage.write_text(ann, "img/a0.png 猫\nimg/bad.png 狗\nimg/b0.png 狗\nimg/gone.png 猫\n")
    ds = read_data(ReadDataInput(output_dir=oss_server.url("ds3"), annotations=ann)).dataset_dir
    with pytest.raises(DataError) as e:
        validate(ValidateInput(dataset_dir=ds, output_dir=oss_server.url("val3"), workers=2))
    assert [str(p) for p in e.value.problems] == [
        f"{ann}:2: not an image (unknown or corrupt format): {oss_server.url('set/img/bad.png')}",
        f"{ann}:4: image not found: {oss_server.url('set/img/gone.png')}",
    ]
    assert storage.exists(oss_server.url("val3/report.html"))


def test_a_bad_class_list_is_reported_with_the_annotation_problems(tmp_path: Path, images: Path) -> None:
    classes = write(tmp_path / "classes.txt", "cat\ndog\ncat\n")
    ann = write(images / "ann.txt", "img/a0.png cat\nimg/a1.png\n")
    with pytest.raises(DataError) as e:
        read_data(ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=ann, class_names=classes))
    assert [(p.file, p.line) for p in e.value.problems] == [(ann, 2), (classes, 3)]
    assert not (tmp_path / "ds").exists()
