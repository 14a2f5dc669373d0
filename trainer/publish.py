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
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from imlt.trainer import storage
from imlt.trainer.model_files import CARD_JSON, CARD_MD, CLASSES, CONFIG, ONNX, PRETRAINED, TORCHSCRIPT, USAGE, WEIGHTS
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

    summary, usage = _data_summary(inp.dataset_dir), _usage(inp.model_dir)  # read early: fail before exporting
    with tempfile.TemporaryDirectory(prefix="imlt-publish-") as tmp:
        staging = Path(tmp)
        for name in (WEIGHTS, CONFIG, CLASSES):  # verbatim: a version folder loads like a model folder
            (staging / name).write_bytes(storage.read_bytes(storage.join(inp.model_dir, name)))
        key = publish_key(staging, (WEIGHTS, CONFIG, CLASSES), metrics, summary, inp)
        done = find_published(inp.destination, key)
        if done is not None:
            version, card = done
            version_dir = storage.join(inp.destination, f"v{version}")
            log.info("%s already holds this model (a retried publish?): returning v%d", _redact(version_dir), version)
            point_latest(inp.destination, version, card)  # only if an earlier attempt died before moving it
            return PublishOutput(published=True, version_dir=version_dir, version=version,
                                 reason=f"already published as v{version}")

        model, cfg = load_embedding_model(inp.model_dir)
        image_size = cfg.data.image_size
        log.info("publishing %s (config %s) to %s", inp.model_dir, cfg.config_hash(), _redact(inp.destination))
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
        card = model_card(inp, staging, config, metrics, summary, usage, version, diffs, gate_reason=reason)
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
        return True, f"Recall@1 {recall:.4f} >= gate {floor:.4f} and nothing is published at {_redact(destination)}: publishing"
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
    marker = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": _now()}).encode()
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
        h.update(f"{name}\0{_sha256(staging / name)}\0".encode())
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
        raise FileNotFoundError(f"{url}: nothing published at {_redact(destination)} yet") from None
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


# --- model card ------------------------------------------------------------------------------------


def model_card(
    inp: PublishInput,
    staging: Path,
    config: dict[str, Any],
    metrics: dict[str, Any] | None,
    summary: dict[str, Any] | None,
    usage: dict[str, Any] | None,
    version: int,
    export_diffs: dict[str, float],
    gate_reason: str | None = None,
) -> dict[str, Any]:
    """Everything a consumer needs to trust and use a version, as JSON."""
    classes = (staging / CLASSES).read_text(encoding="utf-8").splitlines()
    size = config["data"]["image_size"]
    evaluation = (metrics or {}).get("evaluation")
    measured_on = evaluation.get("dataset") if isinstance(evaluation, dict) else None
    return {
        "version": version,
        "created": _now(),
        "config_hash": config.get("config_hash"),
        "backbone": config["model"]["backbone"],
        "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32",
                  "preprocessing": serving_preprocessing(size)},
        "output": {"name": "embeddings", "shape": ["batch", config["model"]["feature_dim"]], "dtype": "float32",
                   "note": "L2-normalised: compare by dot product (cosine similarity)"},
        "metrics": metrics,
        "measured_on": measured_on,
        "gate": {"min_recall_at_1": inp.min_recall_at_1, "metric": RECALL_KEY, "decision": gate_reason},
        "num_classes": len(classes),
        "data": _without_local_paths(summary),
        "usage": usage,
        "pretrained": json.loads(storage.read_text(p)) if storage.exists(p := storage.join(inp.model_dir, PRETRAINED)) else None,
        "config": _without_local_paths(config),
        "export_check": {"batches": list(CHECK_BATCHES), "tolerance": EXPORT_TOLERANCE, "max_abs_diff": export_diffs},
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                  for p in sorted(staging.iterdir()) if p.is_file()},
        # local folders are a task's temporary space, meaningless to a reader: only remote URLs
        "sources": {"model_dir": _remote(inp.model_dir), "metrics_dir": _remote(inp.metrics_dir),
                    "dataset_dir": _remote(inp.dataset_dir)},
    }


