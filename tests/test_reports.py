"""The reports people read, checked on their HTML/Markdown content (scripts/screenshot_reports.py
screenshots the same pages in a headless browser; pixels are not tested here)."""

from __future__ import annotations

import html
import re

import pytest

from imlt.trainer.data.report import MAX_BARS, TOP_ERRORS, render_html
from imlt.trainer.data.validation import Counts, ProblemEntry, ValidationResult
from imlt.trainer.history import EpochStats, best_epoch, table_columns, training_curve_html

LONG = "/data/" + "a_very_long_folder_name_" * 8 + "/img.png"


def result(per_class: dict[str, int], errors: int = 0, warnings: int = 0) -> ValidationResult:
    errs = [ProblemEntry(file="/data/ann.txt", line=i + 1, message=f"image not found: {LONG}{i}") for i in range(errors)]
    warns = [ProblemEntry(file="/data/ann.txt", line=None, message="class imbalance") for _ in range(warnings)]
    return ValidationResult(
        ok=not errs, dataset_dir=LONG.rsplit("/", 1)[0], settings={"min_images_per_class": 2, "imbalance_ratio": 10.0,
                                                                   "max_image_pixels": 50_000_000},
        counts=Counts(samples=sum(per_class.values()), images=sum(per_class.values()), classes=len(per_class),
                      classes_present=sum(1 for n in per_class.values() if n), multi_label_samples=0,
                      errors=len(errs), warnings=len(warns)),
        per_class=per_class, errors=errs, warnings=warns)


def test_validation_verdict_and_first_errors_come_first() -> None:
    page = render_html(result({"a": 24, "b": 2}, errors=12, warnings=1), split="train")
    verdict = page.index("class='verdict failed'")
    assert "12 errors, 1 warning" in page[verdict:verdict + 300]
    # the first TOP_ERRORS errors are repeated in the verdict, before any other section
    box = page[verdict:page.index("<h2")]
    assert box.count("<li>") == TOP_ERRORS and "ann.txt:1)" in box and "All 12 below" in box
    assert page.index("<h2") > verdict and page.index("<svg") > verdict


def test_validation_title_names_the_split_and_settings_sit_beside_measured_values() -> None:
    page = html.unescape(render_html(result({"a": 24, "b": 2}), split="val"))
    assert "<title>Validation of split 'val': PASSED (0 errors, 0 warnings)</title>" in page
    assert "<h1>Validation of split 'val'</h1>" in page
    row = page[page.index("imbalance (largest"):]
    row = row[:row.index("</tr>")]
    assert "12.0x (24 / 2 images)" in row and "imbalance_ratio = 10" in row and "class='fail'" in row
    row = page[page.index("smallest class"):]
    assert "2 images" in row[:200] and "min_images_per_class = 2" in row[:300]


def test_validation_with_300_classes_fits_the_page_width() -> None:
    per_class = {f"class_{i:03d}": 2 + (i * 7) % 23 for i in range(300)}
    page = render_html(result(per_class), split="train")
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert "viewBox" in svg and "Class sizes (300 classes)" in svg and "class_017" not in svg
    assert ".chart svg { max-width: 100%; height: auto; }" in page  # scales, never a scrollbar
    assert "Smallest classes: class_" in page and "Largest classes: class_" in page  # named extremes
    assert len(page) < 200_000


def test_validation_bar_chart_width_is_bounded() -> None:
    page = render_html(result({f"c{i}": 3 for i in range(MAX_BARS)}), split="train")
    width = float(re.search(r'<svg[^>]*width="([\d.]+)pt"', page).group(1))
    assert width <= 12 * 72  # 12 inches at most before CSS scaling


def test_long_paths_wrap() -> None:
    page = render_html(result({"a": 3}, errors=2), split="train")
    assert "overflow-wrap: anywhere" in page and "table-layout: fixed" in page
    assert LONG in page


def epoch(n: int, loss: float, val: float | None = None, cls: float = 0.0) -> EpochStats:
    return EpochStats(epoch=n, loss=loss + cls, metric_loss=loss, classification_loss=cls, lr=0.1 / n, seconds=10.0,
                      images=100, images_per_second=10.0, val_recall_at_1=val, val_map_at_r=None if val is None else val / 2)


