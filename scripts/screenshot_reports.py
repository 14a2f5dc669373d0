"""Build every report people read from a tiny real run and screenshot each at 1280x800.

    python scripts/screenshot_reports.py OUT_DIR [--chromium PATH]

Writes OUT_DIR/pages/*.html and OUT_DIR/*.png: the validation report of a clean val split, of a
broken train split (missing/corrupt images, a class below min_images_per_class, long paths),
of a 300-class split; the training-curve page of a 2-epoch resnet18 run on the glyph task;
the model card of the version that run published. The screenshot is what a reader sees
first (1280x800, no scrolling), so it is where "above the fold" is checked, by eye.

Needs Chromium (Debian: `apt-get install chromium`); the HTML is still written without it.
The pytest tests (tests/test_reports.py) check the same pages' content, not pixels.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,800")


def screenshot(chromium: str, page: Path, png: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="imlt-chromium-") as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                        page.resolve().as_uri()], check=True, capture_output=True, timeout=120)


def markdown_page(md: str, title: str) -> str:
    """MODEL_CARD.md as a browser shows it (markdown-it-py, already installed with rich)."""
    import html

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(md)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:1.5em 2em;max-width:1200px;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
            "pre{background:#f6f8fa;padding:0.6em;overflow-x:auto}code{overflow-wrap:anywhere}"
            f"</style></head><body>{body}</body></html>")


def validation_pages(work: Path, pages: Path) -> None:
    from PIL import Image

    from imlt.trainer.errors import DataError
    from imlt.trainer.steps import ReadDataInput, ValidateInput, read_data, validate

    # a broken split with long, deep paths: errors must show above the fold and the paths wrap
    deep = work / "broken" / ("a_rather_long_folder_name_for_the_product_photos_" * 3) / "2026-11-29"
    deep.mkdir(parents=True)
    lines = []
    for c in range(8):
        for i in range(2 + 3 * c):
            p = deep / f"class_{c}_image_{i:04d}_from_the_camera_upload_batch.png"
            Image.new("RGB", (24, 24), (30 * c, 10 * i % 255, 100)).save(p)
            lines.append(f"{p} c{c}")
    (deep / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    lines += [f"{deep / 'truncated.png'} c1", f"{deep / 'missing_image_from_the_upload.png'} c2", f"{deep / 'x.png'} lonely"]
    ann = work / "broken.txt"
    ann.write_text("\n".join(lines) + "\n")
    ds = read_data(ReadDataInput(output_dir=str(work / "broken_ds"), annotations=str(ann), split="train")).dataset_dir
    try:
        validate(ValidateInput(dataset_dir=ds, output_dir=str(work / "broken_val"), workers=1))
    except DataError:
        pass  # expected: the report is written before the step fails
    shutil.copy(work / "broken_val/report.html", pages / "validation_failed.html")

    # 300 classes: the chart must still fit the page width
    many = work / "many"
    many.mkdir()
    img = many / "one.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(img)
    lines = []
    for c in range(300):
        for i in range(2 + (c * 7) % 23):
            lines.append(f"{img} class_{c:03d}")
    ann = work / "many.txt"
    ann.write_text("\n".join(lines) + "\n")
    ds = read_data(ReadDataInput(output_dir=str(work / "many_ds"), annotations=str(ann), split="val")).dataset_dir
    validate(ValidateInput(dataset_dir=ds, output_dir=str(work / "many_val"), workers=1))
    shutil.copy(work / "many_val/report.html", pages / "validation_300_classes.html")


def run_pages(work: Path, pages: Path, epochs: int) -> None:
    """A real read -> validate -> train -> evaluate -> publish run of the glyph task, small."""
    from imlt.trainer.config import validate_config
    from imlt.trainer.data.synthetic import generate_glyphs
    from imlt.trainer.history import training_curve_html
    from imlt.trainer.pipeline import PipelineConfig, PublishSettings, run_pipeline

    data = generate_glyphs(work / "glyphs", train_classes=20, train_per_class=12, val_per_class=8, seed=0)
    raw = {
        "output_dir": str(work / "model"),
        "data": {"image_size": 32, "reader_threads": 0, "train_annotations": data.train_annotations,
                 "val_annotations": data.val_annotations, "class_names": data.train_classes,
                 "val_class_names": data.val_classes},
        "model": {"backbone": "resnet18", "feature_dim": 64},
        "optim": {"optimizer": "AdamW", "lr": 0.002},
        "train": {"batch_size": 32, "epochs": epochs, "seed": 0},
    }
    pc = PipelineConfig(workdir=str(work / "work"), run=validate_config(raw),
                        publish=PublishSettings(destination=str(work / "published"), min_recall_at_1=0.01))
    result = run_pipeline(pc, lambda msg: print(msg, file=sys.stderr))
    (pages / "training_curve.html").write_text(
        training_curve_html(result.trained.history, "Training resnet18 + AMSoftmax"), encoding="utf-8")
    val_report = Path(pc.workdir)
    for report in sorted(val_report.rglob("report.html")):
        if "val" in report.parent.name:
            shutil.copy(report, pages / "validation_val_split.html")
    if result.published.version_dir:
        md = (Path(result.published.version_dir) / "MODEL_CARD.md").read_text(encoding="utf-8")
        (pages / "model_card.html").write_text(markdown_page(md, "model card"), encoding="utf-8")
        (pages / "MODEL_CARD.md").write_text(md, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out = args.out.resolve()
    pages = out / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imlt-reports-") as tmp:
        work = Path(tmp)
        validation_pages(work, pages)
        run_pages(work, pages, args.epochs)
    if not args.chromium:
        print(f"no chromium found: pages written to {pages}, no screenshots", file=sys.stderr)
        return
    for page in sorted(pages.glob("*.html")):
        png = out / (page.stem + ".png")
        screenshot(args.chromium, page, png)
        print(png)


if __name__ == "__main__":
    main()
