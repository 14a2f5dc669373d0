"""Step 5: export a trained model and publish it as DEST/vN/, then move DEST/latest to it.

Layout of a destination:

    DEST/v1/  model.safetensors  model.ts  model.onnx  classes.txt  config.json
              model_card.json  MODEL_CARD.md  .reserved
    DEST/v2/  ...
    DEST/latest            {"version": 2, "path": "v2", ...}

Guarantees:
- Nothing is written below the recall gate (`publish_decision`, the one gate; scheduled retraining
  asks it too, with the destination, to also beat the published model).
- Publishing is idempotent: the same model (weights, config, classes, metrics, data summary and
  export choices: the card's `publish_key`) published again, as a retried task does, returns its
  existing version and writes nothing, except moving `latest` to it if an earlier attempt died
  before doing so.
- Exports are checked against the eager model before anything is uploaded.
- `latest` is written last and atomically, so a crash at any point leaves it on the previous
  complete version; a half-uploaded vN is never pointed to.
- A version number is taken by creating DEST/vN/.reserved exclusively (O_EXCL locally;
  `x-oss-forbid-overwrite` on OSS, via trainer.storage.create_exclusive), so two
  publishes racing get different numbers. Each writes `latest` atomically and does not move it
  back to a lower version than it finds there; the two last steps (read, then write) are not
  one atomic operation, so two racers finishing in the same instant can leave `latest` on
  the lower of the two versions, never on a broken one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imlt.trainer import storage
from imlt.trainer.model_card import data_summary, model_card, redact_url, render_card, sha256_file, usage_record, utc_now
from imlt.trainer.model_files import CARD_JSON, CARD_MD, CLASSES, CONFIG, ONNX, TORCHSCRIPT, WEIGHTS
from imlt.trainer.step_models import PublishInput, PublishOutput

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LATEST = "latest"
RESERVED = ".reserved"
EXPORT_TOLERANCE = 1e-5
CHECK_BATCHES = (2, 3)  # two sizes: a dynamic batch dimension that was baked in fails the check
RECALL_KEY = "recall_at_1"
RECHECK_VERSIONS = 20  # how many of the newest versions a publish compares itself with (retry detection)
_VERSION_DIR = re.compile(r"v(\d+)")


class PublishError(RuntimeError):
    """Publishing stopped before `latest` moved; the message says which check failed."""


def publish_model(inp: PublishInput) -> PublishOutput:
    """Gate on Recall@1, export and check, upload DEST/vN/, then point DEST/latest at it.

    Idempotent: a model already published at the destination (same weights, config, classes,
    metrics, data summary and export choices: a retried task) returns that version instead of a
    new one, and moves `latest` only if the first attempt died before moving it.
    """
    from imlt.trainer.evaluate import read_metrics
    from imlt.trainer.model import load_embedding_model

    metrics = read_metrics(inp.metrics_dir) if inp.metrics_dir else None
    go, reason = publish_decision(metrics, None, inp.min_recall_at_1, metrics_dir=inp.metrics_dir)
    if not go:
        log.warning("not publishing: %s", reason)
        return PublishOutput(published=False, version_dir=None, version=None, reason=reason)

    summary, usage = data_summary(inp.dataset_dir), usage_record(inp.model_dir)  # read early: fail before exporting
    with tempfile.TemporaryDirectory(prefix="imlt-publish-") as tmp:
        staging = Path(tmp)
        for name in (WEIGHTS, CONFIG, CLASSES):  # verbatim: a version folder loads like a model folder
            (staging / name).write_bytes(storage.read_bytes(storage.join(inp.model_dir, name)))
        key = publish_key(staging, (WEIGHTS, CONFIG, CLASSES), metrics, summary, inp)
        done = find_published(inp.destination, key)
        if done is not None:
            version, card = done
            version_dir = storage.join(inp.destination, f"v{version}")
            log.info("%s already holds this model (a retried publish?): returning v%d", redact_url(version_dir), version)
            point_latest(inp.destination, version, card)  # only if an earlier attempt died before moving it
            return PublishOutput(published=True, version_dir=version_dir, version=version,
                                 reason=f"already published as v{version}")

        model, cfg = load_embedding_model(inp.model_dir)
        image_size = cfg.data.image_size
        log.info("publishing %s (config %s) to %s", inp.model_dir, cfg.config_hash(), redact_url(inp.destination))
        if inp.export_torchscript:
            log.info("exporting TorchScript")
            export_torchscript(model, image_size, staging / TORCHSCRIPT)
        if inp.export_onnx:
            log.info("exporting ONNX")
            export_onnx(model, image_size, staging / ONNX)
        diffs = check_exports(model, staging, image_size)

        version = reserve_version(inp.destination)
        version_dir = storage.join(inp.destination, f"v{version}")
        config = json.loads((staging / CONFIG).read_text(encoding="utf-8"))
        gate = {"min_recall_at_1": inp.min_recall_at_1, "metric": RECALL_KEY, "decision": reason}
        export_check = {"batches": list(CHECK_BATCHES), "tolerance": EXPORT_TOLERANCE, "max_abs_diff": diffs}
        card = model_card(inp, staging, config, metrics, summary, usage, version, gate, export_check)
        card["publish_key"] = key
        (staging / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
        (staging / CARD_MD).write_text(render_card(card))
        log.info("uploading to %s", version_dir)
        storage.upload_dir(staging, version_dir)
    point_latest(inp.destination, version, card)
    log.info("published %s (latest -> v%d)", version_dir, version)
    return PublishOutput(published=True, version_dir=version_dir, version=version)


def publish_decision(
    metrics: dict[str, Any] | None, destination: str | None, floor: float | str, *, metrics_dir: str | None = None
) -> tuple[bool, str]:
    """The one publishing gate: (publish?, why).

    Recall@1 must reach `floor`; with a `destination`, it must also beat the Recall@1 of the model
    published there (scheduled retraining asks this before it publishes). No metrics is fine only
    when there is nothing to check.
    """
    floor = float(floor)  # Airflow templates hand it over as text
    if metrics is None:
        if floor > 0 or destination is not None:
            raise ValueError(f"min_recall_at_1={floor} needs metrics_dir (an evaluate output) to check against")
        return True, "no gate"
    if not isinstance(metrics.get(RECALL_KEY), (int, float)):
        raise ValueError(f"{storage.join(metrics_dir or '', 'metrics.json')}: no numeric '{RECALL_KEY}'")
    recall = float(metrics[RECALL_KEY])
    if recall < floor:
        digits = 2 if f"{recall:.2f}" != f"{floor:.2f}" else 4
        return False, f"Recall@1 {recall:.{digits}f} is below the gate {floor:.{digits}f}"
    if destination is None:
        return True, f"Recall@1 {recall:.4f} >= gate {floor:.4f}"
    current = published_metrics(destination)
    if current is None or RECALL_KEY not in current:
        return True, f"Recall@1 {recall:.4f} >= gate {floor:.4f} and nothing is published at {redact_url(destination)}: publishing"
    best = float(current[RECALL_KEY])
    if recall <= best:
        return False, f"Recall@1 {recall:.4f} does not beat the published model's {best:.4f}: not publishing"
    return True, f"Recall@1 {recall:.4f} beats the gate {floor:.4f} and the published {best:.4f}: publishing"


# --- exports ---------------------------------------------------------------------------------------


def _example(batch: int, image_size: int, seed: int = 0) -> "torch.Tensor":
    import torch

    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def export_torchscript(model: "torch.nn.Module", image_size: int, path: Path) -> None:
    import torch

    model = model.cpu().eval()
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.export, but TorchScript is still what
        # LibTorch (C++) and many serving stacks load; the check below proves it works
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, _example(CHECK_BATCHES[0], image_size))
        torch.jit.save(traced, str(path))


def export_onnx(model: "torch.nn.Module", image_size: int, path: Path) -> None:
    import torch

    model = model.cpu().eval()
    big = sum(p.numel() * p.element_size() for p in model.state_dict().values()) > 1.5 * 2**30
    torch.onnx.export(
        model,
        (_example(CHECK_BATCHES[0], image_size),),
        str(path),
        dynamo=True,
        external_data=big,  # ONNX protobufs stop at 2 GiB; beyond, weights go to model.onnx.data
        input_names=["images"],
        output_names=["embeddings"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        verbose=False,
    )


def check_exports(model: "torch.nn.Module", folder: Path, image_size: int) -> dict[str, float]:
    """Largest |export - eager| per export over batches of 2 and 3; PublishError above tolerance."""
    import numpy as np
    import torch

    runners: dict[str, Any] = {}
    if (folder / TORCHSCRIPT).exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(folder / TORCHSCRIPT), map_location="cpu")
        runners["torchscript"] = lambda x: scripted(x).numpy()
    if (folder / ONNX).exists():
        import onnxruntime as ort

        session = ort.InferenceSession(str(folder / ONNX), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        runners["onnx"] = lambda x: session.run(None, {name: x.numpy()})[0]
    if not runners:
        return {}
    model = model.cpu().eval()
    worst = {k: 0.0 for k in runners}
    with torch.inference_mode():
        for seed, batch in enumerate(CHECK_BATCHES, start=1):
            x = _example(batch, image_size, seed)
            eager = model(x).numpy()
            for k, run in runners.items():
                try:
                    out = np.asarray(run(x))
                except Exception as e:  # a runtime that cannot run its export: say which one
                    raise PublishError(f"{k} export fails on a batch of {batch}: {type(e).__name__}: {e}") from e
                if out.shape != eager.shape:
                    raise PublishError(f"{k} export returns shape {out.shape} for a batch of {batch}, eager {eager.shape}")
                worst[k] = max(worst[k], float(np.abs(out - eager).max()))
    bad = {k: v for k, v in worst.items() if not v <= EXPORT_TOLERANCE}
    if bad:
        detail = ", ".join(f"{k} differs by {v:.2e}" for k, v in bad.items())
        raise PublishError(f"exports do not reproduce the eager model within {EXPORT_TOLERANCE}: {detail}")
    return worst


# --- versions and the latest pointer --------------------------------------------------------------


def existing_versions(destination: str) -> list[int]:
    """Version numbers present under destination (any vN folder holding a file)."""
    found = set()
    for url in storage.list_files(destination):
        first = _relative(url, destination).split("/", 1)[0]
        m = _VERSION_DIR.fullmatch(first)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def reserve_version(destination: str, attempts: int = 1000) -> int:
    """Claim the next free version number by creating its marker exclusively."""
    version = max(existing_versions(destination), default=0) + 1
    marker = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": utc_now()}).encode()
    for _ in range(attempts):
        if storage.create_exclusive(storage.join(destination, f"v{version}", RESERVED), marker):
            return version
        version += 1  # a concurrent publish took it
    raise PublishError(f"{destination}: could not reserve a version after {attempts} attempts")


def publish_key(staging: Path, model_files: tuple[str, ...], metrics: dict[str, Any] | None,
                summary: dict[str, Any] | None, inp: PublishInput) -> str:
    """What makes two publishes the same one: the model's files, its metrics and data, the export choices.

    Exports are left out (their bytes need not be reproducible); the choice to export is in.
    """
    h = hashlib.sha256()
    for name in model_files:
        h.update(f"{name}\0{sha256_file(staging / name)}\0".encode())
    h.update(json.dumps({"metrics": metrics, "data": summary, "gate": inp.min_recall_at_1,
                         "onnx": inp.export_onnx, "torchscript": inp.export_torchscript},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def find_published(destination: str, key: str) -> tuple[int, dict[str, Any]] | None:
    """(version, card) of a complete version among the newest RECHECK_VERSIONS published with `key`."""
    files: dict[int, set[str]] = {}
    for url in storage.list_files(destination):
        first, _, rest = _relative(url, destination).partition("/")
        m = _VERSION_DIR.fullmatch(first)
        if m and rest:
            files.setdefault(int(m.group(1)), set()).add(rest)
    for version in sorted(files, reverse=True)[:RECHECK_VERSIONS]:
        if CARD_JSON not in files[version]:
            continue  # reserved or still uploading
        try:
            card = json.loads(storage.read_text(storage.join(destination, f"v{version}", CARD_JSON)))
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        if card.get("publish_key") == key and set(card.get("files", {})) | {CARD_MD} <= files[version]:
            return version, card
    return None


def point_latest(destination: str, version: int, card: dict[str, Any]) -> None:
    """Write DEST/latest atomically, unless it already names this version or a higher one."""
    current = _read_latest(destination, missing_ok=True)
    if current is not None and int(current.get("version", 0)) == version:
        return
    if current is not None and int(current.get("version", 0)) > version:
        log.warning("%s already points to v%s; leaving it (v%d is published but not latest)",
                    storage.join(destination, LATEST), current["version"], version)
        return
    pointer = {
        "version": version,
        "path": f"v{version}",
        "config_hash": card.get("config_hash"),
        "recall_at_1": (card.get("metrics") or {}).get("recall_at_1"),
        "published_at": card["created"],
    }
    storage.write_text(storage.join(destination, LATEST), json.dumps(pointer, indent=2) + "\n")


def resolve_published(destination: str) -> str:
    """The folder of the version `latest` points to (loadable like a train output folder)."""
    pointer = _read_latest(destination, missing_ok=False)
    assert pointer is not None
    return storage.join(destination, pointer["path"])


def _read_latest(destination: str, missing_ok: bool) -> dict[str, Any] | None:
    url = storage.join(destination, LATEST)
    try:
        text = storage.read_text(url)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise FileNotFoundError(f"{url}: nothing published at {redact_url(destination)} yet") from None
    try:
        pointer = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(pointer, dict) or not _VERSION_DIR.fullmatch(str(pointer.get("path", ""))):
        raise ValueError(f"{url}: expected {{\"version\": N, \"path\": \"vN\"}}, got {text[:200]!r}")
    return pointer


def _relative(url: str, base: str) -> str:
    for prefix in (base.rstrip("/") + "/", base.removeprefix("file://").rstrip("/") + "/"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return url


# --- what is published -----------------------------------------------------------------------------


def published_metrics(destination: str) -> dict[str, Any] | None:
    """Metrics of the model card that DESTINATION/latest points at; None when nothing is published."""
    try:
        folder = resolve_published(destination)
    except FileNotFoundError:
        return None
    card = json.loads(storage.read_text(storage.join(folder, CARD_JSON)))
    return dict(card.get("metrics") or {})