def test_curve_table_drops_zero_and_repeated_columns() -> None:
    history = [epoch(1, 3.0), epoch(2, 2.0)]
    cols = table_columns(history)
    assert "classification_loss" not in cols and "metric_loss" not in cols  # always 0 / equal to loss
    assert "val_recall_at_1" not in cols
    assert cols[:2] == ["epoch", "loss"]
    mixed = table_columns([epoch(1, 3.0, cls=0.5), epoch(2, 2.0, cls=0.4)])
    assert "classification_loss" in mixed and "metric_loss" in mixed


def test_curve_page_marks_the_best_val_epoch() -> None:
    history = [epoch(1, 3.0, 0.4), epoch(2, 2.0, 0.7), epoch(3, 1.5, 0.6)]
    assert best_epoch(history) == (2, "best val Recall@1 (0.7000)")
    page = training_curve_html([h.model_dump() for h in history], "Training resnet18 + AMSoftmax")
    assert "<th>val Recall@1</th>" in page and "<th>val MAP@R</th>" in page
    best_row = re.search(r"<tr class=best>(.*?)</tr>", page).group(1)
    assert "2 &#9733;" in best_row and "0.7000" in best_row
    assert "data:image/png;base64," in page and "max-width: 100%" in page


def test_history_json_without_val_is_unchanged(tmp_path) -> None:
    import json

    from imlt.trainer.history import write_history

    url = write_history(str(tmp_path), [epoch(1, 3.0)])
    assert "val_recall_at_1" not in json.loads(open(url.removeprefix("file://")).read())[0]


def test_card_preprocessing_is_read_off_the_eval_transform() -> None:
    from imlt.trainer.data.transforms import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
    from imlt.trainer.model_card import serving_preprocessing

    pre = serving_preprocessing(224)
    assert pre["resize"]["shorter_side"] == round(224 / CROP_RATIO) == 256
    assert pre["center_crop"] == [224, 224] and pre["value_range"] == [0.0, 1.0]
    assert pre["mean"] == pytest.approx(IMAGENET_MEAN) and pre["std"] == pytest.approx(IMAGENET_STD)
    assert pre["channel_order"] == "RGB"
    words = " ".join(pre["steps"])
    assert "shorter side is 256 px" in words and "central 224x224" in words and "0.485, 0.456, 0.406" in words


def test_card_names_split_unseen_classes_and_gatewithout_local_paths() -> None:
    from imlt.trainer.model_card import render_card, serving_preprocessing, without_local_paths

    config = without_local_paths({"output_dir": "/tmp/imlt-xyz/model", "data": {"train_annotations": "oss://b/t.txt"},
                                   "model": {"backbone": "resnet18"}})
    assert config["output_dir"] == ".../model" and config["data"]["train_annotations"] == "oss://b/t.txt"
    metrics = {"recall_at_1": 0.8, "map_at_r": 0.5, "num_queries": 520, "num_classes": 26,
               "evaluation": {"exact": True, "num_queries": 520}}
    card = {"backbone": "resnet18", "version": 3, "created": "now", "config_hash": "abc",
            "input": {"name": "images", "shape": ["batch", 3, 32, 32], "preprocessing": serving_preprocessing(32)},
            "output": {"name": "embeddings", "shape": ["batch", 128], "note": "L2-normalised"},
            "files": {"model.onnx": {}}, "metrics": metrics,
            "measured_on": {"split": "val", "classes": 26, "unseen_classes": 26},
            "gate": {"min_recall_at_1": 0.5, "decision": "Recall@1 0.8000 >= gate 0.5000"},
            "data": without_local_paths({"num_samples": 10, "num_classes": 2, "split": "train",
                                          "data_format": "ClsSourceImageList", "annotations": "/tmp/a/train.txt"}),
            "usage": None, "config": config}
    md = render_card(card)
    assert "Measured on split `val`" in md and "26 of its 26 classes are unseen in training" in md
    assert "Recall@1 >= 0.5 (`min_recall_at_1`)" in md and "Decision for this version: Recall@1 0.8000" in md
    assert "shorter side is 37 px" in md and "| mean | `[0.485, 0.456, 0.406]` |" in md
    assert "/tmp/" not in md


def test_a_passing_report_shows_its_first_warnings_on_top() -> None:
    page = render_html(result({"a": 24, "b": 2}, warnings=7), split="val")
    box = page[page.index("class='verdict ok'"):page.index("<h2")]
    assert "PASSED</span>: no errors, 7 warnings" in box and "First warnings" in box and box.count("<li>") == TOP_ERRORS
