"""Training checkpoints: one dict a file, named so a person can read where the run stood.

Names: `epoch-0003.ckpt` after three complete epochs; `epoch-0003-batch-000012.ckpt` when a
run was stopped (SIGTERM, time limit) after 12 batches of the fourth epoch. `latest_checkpoint`
orders by (epoch, batch) parsed from the name, because a plain string sort would put the
mid-epoch name before `epoch-0003.ckpt`.

Files are written through trainer.storage (whole object or nothing, local or oss://) and read
with `torch.load(weights_only=True)`: a checkpoint can never run code, so every value in it is a
tensor, a number, a string or a list/dict/tuple of those (RNG states included).

A model-parallel run writes a *sharded* checkpoint instead: a folder with the same name
(`epoch-0003.ckpt/`) holding one file per rank for the class shards and their optimiser state,
the replicated part once, and `sharded.json`, written last (trainer.distributed.save_sharded).
A folder without `sharded.json` is an interrupted save and is not listed.
"""

from __future__ import annotations

import io
import random
import re
from typing import Any

import numpy as np
import torch

from imlt.trainer import storage
from imlt.trainer.distributed import SHARD_META

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^epoch-(\d{4,})(?:-batch-(\d{6,}))?\.ckpt$")


def checkpoint_name(epoch: int, batch: int = 0) -> str:
    """`epoch` complete epochs, plus `batch` batches into the next one (0: an epoch boundary)."""
    return f"epoch-{epoch:04d}.ckpt" if batch == 0 else f"epoch-{epoch:04d}-batch-{batch:06d}.ckpt"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(epoch, batch) of a checkpoint file name; None for any other file."""
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def list_checkpoints(checkpoint_dir: str) -> list[tuple[tuple[int, int], str]]:
    """Every complete checkpoint below a folder as ((epoch, batch), url), oldest first.

    A sharded checkpoint is listed by its folder's URL, and only once its `sharded.json` exists.
    """
    found = []
    for url in storage.list_files(checkpoint_dir):
        parent, _, name = url.rstrip("/").rpartition("/")
        if name == SHARD_META:
            url, name = parent, parent.rpartition("/")[2]
        key = parse_checkpoint_name(name)
        if key is not None:
            found.append((key, url))
    return sorted(found)


def is_sharded(url: str) -> bool:
    """True for a sharded checkpoint folder (one with its `sharded.json`)."""
    return storage.exists(storage.join(url, SHARD_META))


def delete_checkpoint(url: str) -> None:
    """Remove a checkpoint; a sharded one loses its `sharded.json` first, so a crash mid-delete
    leaves an unlisted folder rather than a listed, incomplete checkpoint."""
    if is_sharded(url):
        storage.delete(storage.join(url, SHARD_META))
    storage.delete(url)


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """URL of the furthest-along checkpoint in a folder, or None when there is none."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def save_checkpoint(url: str, state: dict[str, Any]) -> None:
    """Serialise in memory, then one atomic write: a crash mid-save leaves the previous file intact."""
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(url, buf.getvalue())


def load_checkpoint(url: str) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; weights_only refuses anything but tensors and plain data."""
    from imlt.trainer.model import read_state_dict  # the one weights-only loader, with short refusals

    try:
        state = read_state_dict(url)
    except ValueError as e:  # a truncated, foreign or pickle-bearing file: say which one, briefly
        raise RuntimeError(f"{url}: not a readable checkpoint ({str(e).removeprefix(url + ': ')})") from None
    if not isinstance(state, dict) or "epoch" not in state:
        raise RuntimeError(f"{url}: not a training checkpoint (no 'epoch' key)")
    return state


# --- RNG state as plain data (weights_only-safe) --------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The global generators of torch (CPU and CUDA), numpy and Python, as tensors and lists."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
