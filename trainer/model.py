"""The embedding model: a timm backbone (pooled features) + a Linear/BatchNorm neck, L2-normalised.

`model.pretrained` names the starting weights: `default`, a timm tag, `hf-hub:org/repo`, or a
local/oss:// file (trainer.weights resolves them). Backbone checkpoints load through timm, strictly;
a state dict of our own model (backbone.* / neck.*) loads non-strictly with a report. The model
carries its `PretrainedRecord`, and the model folder keeps it as pretrained.json. A trained model
folder holds model.safetensors, config.json (the resolved RunConfig with its hash) and classes.txt,
which is everything evaluate and publish need to rebuild it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from imlt.trainer import storage
from imlt.trainer import weights as weights_mod
from imlt.trainer.config import ModelConfig, RunConfig, timm_name, validate_config
from imlt.trainer.model_files import CLASSES, CONFIG, PRETRAINED, WEIGHTS
from imlt.trainer.weights import PretrainedError, ResolvedWeights, WeightsSource, preview

log = logging.getLogger(__name__)

_OPTIONAL_KWARGS = ("img_size", "zero_init_last")


class EmbeddingModel(nn.Module):
    """Backbone -> Linear -> BatchNorm1d -> L2 normalise; retrieval compares embeddings by cosine."""

    pretrained: PretrainedRecord | None = None

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.neck = nn.Sequential(nn.Linear(backbone.num_features, feature_dim), nn.BatchNorm1d(feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.neck(self.backbone(x)), dim=1)


def build_model(cfg: ModelConfig, image_size: int) -> EmbeddingModel:
    """Create the network, starting from `cfg.pretrained` if set; the load is logged and kept as `.pretrained`.

    Every error about the starting weights (unknown tag, not downloadable, shapes that do not fit)
    is raised here, before a training run writes anything.
    """
    name = timm_name(cfg.backbone)
    wanted = {"img_size": image_size, "zero_init_last": cfg.zero_init_last}
    accepted = _accepted_kwargs(name)
    kwargs = {k: v for k, v in wanted.items() if k in accepted and v is not None}
    weights = weights_mod.resolve_once_per_node(cfg.pretrained, cfg.backbone) if cfg.pretrained else None
    report = None
    if weights is not None and not weights.ours:
        backbone, report = _pretrained_backbone(name, kwargs, weights)
    else:
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model = EmbeddingModel(backbone, cfg.feature_dim)
    if weights is not None:
        if report is None:
            report = _load_ours(model, weights.state_dict, weights.source.spec)
        else:
            report.missing = [k for k in model.state_dict() if k.startswith("neck.")]
        model.pretrained = PretrainedRecord(weights.source, report)
        _log_report(model.pretrained)
    return model


@functools.lru_cache(maxsize=None)
def _accepted_kwargs(name: str) -> frozenset[str]:
    """Which optional kwargs the model class behind a timm name accepts.

    timm entrypoints take **kwargs and fail deep inside on an unknown one, so we look at the
    model classes of the entrypoint's module instead: a kwarg is passed only if every class there
    that takes `num_classes` (i.e. every full model class) also takes it.
    """
    if not timm.is_model(name):
        return frozenset()  # create_model raises its own clear error for unknown names
    arch = timm.models.split_model_name_tag(name)[0]  # "resnet18.a1_in1k" -> "resnet18"
    module_name = next((m for m in timm.list_modules() if timm.models.is_model_in_modules(arch, [m])), None)
    if module_name is None:
        return frozenset()
    module = importlib.import_module(f"timm.models.{module_name}")
    classes = [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, nn.Module)]
    own = [c for c in classes if c.__module__ == module.__name__]
    # Modules such as deit or res2net only configure a class defined elsewhere (VisionTransformer, ResNet).
    params = _model_class_params(own) or _model_class_params([c for c in classes if c not in own])
    if not params:
        return frozenset()
    return frozenset(k for k in _OPTIONAL_KWARGS if all(k in p for p in params))


def _model_class_params(classes: list[type]) -> list[set[str]]:
    out = []
    for cls in classes:
        try:
            names = set(inspect.signature(cls.__init__).parameters)
        except (TypeError, ValueError):
            continue
        if "num_classes" in names:
            out.append(names)
    return out


# --- pretrained weights -------------------------------------------------------------------------

# Classifier tensors of timm/torchvision checkpoints when timm's registry does not name them; our
# backbone has none (num_classes=0), so these are expected leftovers, not problems.
_CLASSIFIER_KEYS = tuple(f"{p}.{w}" for p in ("fc", "head", "head.fc", "classifier", "last_linear") for w in ("weight", "bias"))


@dataclass
class LoadReport:
    """What a pretrained load matched; `missing` are model keys left at their initial values."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored_classifier: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The record kept in the model folder: counts, and every key that did not load."""
        backbone_missing = [k for k in self.missing if k.startswith("backbone.")]
        return {
            "matched": len(self.matched),
            "backbone_missing": backbone_missing,
            "unexpected": self.unexpected,
            "ignored_classifier": self.ignored_classifier,
            "random_init": sorted({k.split(".")[0] for k in self.missing if not k.startswith("backbone.")}) + (
                ["backbone (partly)"] if backbone_missing else []),
        }


