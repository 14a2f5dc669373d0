"""Seeded embeddings that look like a trained model's output, for the evaluation benchmarks.

Isotropic Gaussian noise around Gaussian centres (the earlier benchmark data) gives a 1M set
whose exact Recall@1 is 0.09: no model produces that, and no approximate index can work on
it. A trained metric-learning model instead puts unit embeddings near class centres on the
sphere, some classes tighter than others, with a long tail of class sizes (a few products
with many photos, most with a handful) and some classes that look alike. So:

- class centres: uniform on the unit sphere in `dim` dimensions;
- near-duplicate classes: a share `near_duplicates` of the classes take the centre of
  another class moved by a small angle (look-alike products, twins);
- class sizes: Zipf-like, P(size = s) proportional to s^-alpha for s in [2, max_size], alpha
  solved so that the sizes add up to about n (then trimmed or topped up to n exactly);
- per-class spread: each class draws its own noise scale, log-normal around `spread`;
- each sample: normalise(centre + scale * gaussian / sqrt(dim)), i.e. unit rows.

`spread` sets the difficulty; the defaults put the exact Recall@1 between 0.6 and 0.9 at
100k and at 1M x 512 (RESULTS.md and benchmarks/eval_reference.json record the measured
values). Generation runs in row blocks, so peak memory is the output array plus one block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines a generated set: same spec, same bytes."""

    n: int
    dim: int = 512
    classes: int | None = None  # default: n // 10 (mean class size 10)
    max_size: int = 100
    spread: float = 2.0
    spread_sd: float = 0.2  # sd of log(scale) across classes
    near_duplicates: float = 0.1
    duplicate_angle: float = 0.6  # radians between a near-duplicate and its original, before noise
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return self.classes if self.classes is not None else max(1, self.n // 10)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "classes": self.num_classes}


def class_sizes(n: int, classes: int, max_size: int, rng: np.random.Generator) -> np.ndarray:
    """Zipf-like sizes in [2, max_size] adding up to exactly n."""
    if classes * 2 > n:
        raise ValueError(f"{classes} classes of at least 2 samples need n >= {2 * classes}, got {n}")
    if classes * max_size < n:
        raise ValueError(f"{classes} classes of at most {max_size} samples cannot hold {n}")
    s = np.arange(2, max_size + 1, dtype=np.float64)
    target = n / classes

    def mean(alpha: float) -> float:
        p = s**-alpha
        return float((s * p).sum() / p.sum())

    lo, hi = -5.0, 10.0  # mean(alpha) decreases in alpha
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) > target else (lo, mid)
    p = s**-lo
    sizes = rng.choice(s.astype(np.int64), size=classes, p=p / p.sum())
    # fix the total: add to / take from random classes within the bounds
    while (diff := n - int(sizes.sum())) != 0:
        room = np.flatnonzero(sizes < max_size) if diff > 0 else np.flatnonzero(sizes > 2)
        pick = rng.choice(room, size=min(abs(diff), len(room)), replace=False)
        sizes[pick] += 1 if diff > 0 else -1
    return sizes


def make_realistic(spec: DataSpec, out: np.ndarray | None = None, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (n, dim) with unit rows, labels int64 (n,)), shuffled order.

    out: an array (or np.memmap) of shape (n, dim) to fill instead of allocating one.
    """
    rng = np.random.default_rng(spec.seed)
    centres, scale, labels = _classes(spec, rng)
    d = spec.dim
    x = np.empty((spec.n, d), dtype=np.float32) if out is None else out
    for b in range(0, spec.n, block):
        lab = labels[b : b + block]
        noise = rng.standard_normal((len(lab), d), dtype=np.float32)
        noise *= (scale[lab] / np.sqrt(d))[:, None]
        noise += centres[lab]
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        x[b : b + block] = noise
    return x, labels


def _classes(spec: DataSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres, per-class noise scales and the shuffled labels: the first draws of the generator."""
    c, d = spec.num_classes, spec.dim
    centres = rng.standard_normal((c, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    dup = rng.choice(c, size=int(spec.near_duplicates * c), replace=False)
    if len(dup):
        origin = rng.integers(0, c, len(dup))
        step = rng.standard_normal((len(dup), d)).astype(np.float32)
        step -= (step * centres[origin]).sum(1, keepdims=True) * centres[origin]  # orthogonal to the original
        step /= np.linalg.norm(step, axis=1, keepdims=True)
        a = np.float32(spec.duplicate_angle)
        centres[dup] = np.cos(a) * centres[origin] + np.sin(a) * step
    scale = (spec.spread * np.exp(spec.spread_sd * rng.standard_normal(c))).astype(np.float32)
    labels = np.repeat(np.arange(c, dtype=np.int64), class_sizes(spec.n, c, spec.max_size, rng))
    rng.shuffle(labels)
    return centres, scale, labels


def make_labels(spec: DataSpec) -> np.ndarray:
    """The labels make_realistic(spec) returns, without drawing the embeddings (seconds at 1M)."""
    return _classes(spec, np.random.default_rng(spec.seed))[2]


def save_realistic(spec: DataSpec, folder: str | Path) -> tuple[Path, Path]:
    """Write x.npy / y.npy under folder (built block by block on disk); return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    xp, yp = folder / f"x{spec.n}.npy", folder / f"y{spec.n}.npy"
    mm = np.lib.format.open_memmap(xp, mode="w+", dtype=np.float32, shape=(spec.n, spec.dim))
    _, y = make_realistic(spec, out=mm)
    mm.flush()
    del mm
    np.save(yp, y)
    return xp, yp


def default_spec(n: int, seed: int = 0) -> DataSpec:
    """The benchmark's data at size n (1M: 100k classes, mean size 10)."""
    return DataSpec(n=n, seed=seed)
