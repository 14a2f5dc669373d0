"""Noisy single-colour images: classes a network tells apart in a few steps, as real image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imlt.trainer.data.manifest import DatasetSummary, ManifestRecord, write_dataset

RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "grey": (128, 128, 128),
       "yellow": (230, 220, 40)}


def noisy_colour(rgb: tuple[int, int, int], rng: np.random.Generator, size: int) -> Image.Image:
    """An RGB image of one colour plus Gaussian noise (sigma 25), so no two images are equal."""
    return Image.fromarray(np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8))


def write_colour_dataset(root: Path, classes: list[str], per_class: int, size: int = 20) -> str:
    """A read_data output folder (manifest + classes) of PNGs, written directly so training tests skip reading."""
    rng = np.random.default_rng(0)
    records = []
    for label, name in enumerate(classes):
        for i in range(per_class):
            path = root / "images" / f"{name}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            noisy_colour(RGB[name], rng, size).save(path)
            records.append(ManifestRecord(uri=str(path), labels=[label], source=f"train.txt:{len(records) + 1}"))
    summary = DatasetSummary(
        split="train", annotations="train.txt", data_format="ClsSourceImageList", num_samples=len(records),
        num_classes=len(classes), images_per_class={c: per_class for c in classes},
    )
    out = str(root / "dataset")
    write_dataset(out, records, classes, summary)
    return out