def serving_preprocessing(image_size: int) -> dict[str, Any]:
    """What a serving system must do to an image, read off the evaluation transform itself.

    Derived from the transform object rather than written as text, so the card cannot drift from
    what evaluate measured: an operation this does not know is an error, not a silent omission.
    """
    from torchvision.transforms import v2

    from imlt.trainer.data.transforms import build_eval_transform

    spec: dict[str, Any] = {"decode": "any format Pillow reads; convert to RGB (3 channels)", "channel_order": "RGB",
                            "layout": "NCHW", "dtype": "float32"}
    words = ["Decode the image and convert it to RGB (channel order R, G, B; alpha dropped, grey repeated)."]
    for op in build_eval_transform(image_size).transforms:
        if isinstance(op, v2.ToImage):
            continue
        if isinstance(op, v2.Resize):
            side = op.size[0] if isinstance(op.size, (list, tuple)) and len(op.size) == 1 else op.size
            interp = getattr(op.interpolation, "value", str(op.interpolation))
            spec["resize"] = {"shorter_side": side, "interpolation": interp, "antialias": bool(op.antialias),
                              "keep_aspect_ratio": True}
            words.append(f"Resize so the shorter side is {side} px, keeping the aspect ratio "
                         f"({interp}{', antialiased' if op.antialias else ''}).")
        elif isinstance(op, v2.CenterCrop):
            h, w = op.size
            spec["center_crop"] = [h, w]
            words.append(f"Crop the central {h}x{w} (height x width) pixels.")
        elif isinstance(op, v2.ToDtype):
            spec["value_range"] = [0.0, 1.0] if op.scale else None
            words.append("Convert to float32 and divide the 0-255 pixel values by 255 (range 0 to 1)."
                         if op.scale else "Convert to float32 without scaling.")
        elif isinstance(op, v2.Normalize):
            spec["mean"], spec["std"] = [float(m) for m in op.mean], [float(x) for x in op.std]
            words.append(f"Per channel (R, G, B), subtract mean {tuple(spec['mean'])} and divide by std {tuple(spec['std'])}.")
        else:
            raise TypeError(f"model card: the evaluation transform has {type(op).__name__}, which the card cannot describe")
    words.append(f"Feed a float32 tensor of shape [batch, 3, {image_size}, {image_size}] (NCHW).")
    spec["steps"] = words
    return spec


def _without_local_paths(obj: Any) -> Any:
    """The card's copy with each local path cut to `.../name`: the folders were a task's temporary
    space (meaningless to a reader, and they leak host layout); remote URLs stay, credentials removed.
    config.json in the version folder keeps the full values the model was trained with."""
    if isinstance(obj, dict):
        return {k: _without_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_without_local_paths(v) for v in obj]
    if isinstance(obj, str):
        if obj.startswith("file://") or (obj.startswith("/") and len(obj) > 1):
            return ".../" + obj.rstrip("/").rsplit("/", 1)[-1]
        if "://" in obj:
            return _redact(obj)
    return obj


def _remote(url: str | None) -> str | None:
    """A remote URL without credentials; None for a local path (a task's temporary folder)."""
    if not url or "://" not in url or url.startswith("file://"):
        return None
    return _redact(url)


def _data_summary(dataset_dir: str | None) -> dict[str, Any] | None:
    from imlt.trainer.data.manifest import read_summary

    return read_summary(dataset_dir).model_dump(mode="json") if dataset_dir else None


def _usage(model_dir: str) -> dict[str, Any] | None:
    """The train step's usage record (instance-minutes, GPUs), if it wrote one."""
    url = storage.join(model_dir, USAGE)
    if not storage.exists(url):
        return None
    try:
        usage = json.loads(storage.read_text(url))
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}:{e.lineno}: not valid JSON ({e.msg})") from None
    return usage if isinstance(usage, dict) else {"value": usage}


def _search_words(ev: dict[str, Any]) -> str:
    """Which exact search ran (and how many queries its certificate sent back to fp32), if recorded."""
    if not ev.get("backend"):
        return ""
    fallback = ev.get("search_fallback_rows")
    return f" by {ev['backend']}" + (f", {fallback} of them re-searched in fp32" if fallback else "")