@dataclass
class PretrainedRecord:
    """Where the starting weights came from and what they filled; kept on the model as `.pretrained`."""

    source: WeightsSource
    report: LoadReport

    def dump(self) -> dict[str, Any]:
        return {"source": self.source.model_dump(mode="json", exclude_none=True), "load": self.report.summary()}


def _pretrained_backbone(name: str, kwargs: dict[str, Any], weights: ResolvedWeights) -> tuple[nn.Module, LoadReport]:
    """Create the backbone through timm with `weights` as its pretrained state dict, strictly.

    timm then applies the architecture's own checkpoint filter (a ViT's position embedding resampled
    to image_size, a Swin's attention tables, ...) and adapts the stem, which a plain
    load_state_dict could not. The classifier is dropped first and the pretrained config claims
    num_classes=0 like the model, so timm loads strictly: every backbone tensor comes from the file
    or the load fails naming the keys.
    """
    label = weights.source.tag or weights.source.spec
    state = dict(weights.state_dict)
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    classifiers = getattr(cfg, "classifier", None)
    names = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers or ())
    keys = tuple(f"{c}.{w}" for c in names for w in ("weight", "bias")) or _CLASSIFIER_KEYS
    dropped = [k for k in keys if k in state]
    for k in dropped:
        del state[k]
    if not state:
        raise PretrainedError(f"{label}: holds no tensors besides the classifier")
    overlay = {"state_dict": state, "num_classes": 0, "source": None, "file": None}
    try:
        backbone = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:
        raise PretrainedError(f"{label}: does not fit backbone {name}: {_short_load_error(str(e))}") from None
    for attr in ("pretrained_cfg", "default_cfg"):  # do not keep a second copy of the weights alive
        cfg_dict = getattr(backbone, attr, None)
        if isinstance(cfg_dict, dict):
            cfg_dict.pop("state_dict", None)
    matched = [f"backbone.{k}" for k in backbone.state_dict()]
    return backbone, LoadReport(matched=matched, ignored_classifier=[f"backbone.{k}" for k in dropped])


def _short_load_error(message: str, keys: int = 8) -> str:
    """torch's load_state_dict error with each key list cut to a few names."""
    lines = []
    for line in message.strip().splitlines()[1:] or message.strip().splitlines():
        line = line.strip()
        head, sep, rest = line.partition(": ")
        if sep and line.startswith(("Missing key", "Unexpected key")):
            names = [n.strip().strip('"') for n in rest.rstrip(". ").split(",")]
            line = f"{head}: {preview(names, keys)}"
        lines.append(line)
    return "; ".join(lines[: keys + 2])


def load_pretrained(model: EmbeddingModel, url: str) -> LoadReport:
    """Load an embedding-model state dict (backbone.* and neck.*, e.g. a previous run's) into `model`.

    Not strict, because a model of ours may have another neck width or none: shape mismatches and a
    file that matches nothing are errors; missing and unexpected keys are reported and logged.
    Backbone checkpoints (timm/torchvision keys) go through `build_model`, which loads them strictly.
    """
    weights = weights_mod.resolve(url, "")
    return _load_ours(model, weights.state_dict, weights.source.spec)


