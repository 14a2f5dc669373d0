"""Image transforms for training and evaluation (torchvision.transforms.v2, PIL in, tensor out)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eval resizes the short side to size / CROP_RATIO and centre-crops `size`, so train crops
# (80-100 % of the area) and eval views cover about the same part of an image.
CROP_RATIO = 0.875


def build_train_transform(image_size: int, *, hflip: bool = False, scale: tuple[float, float] = (0.8, 1.0)) -> Callable:
    """A mild random resized crop (+ optional flip).

    Flip is off by default: for characters, glyphs, logos and text a mirror image is another
    class, not the same one. Turn it on for natural objects (products, animals, landmarks).
    """
    ops: list[Callable] = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=scale, ratio=(0.9, 1 / 0.9), antialias=True),
    ]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += _to_normalised_float()
    return v2.Compose(ops)


def build_eval_transform(image_size: int, *, crop_ratio: float = CROP_RATIO) -> Callable:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(max(image_size, round(image_size / crop_ratio)), antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalised_float(),
        ]
    )


def _to_normalised_float() -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
