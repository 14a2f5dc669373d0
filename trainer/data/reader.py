"""The read_data step: annotation file -> dataset folder (manifest.jsonl, classes.txt, summary.json).

All-or-nothing: every line is parsed and every problem collected first; if any is fatal the
step raises DataError naming each as file:line and writes nothing. Only then are images
cached (optional) and the dataset written, summary last, so a folder with a summary is whole.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from imlt.trainer import storage
from imlt.trainer.data.annotations import ParseResult, normalize_root, parse_annotations
from imlt.trainer.data.classes import load_class_names, resolve_labels
from imlt.trainer.data.manifest import DatasetSummary, ManifestRecord, write_dataset
from imlt.trainer.errors import DataError, Problem, parse_source
from imlt.trainer.step_models import ReadDataInput, ReadDataOutput

log = logging.getLogger(__name__)

IMAGES = "images"
COPY_THREADS = 8  # copying is network-bound (OSS), not CPU-bound


def pick_annotations(inp: ReadDataInput) -> str:
    """The annotation file to read: an upstream step's output wins over the configured file."""
    for url in (inp.upstream_annotations, inp.annotations):
        if url and url.strip():
            return normalize_root(url.strip())  # absolute, so sources stay meaningful in other processes
    raise DataError([Problem("", None, "no annotations: give annotations or connect an upstream step")], "read_data")


def parse_dataset(inp: ReadDataInput) -> tuple[str, list[str], list[ManifestRecord]]:
    """(annotation url, classes, records) or DataError with every problem found."""
    ann = pick_annotations(inp)
    if not storage.exists(ann):
        raise DataError([Problem(ann, None, "annotation file not found")], "read_data")
    parsed: ParseResult = parse_annotations(
        storage.read_bytes(ann), ann, inp.data_format, inp.data_root, inp.delimiter, inp.multi_label
    )
    try:
        names, _ = load_class_names(inp.class_names)
    except DataError as e:  # report it together with the annotation's own problems
        class_problems, classes, ids = e.problems, [], []
    else:
        classes, ids, class_problems = resolve_labels(parsed, names)
    problems = sorted(parsed.problems + class_problems, key=lambda p: (p.file != ann, p.line or 0))
    if not problems and not parsed.samples:
        problems.append(Problem(ann, None, "no samples: the file holds no annotation lines"))
    if problems:
        raise DataError(problems, f"read_data: {ann} rejected")
    records = [ManifestRecord(uri=s.uri, labels=l, source=f"{ann}:{s.line}") for s, l in zip(parsed.samples, ids)]
    return ann, classes, records


def cache_name(uri: str) -> str:
    """A stable, collision-free file name for an image in the cache (names from many folders meet here)."""
    ext = posixpath.splitext(uri.rsplit("/", 1)[-1])[1].lower()
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:20] + ext


def cache_images(records: list[ManifestRecord], dataset_dir: str) -> list[ManifestRecord]:
    """Copy each distinct image into dataset_dir/images; records then point at the copies."""
    targets = {r.uri: storage.join(dataset_dir, IMAGES, cache_name(r.uri)) for r in records}
    first_source = {}
    for r in records:
        first_source.setdefault(r.uri, r.source)
    written, problems = [], []

    def copy(src: str) -> None:
        storage.write_bytes(targets[src], storage.read_bytes(src))

    with ThreadPoolExecutor(COPY_THREADS) as pool, tqdm(total=len(targets), desc="caching images", unit="img") as bar:
        futures = {pool.submit(copy, uri): uri for uri in targets}
        for fut in as_completed(futures):
            uri = futures[fut]
            bar.update()
            try:
                fut.result()
                written.append(targets[uri])
            except storage.EndpointUnavailableError:
                raise  # the endpoint is down: one error naming it; the next run rewrites the same cache names
            except Exception as e:  # any storage error: report it against its line
                file, line = parse_source(first_source[uri])
                problems.append(Problem(file, line, f"cannot copy image {uri}: {type(e).__name__}: {e}"))
    if problems:
        for url in written:  # leave no half cache behind
            storage.delete(url)
        raise DataError(sorted(problems, key=lambda p: p.line or 0), "read_data: image cache failed")
    return [r.model_copy(update={"uri": targets[r.uri]}) for r in records]


def build_dataset(inp: ReadDataInput) -> ReadDataOutput:
    ann, classes, records = parse_dataset(inp)
    out = normalize_root(inp.output_dir)
    if inp.cache_images:
        records = cache_images(records, out)
    primary = Counter(r.labels[0] for r in records)
    summary = DatasetSummary(
        split=inp.split,
        annotations=ann,
        data_format=inp.data_format.value,
        num_samples=len(records),
        num_classes=len(classes),
        images_per_class={name: primary.get(i, 0) for i, name in enumerate(classes)},
        multi_label_samples=sum(len(r.labels) > 1 for r in records),
        cached_images=inp.cache_images,
    )
    write_dataset(out, records, classes, summary)
    log.info("read_data: %d samples, %d classes from %s -> %s", len(records), len(classes), ann, out)
    return ReadDataOutput(dataset_dir=out, num_samples=len(records), num_classes=len(classes), classes=classes)