def _load_ours(model: EmbeddingModel, state: dict[str, torch.Tensor], label: str) -> LoadReport:
    if not any(k.startswith(("backbone.", "neck.")) for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}
    own = model.state_dict()
    report, usable, mismatched = LoadReport(), {}, []
    for key, tensor in state.items():
        if key in own:
            if tuple(own[key].shape) != tuple(tensor.shape):
                mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
            else:
                usable[key] = tensor
                report.matched.append(key)
        elif key.removeprefix("backbone.") in _CLASSIFIER_KEYS:
            report.ignored_classifier.append(key)
        else:
            report.unexpected.append(key)
    if mismatched:
        raise PretrainedError(f"{label}: {len(mismatched)} tensors have the wrong shape for this model:\n  " + "\n  ".join(mismatched[:20]))
    if not usable:
        raise PretrainedError(
            f"{label}: no tensor matched the model (is it a checkpoint of another backbone?); "
            f"file keys: {preview(list(state))}; model keys: {preview(list(own))}"
        )
    model.load_state_dict(usable, strict=False)
    report.missing = [k for k in own if k not in usable]
    return report


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A flat or nested dict of tensors from safetensors or a torch checkpoint (weights only)."""
    return weights_mod.parse_state_dict(storage.read_bytes(url), url)


def _log_report(record: PretrainedRecord) -> None:
    src, r = record.source, record.report
    where = src.tag or src.repo or src.url or src.spec
    note = f" (imported from {src.imported_from.tag or src.imported_from.repo})" if src.imported_from else ""
    log.info("pretrained %s%s: loaded %d tensors, sha256 %s", where, note, len(r.matched), (src.sha256 or "?")[:12])
    if r.ignored_classifier:
        log.info("pretrained %s: dropped %d classifier tensors: %s", where, len(r.ignored_classifier), preview(r.ignored_classifier))
    missing_backbone = [k for k in r.missing if k.startswith("backbone.")]
    if missing_backbone:
        log.warning("pretrained %s: %d backbone tensors missing from the file (left at random init): %s", where, len(missing_backbone), preview(missing_backbone))
    if r.unexpected:
        log.warning("pretrained %s: %d tensors in the file match nothing in the model: %s", where, len(r.unexpected), preview(r.unexpected))
    if any(k.startswith("neck.") for k in r.missing) or not any(k.startswith("neck.") for k in r.matched):
        log.info("pretrained %s: the neck is not in the file; it starts from random init", where)


# --- trained model folder -----------------------------------------------------------------------


def save_embedding_model(model: EmbeddingModel, cfg: RunConfig, model_dir: str, classes: list[str]) -> None:
    """Write weights (safetensors), the resolved config with its hash, the class list and pretrained.json."""
    from safetensors.torch import save

    # unwrap DDP / torch.compile wrappers so keys are always backbone.* / neck.*
    inner: nn.Module = model
    for attr in ("module", "_orig_mod"):
        wrapped = getattr(inner, attr, None)
        if isinstance(wrapped, nn.Module):
            inner = wrapped
    state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    storage.write_bytes(storage.join(model_dir, WEIGHTS), save(state, metadata={"config_hash": cfg.config_hash()}))
    storage.write_text(storage.join(model_dir, CONFIG), json.dumps(cfg.dump(), indent=2, ensure_ascii=False) + "\n")
    storage.write_text(storage.join(model_dir, CLASSES), "".join(c + "\n" for c in classes))
    record = getattr(inner, "pretrained", None)
    if isinstance(record, PretrainedRecord):  # where the starting weights came from, for the model card
        storage.write_text(storage.join(model_dir, PRETRAINED), json.dumps(record.dump(), indent=2) + "\n")


def load_embedding_model(model_dir: str) -> tuple[EmbeddingModel, RunConfig]:
    """Rebuild the model from config.json and load model.safetensors strictly; eval mode."""
    from safetensors.torch import load

    raw = json.loads(storage.read_text(storage.join(model_dir, CONFIG)))
    saved_hash = raw.pop("config_hash", None)
    cfg = validate_config(raw)
    if saved_hash is not None and saved_hash != cfg.config_hash():
        log.warning("%s: config hash %s differs from the recomputed %s (config edited or written by another version)",
                    model_dir, saved_hash, cfg.config_hash())
    model_cfg = cfg.model.model_copy(update={"pretrained": None})  # the weights below replace it
    model = build_model(model_cfg, cfg.data.image_size)
    state = load(storage.read_bytes(storage.join(model_dir, WEIGHTS)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{storage.join(model_dir, WEIGHTS)} does not fit the model in {CONFIG}: {e}") from None
    return model.eval(), cfg
