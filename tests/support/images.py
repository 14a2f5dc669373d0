"""The one builder of test images and annotation files: real encoded images (PIL), ImageList lines.

Two kinds of pixels: uniform noise (retrieval near chance; compressed data long enough to cut in
half and keep the header) and one colour plus Gaussian noise (classes a network tells apart in a
few steps).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "grey": (128, 128, 128),
       "yellow": (230, 220, 40)}
CLASSES = ["ant", "bee", "cat", "dog"]

# One image of each colour class is stored in a mode other than 8-bit RGB: training converts, never fails.
ODD_MODES = [("L", "PNG", ".png"), ("RGBA", "PNG", ".png"), ("I;16", "PNG", ".png"), ("CMYK", "JPEG", ".jpg")]


def noise_image(size: tuple[int, int] = (16, 16), seed: int | np.random.Generator = 0) -> Image.Image:
    """Uniform RGB noise of (width, height)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def noisy_colour(rgb: tuple[int, int, int], rng: np.random.Generator, size: int) -> Image.Image:
    """An RGB image of one colour plus Gaussian noise (sigma 25), so no two images are equal."""
    return Image.fromarray(np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """The image in `mode` ("I;16": 16-bit greyscale, as scanners and medical imaging write) as `fmt` bytes."""
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    elif mode != img.mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def image_bytes(size: tuple[int, int] = (16, 16), mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    """Noise, so compressed data is long enough to cut in half and still keep the header."""
    return encode(noise_image(size, seed), fmt, mode)


def png_bytes(rgb: tuple[int, int, int], seed: int, size: int = 16, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """One noisy colour, encoded."""
    return encode(noisy_colour(rgb, np.random.default_rng(seed), size), fmt, mode)


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def write_colour_images(root: Path, per_class: int = 6, size: int = 16,
                        colours: dict[str, tuple[int, int, int]] | None = None) -> list[str]:
    """Colour classes with noise (learnable in a few steps); returns ImageList lines relative to root.

    Colours default to red, green, blue and grey; the first image of class c is stored as ODD_MODES[c].
    """
    colours = colours or {name: RGB[name] for name in ("red", "green", "blue", "grey")}
    lines = []
    for c, (name, rgb) in enumerate(colours.items()):
        for i in range(per_class):
            mode, fmt, ext = ODD_MODES[c % len(ODD_MODES)] if i == 0 else ("RGB", "PNG", ".png")
            rel = f"images/{name}_{i}{ext}"
            write_text(root / rel, png_bytes(rgb, seed=c * 100 + i, size=size, mode=mode, fmt=fmt))
            lines.append(f"{rel} {name}")
    return lines


def write_split(root: Path, split: str, per_class: int = 4, size: int = 16, seed: int = 0,
                absolute: bool = False) -> Path:
    """Noise images of CLASSES (so Recall@1 < 1) and an ImageList file ROOT/SPLIT.txt.

    Lines hold `images/<split>/<class>_<i>.png <class name>`, relative to the annotation
    file's folder unless `absolute`.
    """
    rng = np.random.default_rng(seed)
    lines = []
    for name in CLASSES:
        for i in range(per_class):
            rel = Path("images") / split / f"{name}_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            noise_image((size, size), rng).save(root / rel)
            lines.append(f"{(root / rel) if absolute else rel.as_posix()} {name}")
    return write_text(root / f"{split}.txt", "\n".join(lines) + "\n")


def write_colour_dataset(root: Path, classes: list[str], per_class: int, size: int = 20) -> str:
    """A read_data output folder (manifest + classes) of PNGs, written directly so training tests skip reading."""
    from imlt.trainer.data.manifest import DatasetSummary, ManifestRecord, write_dataset

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
