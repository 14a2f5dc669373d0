"""ImageDataset decoding, transforms, and the M-per-class distributed batch sampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from imlt.trainer import storage
from imlt.trainer.data.dataset import ImageDataset, decode_rgb
from imlt.trainer.data.manifest import ManifestRecord
from imlt.trainer.data.sampler import MPerClassBatchSampler
from imlt.trainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform

SIZE = 16


def _white_normalised() -> torch.Tensor:
    return (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def _images(root: Path) -> dict[str, Path]:
    """One small image per decoding path that needs care."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    out = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        out[name] = root / name
        img.save(out[name], **kw)

    save("rgb.jpg", rgb, quality=90)
    save("gray.png", rgb.convert("L"))
    save("cmyk.jpg", rgb.convert("CMYK"))
    save("binary.png", rgb.convert("1"))
    save("palette.png", rgb.convert("P"))
    save("rgba_clear.png", Image.new("RGBA", (20, 20), (0, 0, 0, 0)))  # fully transparent black
    save("la.png", Image.new("LA", (20, 20), (0, 0)))
    save("white16.png", Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)))  # I;16
    save("gray16.png", Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)))  # 128 * 257
    return out


def test_reads_png_and_jpeg_of_many_modes(tmp_path: Path) -> None:
    files = _images(tmp_path)
    assert Image.open(files["white16.png"]).mode.startswith("I")
    assert Image.open(files["cmyk.jpg"]).mode == "CMYK"
    records = [ManifestRecord(uri=str(p), labels=[i, 99], source=f"ann.txt:{i + 1}") for i, p in enumerate(files.values())]
    ds = ImageDataset(records, SIZE, train=False)
    assert ds.labels == list(range(len(files)))  # the primary (first) label
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert label == i and isinstance(label, int)
    white = _white_normalised()
    names = list(files)
    for name in ("white16.png", "rgba_clear.png", "la.png"):  # 16-bit scaled, alpha composited on white
        x, _ = ds[names.index(name)]
        assert torch.allclose(x.mean(dim=(1, 2)), white, atol=1e-3), name
    gray = decode_rgb(files["gray16.png"].read_bytes())
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [128, 128, 128]


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (30, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert decode_rgb(path.read_bytes()).size == (10, 30)


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_result_shape(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (800, 640, 3), dtype=np.uint8)).save(path)
    img = decode_rgb(path.read_bytes(), draft_size=SIZE)
    assert min(img.size) >= SIZE and img.size[0] < 640
    x, _ = ImageDataset([ManifestRecord(uri=str(path), labels=[0], source="a:1")], SIZE, train=True)[0]
    assert x.shape == (3, SIZE, SIZE)


def test_unreadable_image_names_its_annotation_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    ds = ImageDataset([ManifestRecord(uri=str(bad), labels=[0], source="train.txt:7")], SIZE, train=False)
    with pytest.raises(ValueError, match=r"train.txt:7: cannot read image .*bad.png"):
        ds[0]
    with pytest.raises(ValueError, match="train.txt:3: no label: .*bad.png"):
        ImageDataset([ManifestRecord(uri=str(bad), labels=[], source="train.txt:3")], SIZE, train=False)


def test_oss_images_are_read_and_cached_locally(tmp_path: Path, oss_server) -> None:
    src = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (0, 128, 255)).save(src)
    uri = oss_server.url("images/img.png")
    storage.write_bytes(uri, src.read_bytes())
    cache = tmp_path / "cache"
    record = ManifestRecord(uri=uri, labels=[0], source="a:1")
    ds = ImageDataset([record], SIZE, train=False, cache_dir=str(cache))
    first, _ = ds[0]
    second, _ = ds[0]
    gets = [c for c in oss_server.calls if c.op == "GetObject" and c.key == "images/img.png"]
    assert len(gets) == 1  # the second read came from the cache
    assert torch.equal(first, second)
    assert [p.suffix for p in cache.iterdir()] == [".png"]
    uncached, _ = ImageDataset([record], SIZE, train=False)[0]
    assert torch.equal(first, uncached)


