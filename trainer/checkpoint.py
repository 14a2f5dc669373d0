"""Training checkpoints: where they live, which are kept, one dict a file, named for where the run stood.

Location: their own folder, never inside the model folder (the artifact that evaluate and
publish download): `train.checkpoint_dir`, by default the model folder's sibling
`<output_dir>-checkpoints` (local or oss://). Resume looks there. Kept: every epoch
checkpoint of the last `train.keep_checkpoints` epochs written, plus the best epoch's (highest
val Recall@1 when the run validates, else the lowest mean training loss, the one score every run
has: `epoch_scores`), plus the newest mid-epoch one.

Names: `epoch-0003.ckpt` after three complete epochs; `epoch-0003-batch-000012.ckpt` when a
run was stopped (SIGTERM, time limit) after 12 batches of the fourth epoch. `latest_checkpoint`
orders by (epoch, batch) parsed from the name, because a plain string sort would put the
mid-epoch name before `epoch-0003.ckpt`.

Files are written through trainer.storage (whole object or nothing, local or oss://) and read
with `torch.load(weights_only=True)`: a checkpoint can never run code, so every value in it is a
tensor, a number, a string or a list/dict/tuple of those (RNG states included).

A model-parallel run writes a *sharded* checkpoint instead: a folder with the same name
(`epoch-0003.ckpt/`) holding one file per rank for the class shards and their optimiser state,
the replicated part once, and `sharded.json`, written last (`save_sharded`).
A folder without `sharded.json` is an interrupted save and is not listed.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from imlt.trainer import storage
from imlt.trainer.collectives import barrier
from imlt.trainer.config import ConfigError, RunConfig, config_diff
from imlt.trainer.process_group import DistEnv

CHECKPOINTS_SUFFIX = "-checkpoints"
SHARD_META = "sharded.json"
REPLICATED_FILE = "replicated.pt"
_NAME = re.compile(r"^epoch-(\d{4,})(?:-batch-(\d{6,}))?\.ckpt$")


# Config fields that say where a run's files go, not how it trains: resume allows them to change.
WHERE_FIELDS = ("output_dir:", "train.checkpoint_dir:", "train.keep_checkpoints:", "train.log_every_steps:", "train.threads:")


class ResumeConfigError(ConfigError):
    """The checkpoint found belongs to a run with different parameters."""


def check_resumable(state: dict[str, Any], cfg: RunConfig, url: str) -> None:
    """Refuse a checkpoint written under another config, naming every changed field.

    Locations and logging are left out: a run folder can be moved (e.g. downloaded from OSS) and resumed.
    """
    changed = [c for c in config_diff(state["config"], cfg.model_dump(mode="json")) if not c.startswith(WHERE_FIELDS)]
    if changed:
        raise ResumeConfigError(
            f"cannot resume from {url}: it was written with config {state['config_hash']}, this run's is "
            f"{cfg.config_hash()}. A run's parameters cannot change; changed fields:\n  "
            + "\n  ".join(changed)
            + "\nUse a new output_dir, or resume=false to start over in this one."
        )


def checkpoint_dir(cfg: RunConfig) -> str:
    """The run's checkpoint folder: train.checkpoint_dir, else `<output_dir>-checkpoints` beside the model folder."""
    if cfg.train.checkpoint_dir:
        return cfg.train.checkpoint_dir.rstrip("/")
    out = cfg.output_dir.rstrip("/")
    _, remote, path = out.partition("://")
    if remote and not out.startswith("file://"):
        root = "/" not in path  # oss://bucket: its sibling would be another bucket
    else:
        root = out.removeprefix("file://").strip("/") == ""
    if root:
        raise ConfigError(
            f"output_dir={cfg.output_dir!r} is a bucket or file-system root, so it has no sibling folder for "
            "checkpoints; set train.checkpoint_dir, or use a folder below it as output_dir"
        )
    return out + CHECKPOINTS_SUFFIX


def stale_checkpoints(
    found: list[tuple[tuple[int, int], str]], here: tuple[int, int], keep_last: int, epoch_loss: dict[int, float]
) -> list[str]:
    """URLs to delete after saving checkpoint `here` (epoch, batch): older mid-epoch checkpoints, and
    epoch checkpoints beyond the last `keep_last` that are not the best (lowest `epoch_loss`;
    epochs without a score never win). `found` is list_checkpoints' answer.
    """
    epochs = [(key, url) for key, url in found if key[1] == 0]
    keep = {url for _, url in epochs[-keep_last:]}
    scored = [(epoch_loss[key[0]], key, url) for key, url in epochs if key[0] in epoch_loss]
    if scored:
        keep.add(min(scored)[2])
    stale = [url for key, url in found if key[1] > 0 and key < here]
    return stale + [url for _, url in epochs if url not in keep]


