"""The validate step: decode every image and check every label of a dataset folder.

Writes validation.json and report.html in every case (a failed run needs its report most),
then raises DataError when something is fatal. Fatal: a missing, empty, undecodable or
oversized image; a label id outside classes.txt; a class (that occurs) with fewer than
min_images_per_class images. Warnings: duplicate lines, one image with different labels,
heavy class imbalance, non-RGB images (converted when loaded).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from tqdm import tqdm

from imlt.trainer import storage
from imlt.trainer.data.annotations import normalize_root
from imlt.trainer.data.manifest import CLASSES, MANIFEST, ManifestRecord, read_classes
from imlt.trainer.data.validation_result import Counts, ProblemEntry, ValidationResult
from imlt.trainer.errors import DataError, Problem, parse_source
from imlt.trainer.step_models import ValidateInput, ValidateOutput

log = logging.getLogger(__name__)

VALIDATION_JSON = "validation.json"
REPORT_HTML = "report.html"


@dataclass(frozen=True)
class ImageCheck:
    uri: str
    error: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None


def check_image(uri: str, max_pixels: int) -> ImageCheck:
    """Read and fully decode one image; never raises (the problem is returned)."""
    try:
        data = storage.read_bytes(uri)  # one request when all is well; exists() only to explain a failure
    except storage.EndpointUnavailableError:
        raise  # not this image's problem: the step stops with one error naming the endpoint
    except Exception as e:  # any storage backend error is a problem of this image
        try:
            missing = not storage.exists(uri)
        except Exception:
            missing = False
        return ImageCheck(uri, "image not found" if missing else f"cannot read image: {type(e).__name__}: {e}")
    if not data:
        return ImageCheck(uri, "image file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                return ImageCheck(uri, f"image is {w}x{h} = {w * h} pixels, above max_image_pixels={max_pixels}", img.mode, (w, h))
            img.load()  # the full decode: finds truncated and corrupt data
            return ImageCheck(uri, None, img.mode, (w, h))
    except Image.DecompressionBombError as e:
        return ImageCheck(uri, f"image refused as too large: {e}")
    except UnidentifiedImageError:
        return ImageCheck(uri, "not an image (unknown or corrupt format)")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad data
        return ImageCheck(uri, f"cannot decode image: {type(e).__name__}: {e}")


def check_images(uris: list[str], max_pixels: int, workers: int) -> dict[str, ImageCheck]:
    out: dict[str, ImageCheck] = {}
    with warnings.catch_warnings():
        # our own max_pixels decides; PIL's bomb warning between its limits would only be noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(workers) as pool, tqdm(total=len(uris), desc="validating images", unit="img") as bar:
            futures = [pool.submit(check_image, u, max_pixels) for u in uris]
            for fut in as_completed(futures):
                check = fut.result()
                out[check.uri] = check
                bar.update()
    return out


def _read_manifest_lines(dataset_dir: str) -> list[tuple[int, ManifestRecord]]:
    """Manifest records with their line numbers (so a broken manifest line can be named)."""
    url = storage.join(dataset_dir, MANIFEST)
    if not storage.exists(url) or not storage.exists(storage.join(dataset_dir, CLASSES)):
        raise DataError([Problem(dataset_dir, None, f"not a dataset folder: needs {MANIFEST} and {CLASSES} (the output of read_data)")], "validate")
    out, problems = [], []
    for n, text in enumerate(storage.read_text(url).split("\n"), start=1):
        if text.strip():
            try:
                out.append((n, ManifestRecord.model_validate_json(text)))
            except ValidationError as e:
                problems.append(Problem(url, n, f"bad manifest record: {e.errors()[0]['msg']}"))
    if problems:
        raise DataError(problems, "validate: broken manifest")
    return out


def _label_problems(records: list[ManifestRecord], num_classes: int) -> list[Problem]:
    problems = []
    for r in records:
        problem = r.label_problem(num_classes)
        if problem:
            problems.append(Problem(*parse_source(r.source), problem))
    return problems


def _names(ids: list[int], classes: list[str]) -> str:
    return "[" + ", ".join(repr(classes[i]) if 0 <= i < len(classes) else str(i) for i in ids) + "]"


def _duplicate_warnings(records: list[ManifestRecord], classes: list[str]) -> list[Problem]:
    first_exact: dict[tuple[str, tuple[int, ...]], str] = {}
    first_uri: dict[str, ManifestRecord] = {}
    out = []
    for r in records:
        file, line = parse_source(r.source)
        key = (r.uri, tuple(r.labels))
        if key in first_exact:
            out.append(Problem(file, line, f"duplicate of {first_exact[key]} (same image and labels)", "warning"))
            continue
        first_exact[key] = r.source
        if r.uri in first_uri:
            other = first_uri[r.uri]
            out.append(Problem(file, line, f"image also labelled {_names(other.labels, classes)} at {other.source}, here {_names(r.labels, classes)}: {r.uri}", "warning"))
        else:
            first_uri[r.uri] = r
    return out


def _class_problems(per_class: Counter[int], classes: list[str], classes_url: str, inp: ValidateInput) -> list[Problem]:
    out = []
    for i, n in sorted(per_class.items()):
        if 0 <= i < len(classes) and n < inp.min_images_per_class:
            out.append(Problem(classes_url, i + 1, f"class {classes[i]!r} has {n} image{'s' if n != 1 else ''}, fewer than min_images_per_class={inp.min_images_per_class}"))
    present = {i: n for i, n in per_class.items() if 0 <= i < len(classes)}
    if len(present) >= 2:
        big = max(present, key=lambda i: present[i])
        small = min(present, key=lambda i: present[i])
        ratio = present[big] / present[small]
        if ratio > inp.imbalance_ratio:
            out.append(Problem(classes_url, None, (
                f"class imbalance: the largest class {classes[big]!r} ({present[big]}) has {ratio:.1f}x the images "
                f"of the smallest {classes[small]!r} ({present[small]}), above imbalance_ratio={inp.imbalance_ratio:g}"), "warning"))
    return out


def _mode_warnings(records: list[ManifestRecord], checks: dict[str, ImageCheck]) -> list[Problem]:
    first: dict[str, ManifestRecord] = {}
    count: Counter[str] = Counter()
    for r in records:
        c = checks.get(r.uri)
        if c and c.error is None and c.mode and c.mode != "RGB":
            first.setdefault(c.mode, r)
            count[c.mode] += 1
    out = []
    for mode, r in first.items():
        file, line = parse_source(r.source)
        out.append(Problem(file, line, f"{count[mode]} sample(s) with {mode} images (first: {r.uri}); they are converted to RGB when loaded", "warning"))
    return out


def validate_dataset(inp: ValidateInput) -> ValidateOutput:
    dataset_dir = normalize_root(inp.dataset_dir)
    out_dir = normalize_root(inp.output_dir)
    numbered = _read_manifest_lines(dataset_dir)
    records = [r for _, r in numbered]
    classes = read_classes(dataset_dir)
    classes_url = storage.join(dataset_dir, CLASSES)

    uris = list(dict.fromkeys(r.uri for r in records))
    checks = check_images(uris, inp.max_image_pixels, inp.workers)

    image_problems = []
    for r in records:
        c = checks[r.uri]
        if c.error:
            file, line = parse_source(r.source)
            image_problems.append(Problem(file, line, f"{c.error}: {r.uri}"))
    per_class: Counter[int] = Counter(r.labels[0] for r in records if r.labels)
    problems = (
        image_problems
        + _label_problems(records, len(classes))
        + _class_problems(per_class, classes, classes_url, inp)
        + _duplicate_warnings(records, classes)
        + _mode_warnings(records, checks)
    )
    if not records:
        problems.append(Problem(storage.join(dataset_dir, MANIFEST), None, "the dataset has no samples"))
    errors = _ordered([p for p in problems if p.is_error])
    warns = _ordered([p for p in problems if not p.is_error])

    result = ValidationResult(
        ok=not errors,
        dataset_dir=dataset_dir,
        settings={
            "min_images_per_class": inp.min_images_per_class,
            "imbalance_ratio": inp.imbalance_ratio,
            "max_image_pixels": inp.max_image_pixels,
        },
        counts=Counts(
            samples=len(records),
            images=len(uris),
            classes=len(classes),
            classes_present=sum(1 for i in per_class if 0 <= i < len(classes)),
            multi_label_samples=sum(len(r.labels) > 1 for r in records),
            errors=len(errors),
            warnings=len(warns),
            modes=dict(sorted(Counter(c.mode for c in checks.values() if c.error is None and c.mode).items())),
        ),
        per_class={name: per_class.get(i, 0) for i, name in enumerate(classes)},
        errors=[ProblemEntry(**p.to_dict()) for p in errors],
        warnings=[ProblemEntry(**p.to_dict()) for p in warns],
    )
    from imlt.trainer.data.report import render_html  # matplotlib is only needed here

    report_url = storage.join(out_dir, REPORT_HTML)
    storage.write_text(storage.join(out_dir, VALIDATION_JSON), result.model_dump_json(indent=2))
    storage.write_text(report_url, render_html(result))
    log.info("validate: %d samples, %d errors, %d warnings -> %s", len(records), len(errors), len(warns), out_dir)
    if errors:
        raise DataError(errors, f"validate: {dataset_dir} has fatal problems (report: {report_url})")
    return ValidateOutput(validation_dir=out_dir, ok=True, num_errors=0, num_warnings=len(warns), report_html=report_url)


def _ordered(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line or 0))