def _evaluation_lines(ev: Any, metrics: dict[str, Any]) -> list[str]:
    """How the metrics were measured: an estimate from sampled queries is never shown as exact."""
    if not isinstance(ev, dict):
        return []
    search = _search_words(ev)
    if ev.get("exact"):
        return [f"Exact: every one of {ev.get('num_queries')} queries evaluated (no sampling error){search}.", ""]
    ivs = ev.get("intervals") or {}
    lines = [f"Estimated from {ev.get('num_queries')} randomly sampled queries of {ev.get('num_eligible_queries')} "
             f"(seed {ev.get('sample_seed')}), each searched exactly{search}; 95% intervals: {ev.get('interval_method')}.",
             "", "| metric | estimate | 95% interval | half-width |", "|---|---|---|---|"]
    return lines + [f"| {m} | {float(metrics.get(m, float('nan'))):.4f} | {lo:.4f} – {hi:.4f} | {(hi - lo) / 2:.4f} |"
                    for m, (lo, hi) in ivs.items()] + [""]


def _measured_on_lines(on: Any, metrics: dict[str, Any]) -> list[str]:
    """Which split, and how many classes the model never saw: the number that makes Recall@1 meaningful."""
    queries = metrics.get("num_queries")
    if not isinstance(on, dict):
        return ([f"Measured on {queries} queries of {metrics.get('num_classes')} classes (split not recorded).", ""]
                if queries is not None else [])
    split = f"split `{on['split']}`" if on.get("split") else "an unnamed split"
    unseen = on.get("unseen_classes")
    seen = ("" if unseen is None else
            f"; {unseen} of its {on['classes']} classes are unseen in training"
            + (" (all of them: a test of new classes)" if unseen == on["classes"] else ""))
    return [f"Measured on {split}: {queries} queries over {metrics.get('num_classes')} classes with 2+ images{seen}.", ""]


def render_card(card: dict[str, Any]) -> str:
    """MODEL_CARD.md: the same facts for people."""
    pre = card["input"]["preprocessing"]
    lines = [f"# {card['backbone']} embedding model, v{card['version']}", "",
             f"Published {card['created']}; config hash `{card['config_hash']}`.", "",
             "## Use", "",
             f"Input `{card['input']['name']}`: float32 {card['input']['shape']}, preprocessed as below.",
             f"Output `{card['output']['name']}`: {card['output']['shape']}, {card['output']['note']}.", "",
             "Files: " + ", ".join(f"`{n}`" for n in card["files"]) + ".", "",
             "### Preprocessing a serving system must apply", ""]
    if isinstance(pre, dict):
        lines += [f"{i}. {step}" for i, step in enumerate(pre["steps"], start=1)] + [""]
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in pre.items() if k != "steps"] + [""]
    else:  # a card written before the preprocessing was recorded as numbers
        lines += [str(pre), ""]
    lines += ["## Metrics", ""]
    metrics = card["metrics"]
    if metrics:
        lines += _measured_on_lines(card.get("measured_on"), metrics)
        lines += _evaluation_lines(metrics.get("evaluation"), metrics)
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
                  if k != "evaluation" and not k.endswith("_ci95_half_width")]
    else:
        lines.append("Not evaluated.")
    gate = card["gate"]
    lines += ["", "## Publishing gate", "",
              f"Setting: publish only if Recall@1 >= {gate['min_recall_at_1']} (`min_recall_at_1`)"
              + (" - 0 means no gate." if not gate["min_recall_at_1"] else ".")]
    if gate.get("decision"):
        lines.append(f"Decision for this version: {gate['decision']}.")
    lines += ["", "## Training data", ""]
    data = card["data"]
    if data:
        lines.append(f"{data['num_samples']} images, {data['num_classes']} classes "
                     f"(split `{data['split']}`, format {data['data_format']}, from `{data['annotations']}`).")
    else:
        lines.append("No data summary given.")
    if card.get("pretrained"):  # where the starting weights came from (trainer.weights)
        lines += ["", "## Starting weights", "", "```json", json.dumps(card["pretrained"], indent=2), "```"]
    if card["usage"]:
        lines += ["", "## Usage", "", "```json", json.dumps(card["usage"], indent=2), "```"]
    lines += ["", "## Config", "", "```json", json.dumps(card["config"], indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _redact(url: str | None) -> str | None:
    """A URL without user:password@ (fsspec URLs may carry them); never put credentials in a card."""
    if not url or "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


# --- what is published -----------------------------------------------------------------------------


def published_metrics(destination: str) -> dict[str, Any] | None:
    """Metrics of the model card that DESTINATION/latest points at; None when nothing is published."""
    try:
        folder = resolve_published(destination)
    except FileNotFoundError:
        return None
    card = json.loads(storage.read_text(storage.join(folder, CARD_JSON)))
    return dict(card.get("metrics") or {})
