"""Bundled-free demo and test data: generated glyphs and scikit-learn's digits, as real dataset folders.

Both write what a user would bring (images, ImageList annotations, class lists), so the demo
exercises the read step exactly like user data. Glyphs are the showcase: an open-set task where
training visibly beats raw pixels and an untrained network. Digits are a correctness check on
real scans (raw pixels already retrieve unseen digits well).
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel

GREEK_LOWER = "αβγδεζηθικλμνξοπρστυφχψω"
GLYPH_CLASSES = string.ascii_uppercase + string.ascii_lowercase + string.digits + GREEK_LOWER
FONT_FILES = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
]


class GeneratedDataset(BaseModel):
    """Where a generator put things; paths are local."""

    root: str
    train_annotations: str
    val_annotations: str
    train_classes: str
    val_classes: str
    num_train: int
    num_val: int


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def render_glyph(char: str, font_path: Path, size: int, rng: random.Random) -> Image.Image:
    """One character at a random size, offset and rotation, with pixel noise, as grayscale."""
    canvas = size * 3
    font = ImageFont.truetype(str(font_path), int(canvas * rng.uniform(0.45, 0.75)))
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-0.12, 0.12) * canvas
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-0.12, 0.12) * canvas
    draw.text((x, y), char, fill=255, font=font)
    img = img.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
    img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 20, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def _write_split(root: Path, split: str, classes: list[str], per_class: int, size: int, rng: random.Random) -> tuple[str, int]:
    fonts = [font_dir() / f for f in FONT_FILES]
    lines = []
    (root / split).mkdir(parents=True, exist_ok=True)
    for ci, char in enumerate(classes):
        for n in range(per_class):
            rel = f"{split}/c{ci:03d}_{n:03d}.png"
            render_glyph(char, rng.choice(fonts), size, rng).save(root / rel)
            lines.append(f"{rel} {char}\n")
    ann = root / f"{split}.txt"
    ann.write_text("".join(lines), encoding="utf-8")
    (root / f"{split}_classes.txt").write_text("".join(c + "\n" for c in classes), encoding="utf-8")
    return str(ann), len(lines)


def generate_glyphs(
    root: str | Path,
    *,
    train_classes: int = 60,
    train_per_class: int = 40,
    val_per_class: int = 20,
    image_size: int = 32,
    seed: int = 0,
) -> GeneratedDataset:
    """Write an open-set glyph task: train on `train_classes` characters, retrieve the rest."""
    root = Path(root)
    rng = random.Random(seed)
    chars = list(GLYPH_CLASSES)
    rng.shuffle(chars)
    train, val = chars[:train_classes], chars[train_classes:]
    train_ann, n_train = _write_split(root, "train", train, train_per_class, image_size, rng)
    val_ann, n_val = _write_split(root, "val", val, val_per_class, image_size, rng)
    return GeneratedDataset(
        root=str(root), train_annotations=train_ann, val_annotations=val_ann,
        train_classes=str(root / "train_classes.txt"), val_classes=str(root / "val_classes.txt"),
        num_train=n_train, num_val=n_val,
    )


def generate_digits(root: str | Path, *, train_digits: tuple[int, ...] = (0, 1, 2, 3, 4), image_size: int = 32) -> GeneratedDataset:
    """scikit-learn's bundled 8x8 digit scans, upscaled; train on some digits, retrieve the others."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    names = [f"digit{d}" for d in range(10)]  # names, not ints: an int label would read as an index
    splits = {"train": [d for d in range(10) if d in train_digits], "val": [d for d in range(10) if d not in train_digits]}
    out: dict[str, tuple[str, int]] = {}
    for split, keep in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (img, label) in enumerate(zip(digits.images, digits.target)):
            if label not in keep:
                continue
            rel = f"{split}/{i:04d}.png"
            pixels = (img * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR).save(root / rel)
            lines.append(f"{rel} {names[label]}\n")
        ann = root / f"{split}.txt"
        ann.write_text("".join(lines))
        (root / f"{split}_classes.txt").write_text("".join(names[d] + "\n" for d in keep))
        out[split] = (str(ann), len(lines))
    return GeneratedDataset(
        root=str(root), train_annotations=out["train"][0], val_annotations=out["val"][0],
        train_classes=str(root / "train_classes.txt"), val_classes=str(root / "val_classes.txt"),
        num_train=out["train"][1], num_val=out["val"][1],
    )