def test_transforms_train_is_random_eval_is_not_and_flip_is_off_by_default() -> None:
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    train, evaluate = build_train_transform(SIZE), build_eval_transform(SIZE)
    torch.manual_seed(0)
    a, b = train(img), train(img)
    assert a.shape == b.shape == (3, SIZE, SIZE) and not torch.equal(a, b)
    assert torch.equal(evaluate(img), evaluate(img))
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in train.transforms)
    assert any(isinstance(t, v2.RandomHorizontalFlip) for t in build_train_transform(SIZE, hflip=True).transforms)


def test_dataset_accepts_a_custom_transform(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("L", (20, 20), 255).save(path)
    ds = ImageDataset([ManifestRecord(uri=str(path), labels=[3], source="a:1")], SIZE, train=True,
                      transform=build_train_transform(SIZE, hflip=True))
    assert ds[0][0].shape == (3, SIZE, SIZE)


# --- sampler ------------------------------------------------------------------------------------


def _balanced(classes: int = 8, per_class: int = 4) -> list[int]:
    return [c for c in range(classes) for _ in range(per_class)]


def test_each_batch_holds_m_images_of_distinct_classes() -> None:
    labels = [c for c in range(7) for _ in range(3 + c)]  # imbalanced, 7 classes
    sampler = MPerClassBatchSampler(labels, batch_size=6, m=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 6
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert len(batch) == 6 and len(counts) == 3 and set(counts.values()) == {2}
        assert len(set(batch)) == 6  # every class has >= m images: no repeats inside a batch


def test_classes_are_visited_evenly() -> None:
    labels = [c for c in range(5) for _ in range(2 + 3 * c)]
    sampler = MPerClassBatchSampler(labels, batch_size=4, m=2, seed=0)
    seen = Counter(labels[i] for batch in sampler for i in batch[::2])
    assert max(seen.values()) - min(seen.values()) <= 1, seen


def test_class_smaller_than_m_repeats_its_images() -> None:
    labels = [0, 1, 1, 1, 1, 2, 2, 2, 2]
    for batch in MPerClassBatchSampler(labels, batch_size=6, m=2, seed=3):
        assert Counter(labels[i] for i in batch) == {0: 2, 1: 2, 2: 2}
        assert batch.count(0) == 2


def test_deterministic_by_seed_and_epoch() -> None:
    labels = _balanced()
    a = MPerClassBatchSampler(labels, batch_size=8, m=2, seed=5)
    b = MPerClassBatchSampler(labels, batch_size=8, m=2, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)


def test_two_ranks_get_disjoint_shards_covering_the_data() -> None:
    labels = _balanced(classes=8, per_class=4)
    for epoch in range(3):
        shards = []
        for rank in range(2):
            s = MPerClassBatchSampler(labels, batch_size=8, m=2, rank=rank, world_size=2, seed=7)
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s) == 4
            assert all(len(b) == 4 and set(Counter(labels[i] for i in b).values()) == {2} for b in batches)
            shards.append([i for b in batches for i in b])
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(len(labels)))


def test_impossible_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of train.m_per_class"):
        MPerClassBatchSampler(_balanced(), batch_size=7, m=2)
    with pytest.raises(ValueError, match="times the number of processes"):
        MPerClassBatchSampler(_balanced(), batch_size=6, m=2, world_size=2)
    with pytest.raises(ValueError, match="only 8"):
        MPerClassBatchSampler(_balanced(), batch_size=18, m=2)
    with pytest.raises(ValueError, match="outside world_size"):
        MPerClassBatchSampler(_balanced(), batch_size=8, m=2, rank=2, world_size=2)


def test_works_as_a_dataloader_batch_sampler(tmp_path: Path) -> None:
    paths = []
    for c in range(3):
        for k in range(2):
            p = tmp_path / f"{c}_{k}.png"
            Image.new("L", (20, 20), 40 * c + k).save(p)
            paths.append((p, c))
    ds = ImageDataset([ManifestRecord(uri=str(p), labels=[c], source=f"a:{i}") for i, (p, c) in enumerate(paths)], SIZE, train=True)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=MPerClassBatchSampler(ds.labels, batch_size=4, m=2))
    x, y = next(iter(loader))
    assert x.shape == (4, 3, SIZE, SIZE)
    assert sorted(Counter(y.tolist()).values()) == [2, 2]