def epoch_scores(history: list[Any]) -> dict[int, float]:
    """Per-epoch scores for `stale_checkpoints`, lower is better: minus val Recall@1 over the
    validated epochs when there are any (unvalidated epochs then never win), else the training loss."""
    validated = {h.epoch: -h.val_recall_at_1 for h in history if h.val_recall_at_1 is not None}
    return validated or {h.epoch: h.loss for h in history}


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
    storage.write_bytes(url, _to_bytes(state))


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


# --- sharded checkpoints (model parallel) ----------------------------------------------------------


class ShardedCheckpointError(RuntimeError):
    """A sharded checkpoint that cannot be used by this run; the message says what to do."""


def shard_file(rank: int, world_size: int) -> str:
    return f"classifier-rank{rank}-of-{world_size}.pt"


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes, url: str) -> Any:
    try:
        # weights_only: a checkpoint is data, never code to run
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ShardedCheckpointError(f"{url}: not a readable checkpoint file ({type(e).__name__}: {e})") from None


def save_sharded(state: dict[str, Any], directory: str, env: DistEnv, *, sharded_keys: Iterable[str] = ("classifier",)) -> None:
    """Write `state`: keys in `sharded_keys` once per rank, everything else once from rank 0.

    Every rank must call this (it synchronises). `sharded.json` is written last, by rank 0 after
    all shards exist, so a folder without it is an interrupted save. An optimizer that holds the
    shard's parameters has per-rank state too: list its key in `sharded_keys`.
    """
    keys = list(sharded_keys)
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"save_sharded: state has no {', '.join(missing)} (keys: {', '.join(state)})")
    shard = {k: state[k] for k in keys}
    storage.write_bytes(storage.join(directory, shard_file(env.rank, env.world_size)), _to_bytes(shard))
    barrier()
    if env.rank == 0:
        replicated = {k: v for k, v in state.items() if k not in keys}
        storage.write_bytes(storage.join(directory, REPLICATED_FILE), _to_bytes(replicated))
        meta = {
            "format": 1,
            "world_size": env.world_size,
            "sharded_keys": keys,
            "shard_files": [shard_file(r, env.world_size) for r in range(env.world_size)],
            "replicated_file": REPLICATED_FILE,
        }
        storage.write_text(storage.join(directory, SHARD_META), json.dumps(meta, indent=2) + "\n")
    barrier()


def read_shard_meta(directory: str) -> dict[str, Any]:
    url = storage.join(directory, SHARD_META)
    if not storage.exists(url):
        raise ShardedCheckpointError(
            f"{directory}: no {SHARD_META}; not a sharded checkpoint, or its save was interrupted"
        )
    try:
        meta = json.loads(storage.read_text(url))
        int(meta["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShardedCheckpointError(f"{url}: unreadable ({type(e).__name__}: {e})") from None
    return meta


def load_sharded(directory: str, env: DistEnv) -> dict[str, Any]:
    """This rank's view of a sharded checkpoint: the replicated part plus its own shard.

    The shard layout depends on the world size, so a different world size is refused.
    """
    meta = read_shard_meta(directory)
    written_by = int(meta["world_size"])
    if written_by != env.world_size:
        raise ShardedCheckpointError(
            f"checkpoint {directory} was written by {written_by} workers, this run has {env.world_size}: "
            f"resume with --nproc-per-node {written_by} (or nnodes x nproc-per-node = {written_by}), "
            "or start a new run in a new output_dir; the class shards depend on the number of workers"
        )
    shard_url = storage.join(directory, shard_file(env.rank, env.world_size))
    if not storage.exists(shard_url):
        raise ShardedCheckpointError(f"{shard_url} is missing: the checkpoint in {directory} is incomplete")
    state = dict(_from_bytes(storage.read_bytes(storage.join(directory, meta.get("replicated_file", REPLICATED_FILE))), directory))
    state.update(_from_bytes(storage.read_bytes(shard_url), shard_url))
    return state
