"""The embedding model: a timm backbone (pooled features) + a Linear/BatchNorm neck, L2-normalised.

Weights never come from the network: `model.pretrained` is a local or oss:// file read through
trainer.storage, in safetensors or a weights-only torch checkpoint. A trained model folder holds
model.safetensors, config.json (the resolved RunConfig with its hash) and classes.txt, which is
everything evaluate and publish need to rebuild it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import json
import logging
import pickle
import warnings
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import nn

from imlt.trainer import storage
from imlt.trainer.config import ModelConfig, RunConfig, timm_name, validate_config
from imlt.trainer.model_files import CLASSES, CONFIG, WEIGHTS

log = logging.getLogger(__name__)

# Keys of a classification head in timm/torchvision checkpoints; our backbone has none
# (num_classes=0), so these are expected leftovers, not problems.
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")
# Wrappers that training scripts put around a state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_OPTIONAL_KWARGS = ("img_size", "zero_init_last")


class EmbeddingModel(nn.Module):
    """Backbone -> Linear -> BatchNorm1d -> L2 normalise; retrieval compares embeddings by cosine."""

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.neck = nn.Sequential(nn.Linear(backbone.num_features, feature_dim), nn.BatchNorm1d(feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.neck(self.backbone(x)), dim=1)


def build_model(cfg: ModelConfig, image_size: int, *, zero_init_last: bool = True) -> EmbeddingModel:
    """Create the network; load `cfg.pretrained` if set.

    zero_init_last=False matters only for an untrained baseline: timm ResNets zero the last BN
    of each block by default, which maps every image to nearly the same embedding.
    """
    name = timm_name(cfg.backbone)
    wanted = {"img_size": image_size, "zero_init_last": zero_init_last}
    accepted = _accepted_kwargs(name)
    kwargs = {k: v for k, v in wanted.items() if k in accepted and v is not None}
    backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model = EmbeddingModel(backbone, cfg.feature_dim)
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
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


@dataclass
class LoadReport:
    """What a pretrained load matched; `missing` are model keys left at their initial values."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored_classifier: list[str] = field(default_factory=list)


def load_pretrained(model: EmbeddingModel, url: str) -> LoadReport:
    """Load a backbone (timm/torchvision) or embedding-model state dict from a file, non-strictly.

    Accepted layouts: our own keys (`backbone.*`, `neck.*`), bare backbone keys, either wrapped in
    {"state_dict"|"model": ...} and/or prefixed with DDP's `module.`. Shape mismatches and a file
    that matches nothing are errors; missing and unexpected keys are logged.
    """
    state = _unwrap(read_state_dict(url), url)
    if not any(k.startswith(("backbone.", "neck.")) for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}
    own = model.state_dict()
    classifier = _classifier_prefixes(model.backbone)
    report, usable, mismatched = LoadReport(), {}, []
    for key, tensor in state.items():
        if key in own:
            if tuple(own[key].shape) != tuple(tensor.shape):
                mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
            else:
                usable[key] = tensor
                report.matched.append(key)
        elif key.removeprefix("backbone.").startswith(classifier):
            report.ignored_classifier.append(key)
        else:
            report.unexpected.append(key)
    if mismatched:
        raise ValueError(f"{url}: {len(mismatched)} tensors have the wrong shape for this model:\n  " + "\n  ".join(mismatched[:20]))
    if not usable:
        raise ValueError(
            f"{url}: no tensor matched the model (is it a checkpoint of another backbone?); "
            f"file keys: {_preview(list(state))}; model keys: {_preview(list(own))}"
        )
    model.load_state_dict(usable, strict=False)
    report.missing = [k for k in own if k not in usable]
    _log_report(url, report)
    return report


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A flat or nested dict of tensors from safetensors or a torch checkpoint (weights only)."""
    data = storage.read_bytes(url)
    if _is_safetensors(data):
        from safetensors.torch import load

        return load(data)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols just before refusing
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(str(e))
        if "Unsupported global" in detail or data[:1] == b"\x80":  # 0x80: a raw pickle stream
            raise ValueError(
                f"{url}: refusing to load: the file holds pickled Python objects, not only tensors "
                f"({detail}). Save a plain state_dict (torch.save(model.state_dict(), ...)) or safetensors."
            ) from None
        raise ValueError(f"{url}: not a safetensors file or torch checkpoint ({detail})") from None
    except Exception as e:  # corrupt or foreign file: say which file and what it is not
        raise ValueError(f"{url}: not a safetensors file or torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{url}: expected a state dict, got {type(obj).__name__}")
    return obj


def _unpickler_detail(message: str) -> str:
    """The one informative line of torch's long weights-only error."""
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if rest:
                return rest.split(". Please use")[0]
    lines = [ln.strip() for ln in message.splitlines() if ln.strip().startswith("Unsupported")]
    return lines[0] if lines else message.strip().splitlines()[0][:200]


def _is_safetensors(data: bytes) -> bool:
    # Format: 8-byte little-endian header length, then a JSON header starting with '{'.
    if len(data) < 9:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def _unwrap(obj: dict, url: str) -> dict[str, torch.Tensor]:
    while not _all_tensors(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise ValueError(f"{url}: not a state dict: entries {_preview(bad)} are not tensors")
        obj = inner
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _all_tensors(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    cfg_name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    extra = (f"{cfg_name}.",) if isinstance(cfg_name, str) else ()
    return _CLASSIFIER_PREFIXES + extra


def _preview(keys: list[str], n: int = 5) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _log_report(url: str, r: LoadReport) -> None:
    log.info("%s: loaded %d tensors", url, len(r.matched))
    if r.ignored_classifier:
        log.info("%s: ignored %d classifier tensors: %s", url, len(r.ignored_classifier), _preview(r.ignored_classifier))
    missing_backbone = [k for k in r.missing if k.startswith("backbone.")]
    if missing_backbone:
        log.warning("%s: %d backbone tensors missing from the file (left at init): %s", url, len(missing_backbone), _preview(missing_backbone))
    if r.unexpected:
        log.warning("%s: %d tensors in the file match nothing in the model: %s", url, len(r.unexpected), _preview(r.unexpected))
    missing_neck = [k for k in r.missing if k.startswith("neck.")]
    if missing_neck:
        log.info("%s: neck not in the file; it starts from random init", url)


# --- trained model folder -----------------------------------------------------------------------


def save_embedding_model(model: EmbeddingModel, cfg: RunConfig, model_dir: str, classes: list[str]) -> None:
    """Write weights (safetensors), the resolved config with its hash, and the class list."""
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
