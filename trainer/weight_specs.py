"""What a `model.pretrained` spec names, decided from the string and timm's registry alone.

Config validation needs this (a tag that can never load is refused before any data is read),
so it imports nothing of the trainer: trainer.config imports it, trainer.weights resolves specs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

DEFAULT = "default"
HF_PREFIX = "hf-hub:"
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pkl", ".tar")

Kind = Literal["default", "timm", "hf-hub", "file"]


def spec_kind(spec: str) -> Kind:
    """Classify model.pretrained without touching storage or the network (a tag never contains '/')."""
    if spec == DEFAULT:
        return "default"
    if spec.startswith(HF_PREFIX):
        return "hf-hub"
    if "://" in spec or "/" in spec or "\\" in spec or spec.startswith(".") or spec.endswith(_FILE_SUFFIXES):
        return "file"
    return "file" if Path(spec).exists() else "timm"


def check_spec(spec: str, backbone: str, arch: str, reference_backbone: bool) -> None:
    """Refuse a spec that can never work, before any data is read (config validation).

    `default` with one of the reference's backbones needs no timm import (the table in
    docs/pretrained.md is checked by tests against timm's registry), so validating a pipeline's
    default config stays light.
    """
    kind = spec_kind(spec)
    if not spec.strip():
        raise ValueError("model.pretrained is empty; leave it unset (null) for random initialisation")
    if kind == "hf-hub":
        repo = spec[len(HF_PREFIX):].partition("@")[0]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ValueError(f"model.pretrained={spec!r}: expected hf-hub:ORG/REPO (optionally @REVISION)")
    elif kind == "timm" or (kind == "default" and not reference_backbone):
        timm_tag(spec, arch, backbone)


def timm_tag(spec: str, arch: str, backbone: str) -> str:
    """The full timm name `arch.tag` that `default` or a tag names for `arch` (model.backbone = `backbone`)."""
    import timm

    arch_base = timm.models.split_model_name_tag(arch)[0]
    name = arch if spec == DEFAULT else spec
    base, tag = timm.models.split_model_name_tag(name)
    if base != arch_base:
        if not timm.is_model(base):
            raise ValueError(
                f"model.pretrained={spec!r}: not a file and not a timm pretrained tag; "
                f"tags of {arch_base}: {_tags_of(arch_base)}"
            )
        raise ValueError(
            f"model.pretrained={spec!r}: a tag of {base}, but model.backbone={backbone!r} is {arch_base}; "
            f"its tags: {_tags_of(arch_base)}"
        )
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.tag:
        what = "has no pretrained weights in timm's registry" if not tag else f"has no pretrained tag {tag!r}"
        raise ValueError(f"model.pretrained={spec!r}: {arch_base} {what}; its tags: {_tags_of(arch_base)}")
    return f"{cfg.architecture}.{cfg.tag}"


def _tags_of(arch: str, limit: int = 12) -> str:
    import timm

    tags = timm.list_pretrained(f"{arch}.*")
    if not tags:
        return "none (train from random weights or give a file)"
    return ", ".join(tags[:limit]) + (f" ... (+{len(tags) - limit})" if len(tags) > limit else "")
