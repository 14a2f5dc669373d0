"""The dataset folder that read_data writes and every later step reads.

    manifest.jsonl   one ManifestRecord a line
    classes.txt      one class name a line; a label id is a line index
    summary.json     DatasetSummary
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from imlt.trainer import storage
from imlt.trainer.config import ConfigError, RunConfig

MANIFEST = "manifest.jsonl"
CLASSES = "classes.txt"
SUMMARY = "summary.json"


class ManifestRecord(BaseModel):
    uri: str = Field(..., description="Absolute image URL: a local path, oss://bucket/key or another fsspec URL")
    labels: list[int] = Field(..., description="Label ids (indices into classes.txt); the first is the primary label")
    source: str = Field(..., description="file:line of the annotation this record came from")

    def label_problem(self, num_classes: int | None = None) -> str | None:
        """What is wrong with this record's labels (none, or an id outside the class list), or None.

        The one label check: validate reports it per annotation line, training refuses the
        dataset with it, and the image dataset refuses an unlabelled record.
        """
        if not self.labels:
            return f"no label: {self.uri}"
        bad = [i for i in self.labels if num_classes is not None and not 0 <= i < num_classes]
        if bad:
            return f"label id {bad[0]} out of range: classes.txt has {num_classes} classes (ids 0..{num_classes - 1})"
        return None


class DatasetSummary(BaseModel):
    split: str
    annotations: str
    data_format: str
    num_samples: int
    num_classes: int
    images_per_class: dict[str, int]
    multi_label_samples: int = 0
    cached_images: bool = False


def write_dataset(dataset_dir: str, records: list[ManifestRecord], classes: list[str], summary: DatasetSummary) -> None:
    storage.write_text(storage.join(dataset_dir, MANIFEST), "".join(r.model_dump_json() + "\n" for r in records))
    storage.write_text(storage.join(dataset_dir, CLASSES), "".join(c + "\n" for c in classes))
    storage.write_text(storage.join(dataset_dir, SUMMARY), summary.model_dump_json(indent=2))


def with_dataset_classes(cfg: RunConfig, classes: list[str], dataset_dir: str) -> RunConfig:
    """Fill model.num_classes from the dataset's class list; refuse a conflicting explicit value."""
    n = len(classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes != n:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the train dataset's "
            f"{storage.join(dataset_dir, CLASSES)} lists {n} classes; omit model.num_classes or set it to {n}"
        )
    if cfg.model.num_classes == n:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_classes": n})})


def check_labels(records: list[ManifestRecord], num_classes: int, dataset_dir: str) -> None:
    """Refuse a dataset with a record whose labels do not fit its class list (training's check)."""
    for r in records:
        problem = r.label_problem(num_classes)
        if problem:
            raise ValueError(f"{storage.join(dataset_dir, MANIFEST)}: record from {r.source}: {problem}")


def read_manifest(dataset_dir: str) -> list[ManifestRecord]:
    text = storage.read_text(storage.join(dataset_dir, MANIFEST))
    return [ManifestRecord.model_validate_json(line) for line in text.splitlines() if line.strip()]


def read_classes(dataset_dir: str) -> list[str]:
    return [c for c in storage.read_text(storage.join(dataset_dir, CLASSES)).split("\n") if c != ""]


def read_summary(dataset_dir: str) -> DatasetSummary:
    return DatasetSummary.model_validate_json(storage.read_text(storage.join(dataset_dir, SUMMARY)))
