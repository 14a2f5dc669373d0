"""Tiny annotated image sets for the KFP tests (real PNGs and ImageList files in a temp folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["ant", "bee", "cat", "dog"]


def write_split(root: Path, split: str, per_class: int = 4, size: int = 16, seed: int = 0,
                absolute: bool = False) -> Path:
    """Noise images (so retrieval is near chance and Recall@1 < 1) and an ImageList file.

    Lines hold `images/<split>/<class>_<i>.png <class name>`, relative to the annotation
    file's folder unless `absolute`.
    """
    rng = np.random.default_rng(seed)
    lines = []
    for name in CLASSES:
        for i in range(per_class):
            rel = Path("images") / split / f"{name}_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / rel)
            lines.append(f"{(root / rel) if absolute else rel.as_posix()} {name}")
    ann = root / f"{split}.txt"
    ann.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ann
