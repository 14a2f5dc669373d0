"""Tiny real images (PIL) written into tmp_path for the data tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def image_bytes(size: tuple[int, int] = (16, 16), mode: str = "RGB", fmt: str = "PNG", seed: int = 0) -> bytes:
    """Noise, so compressed data is long enough to cut in half and still keep the header."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """make_image("img/a.png", size=..., mode=..., fmt=...) -> the written path (under tmp_path)."""

    def make(rel: str, size: tuple[int, int] = (16, 16), mode: str = "RGB", fmt: str | None = None, seed: int = 0) -> Path:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
        path.write_bytes(image_bytes(size, mode, fmt, seed))
        return path

    return make
