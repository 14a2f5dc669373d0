"""The torch Dataset over manifest records: bytes through trainer.storage, PIL decode, RGB, transform.

Training and evaluation both read images this way, so oss:// images, odd modes (16-bit PNG,
CMYK JPEG, palette with transparency) and EXIF rotation behave the same in every step.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from imlt.trainer import storage
from imlt.trainer.data.manifest import ManifestRecord
from imlt.trainer.data.transforms import build_eval_transform, build_train_transform


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor [3, H, W] float, primary label) per record.

    cache_dir: a local folder that keeps a copy of each remote image's bytes, so later epochs
    (and other DataLoader workers) read the disk instead of OSS. Local images are never copied.
    transform: overrides the default train/eval transform (e.g. a train transform with flips).
    """

    def __init__(
        self,
        records: list[ManifestRecord],
        image_size: int,
        train: bool,
        cache_dir: str | None = None,
        *,
        transform: Callable | None = None,
    ) -> None:
        for r in records:
            problem = r.label_problem()
            if problem:
                raise ValueError(f"{r.source}: {problem}")
        self.records = list(records)
        self.labels: list[int] = [r.labels[0] for r in self.records]
        self.image_size = image_size
        self.train = train
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.transform = transform or (build_train_transform(image_size) if train else build_eval_transform(image_size))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        record = self.records[i]
        try:
            image = decode_rgb(self._read(record.uri), draft_size=self.image_size)
        except Exception as e:
            raise ValueError(f"{record.source}: cannot read image {record.uri}: {type(e).__name__}: {e}") from e
        return self.transform(image), self.labels[i]

    def _read(self, uri: str) -> bytes:
        if self.cache_dir is None or storage.is_local(uri):
            return storage.read_bytes(uri)
        suffix = Path(uri.split("?")[0]).suffix[:8]
        cached = self.cache_dir / f"{hashlib.sha256(uri.encode()).hexdigest()}{suffix}"
        if cached.exists():
            return cached.read_bytes()
        data = storage.read_bytes(uri)
        _write_atomic(cached, data)
        return data


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode any PIL-readable image to 8-bit RGB, upright per its EXIF orientation.

    Modes PIL's convert("RGB") gets wrong are handled here: 16/32-bit integer and float
    greyscale would clip to white, and transparency would turn to black, so alpha is composited
    onto white instead (the usual background of product and glyph images).
    """
    image = Image.open(io.BytesIO(data))
    if draft_size and image.format == "JPEG":
        image.draft(image.mode, (draft_size, draft_size))  # decode large JPEGs at reduced scale: much faster
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))  # 2-D uint8 -> mode L
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    # Integer modes hold 16-bit samples (PNG/TIFF); float images are either in [0, 1] or [0, 255].
    if a.dtype.kind == "f":
        peak = 1.0 if a.size and float(np.nanmax(a)) <= 1.0 else 255.0
        a = np.nan_to_num(a) * (255.0 / peak)
    else:
        a = a.astype(np.float64) / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _write_atomic(path: Path, data: bytes) -> None:
    # DataLoader workers may fetch the same image at once: write a temp file, then rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
