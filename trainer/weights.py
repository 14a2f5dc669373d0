"""Where a run's starting weights come from, resolved the way the ecosystem ships them.

`model.pretrained` names one of:

- `default`: the backbone's default pretrained tag in timm's registry (resnet_50 -> resnet50.a1_in1k);
- a timm pretrained tag, `resnet50.a1_in1k` (a bare architecture name means its default tag);
- `hf-hub:org/repo[@revision]`: a Hugging Face Hub repository holding timm weights;
- a local or oss:// file (safetensors or a weights-only torch checkpoint), or a folder written by
  `imlt import-weights` (model.safetensors + weights.json).

Tags and hub repos are fetched by huggingface_hub with its own cache (HF_HOME / HF_HUB_CACHE),
mirror (HF_ENDPOINT) and offline mode (HF_HUB_OFFLINE); timm's registry says which repo and file
hold a tag. Nothing here speaks HTTP. Every resolution records its provenance (`WeightsSource`:
tag, repo, revision, sha256), which the train step writes beside the model and the model card shows.

Parsing a spec (what config validation needs) lives in trainer.weight_specs, which imports no config.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imlt.trainer.config import BACKBONES, ConfigError, timm_name
from imlt.trainer.model_files import WEIGHTS  # an import-weights folder holds the weights under the model's name
from imlt.trainer.weight_specs import DEFAULT, HF_PREFIX, spec_kind
from imlt.trainer.weight_specs import timm_tag as _timm_tag

if TYPE_CHECKING:
    import torch

    from imlt.trainer.step_models import ImportWeightsInput, ImportWeightsOutput

log = logging.getLogger(__name__)

IMPORT_NOTE = "weights.json"  # beside an imported model.safetensors
# What the Hub holds for timm models, in order of preference (safetensors needs no unpickling).
HUB_FILES = ("model.safetensors", "pytorch_model.bin")

class PretrainedError(ValueError):
    """Starting weights that cannot be used: unknown tag, repo without weights, shapes that do not fit."""


class WeightsUnavailableError(PretrainedError):
    """Weights neither in the local Hugging Face cache nor downloadable from here."""


class _RepoLacksFile(PretrainedError):
    """The hub repo exists but holds none of the files asked for."""


class WeightsSource(BaseModel):
    """Provenance of starting weights: enough to fetch the same bytes again and to check them."""

    model_config = ConfigDict(extra="forbid")

    spec: str = Field(..., description="model.pretrained as written")
    kind: Literal["timm", "hf-hub", "file"]
    tag: str | None = Field(None, description="timm name with its pretrained tag, e.g. resnet50.a1_in1k")
    architecture: str | None = Field(None, description="timm architecture the weights were made for, when known")
    repo: str | None = Field(None, description="Hugging Face Hub repository")
    revision: str | None = Field(None, description="Hub commit the file came from")
    filename: str | None = None
    url: str | None = Field(None, description="The file read (local path or oss:// URL); hub files are named by repo, revision, filename")
    sha256: str | None = None
    imported_from: WeightsSource | None = Field(None, description="The note of `imlt import-weights` beside the file")


@dataclass
class ResolvedWeights:
    state_dict: dict[str, torch.Tensor]
    source: WeightsSource
    data: bytes = b""  # the file as read, for import_weights to store verbatim

    @property
    def ours(self) -> bool:
        """A state dict of our EmbeddingModel (backbone.* / neck.*), e.g. a previous run's model."""
        return any(k.startswith(("backbone.", "neck.")) for k in self.state_dict)


def timm_tag(spec: str, backbone: str) -> str:
    """The full timm name `arch.tag` that `default` or a tag names for this backbone, from timm's registry."""
    return _timm_tag(spec, timm_name(backbone), backbone)


# --- resolution -----------------------------------------------------------------------------------


def resolve(spec: str, backbone: str, *, local_files_only: bool = False) -> ResolvedWeights:
    """Fetch (or find in the cache) the weights `spec` names and read them into a state dict.

    local_files_only: read only the Hugging Face cache (ranks that wait for a leader's download).
    """
    kind = spec_kind(spec)
    if kind == "file":
        weights = _resolve_file(spec)
        _check_architecture(spec, weights.source.architecture, backbone)
        return weights
    if kind == "hf-hub":
        return _resolve_hf_repo(spec, backbone, local_files_only)
    try:
        name = timm_tag(spec, backbone)
    except ValueError as e:
        raise PretrainedError(str(e)) from None
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if not cfg.hf_hub_id:
        raise PretrainedError(
            f"model.pretrained={spec!r}: timm ships {name} only from {cfg.url or 'nowhere'}, not from the "
            "Hugging Face Hub; download it once and give the file (local or oss://) as model.pretrained"
        )
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
    path, filename = _hub_download(spec, name, repo, revision or None, files, local_files_only)
    source = WeightsSource(spec=spec, kind="timm", tag=name, architecture=cfg.architecture, repo=repo, filename=filename)
    return _read_hub_file(path, source)


def resolve_once_per_node(spec: str, backbone: str) -> ResolvedWeights:
    """`resolve`, downloading once per node in a multi-process run.

    The first process of each node (LOCAL_RANK 0) resolves (downloads into the node's Hugging Face
    cache) while the others wait at a barrier, then read the cache without network. A leader's
    failure is raised after the barrier, so nobody is left waiting; torchrun then stops the group.
    Files (local, oss://) are read by every process, as before.
    """
    import torch.distributed as dist

    from imlt.trainer.collectives import barrier

    if spec_kind(spec) == "file" or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return resolve(spec, backbone)
    leader = int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    result: ResolvedWeights | None = None
    error: BaseException | None = None
    if leader:
        try:
            result = resolve(spec, backbone)
        except BaseException as e:  # re-raised below, after the others were released
            error = e
    barrier()
    if error is not None:
        raise error
    return result if result is not None else resolve(spec, backbone, local_files_only=True)


def _resolve_hf_repo(spec: str, backbone: str, local_files_only: bool) -> ResolvedWeights:
    repo, _, revision = spec[len(HF_PREFIX):].partition("@")
    arch, unreachable = None, False
    try:  # timm's hub repos describe their architecture in config.json; a repo may lack it
        cfg_path, _ = _hub_download(spec, spec, repo, revision or None, ("config.json",), local_files_only)
        arch = json.loads(Path(cfg_path).read_text()).get("architecture")
    except WeightsUnavailableError:
        unreachable = True  # (or offline): the weights can only be in the cache
    except (_RepoLacksFile, json.JSONDecodeError, OSError):
        pass  # unknown: the strict load below still refuses weights that do not fit
    _check_architecture(spec, arch, backbone)
    path, filename = _hub_download(spec, spec, repo, revision or None, HUB_FILES, local_files_only, unreachable)
    source = WeightsSource(spec=spec, kind="hf-hub", architecture=arch, repo=repo, filename=filename)
    return _read_hub_file(path, source)


def _check_architecture(spec: str, arch: str | None, backbone: str) -> None:
    """Weights that say which architecture they were made for must be for this backbone."""
    if not arch or not backbone:
        return
    import timm


    want = timm.models.split_model_name_tag(timm_name(backbone))[0]
    have = timm.models.split_model_name_tag(arch)[0]
    if have != want:
        raise PretrainedError(
            f"model.pretrained={spec!r}: holds weights for {have}, not for model.backbone={backbone!r} ({want}); "
            f"use weights of {want} or set model.backbone={have}"
        )


def _hub_download(spec: str, name: str, repo: str, revision: str | None, files: tuple[str, ...],
                  local_files_only: bool, unreachable: bool = False) -> tuple[Path, str]:
    """The first of `files` the repo holds, through huggingface_hub's cache, mirror and offline mode.

    unreachable: an earlier request found the Hub unreachable; look only in the cache.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    not_cached: Exception | None = None
    for filename in files:
        try:
            # once the Hub proved unreachable, look only in the cache (no second round of retries)
            cache_only = local_files_only or unreachable or not_cached is not None
            path = hf_hub_download(repo, filename, revision=revision, local_files_only=cache_only)
            return Path(path), filename
        except LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is one
            not_cached = e
        except EntryNotFoundError:
            continue  # the repo exists but lacks this file: try the next name
        except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
            raise PretrainedError(f"model.pretrained={spec!r}: {repo}{'@' + revision if revision else ''}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not_cached is not None:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
               "this process reads only the cache (the node's first process could not fetch them)" if local_files_only else
               "the Hugging Face Hub is not reachable from here")
        raise WeightsUnavailableError(unavailable_message(spec, name, repo, constants.HF_HUB_CACHE, why))
    raise _RepoLacksFile(f"model.pretrained={spec!r}: hub repo {repo} holds no {' or '.join(files)}")


def unavailable_message(spec: str, name: str, repo: str, cache: str, why: str) -> str:
    store_name = name.removeprefix(HF_PREFIX).replace("/", "--")
    return (
        f"pretrained weights {spec!r} ({repo}) are not in the Hugging Face cache {cache} and {why}. "
        f"Two ways out: (1) point HF_ENDPOINT at a reachable Hub mirror (and unset HF_HUB_OFFLINE); or "
        f"(2) import them once where the Hub is reachable, `imlt import-weights {name} --to "
        f"oss://BUCKET/weights/{store_name}`, and train with `model.pretrained: oss://BUCKET/weights/{store_name}`."
    )


def _read_hub_file(path: Path, source: WeightsSource) -> ResolvedWeights:
    data = path.read_bytes()
    # The cache path holds the commit: .../snapshots/<revision>/<filename>
    revision = path.parent.name if path.parent.parent.name == "snapshots" else None
    source = source.model_copy(update={"sha256": hashlib.sha256(data).hexdigest(), "revision": revision})
    return ResolvedWeights(unwrap(parse_state_dict(data, str(path)), source.spec), source, data)


def _resolve_file(url: str) -> ResolvedWeights:
    from imlt.trainer import storage

    folder = url
    if storage.exists(storage.join(url, WEIGHTS)):  # an import-weights folder
        url = storage.join(url, WEIGHTS)
    else:
        folder = url.rstrip("/").rsplit("/", 1)[0] if "/" in url else "."
    data = storage.read_bytes(url)
    sha = hashlib.sha256(data).hexdigest()
    note = _read_note(storage.join(folder, IMPORT_NOTE), sha)
    source = WeightsSource(spec=url, kind="file", url=url, sha256=sha, imported_from=note,
                           architecture=note.architecture if note else None)
    return ResolvedWeights(unwrap(parse_state_dict(data, url), url), source, data)


def _read_note(url: str, sha: str) -> WeightsSource | None:
    from imlt.trainer import storage

    if not storage.exists(url):
        return None
    try:
        note = WeightsSource.model_validate_json(storage.read_text(url))
    except ValueError as e:
        log.warning("%s: not an import-weights note, ignored (%s)", url, str(e).splitlines()[0])
        return None
    if note.sha256 != sha:
        log.warning("%s: describes other bytes (sha256 %s, the file has %s), ignored", url, note.sha256, sha)
        return None
    return note


# --- import into the model store -----------------------------------------------------------------


def import_weights(inp: ImportWeightsInput) -> ImportWeightsOutput:
    """Fetch weights once (Hugging Face cache / HF_ENDPOINT mirror) and store them as safetensors + a note.

    The folder then serves as `model.pretrained` on clusters without internet. Idempotent: a
    destination already holding the same bytes is reused; one holding other weights is refused
    before anything is written. The weights file is written first and the note last, so a folder
    with a note is complete.
    """
    from safetensors.torch import save

    from imlt.trainer import storage
    from imlt.trainer.step_models import ImportWeightsOutput

    name = inp.name.strip()
    if spec_kind(name) == "file":
        raise ConfigError(f"import-weights {name!r}: give a timm tag, a backbone name or hf-hub:org/repo, not a file")
    if spec_kind(name) == "hf-hub":
        spec, backbone = name, inp.backbone or ""
    elif name in BACKBONES or name == DEFAULT:
        if name == DEFAULT and not inp.backbone:
            raise ConfigError("import-weights default: also give the backbone (--backbone resnet_50)")
        spec, backbone = DEFAULT, inp.backbone or name
    else:
        import timm

        spec, backbone = name, inp.backbone or timm.models.split_model_name_tag(name)[0]
    if spec_kind(spec) != "hf-hub":
        try:
            timm_tag(spec, backbone)
        except ValueError as e:
            raise ConfigError(str(e).replace("model.pretrained=", "import-weights ")) from None
    weights = resolve(spec, backbone)
    data = weights.data
    if not _is_safetensors(data):  # a pytorch_model.bin: store the tensors, not the pickle
        data = save({k: v.contiguous() for k, v in weights.state_dict.items()})
    sha = hashlib.sha256(data).hexdigest()
    note = weights.source.model_copy(update={"sha256": sha, "spec": name})
    dest = inp.destination.rstrip("/")
    weights_url, note_url = storage.join(dest, WEIGHTS), storage.join(dest, IMPORT_NOTE)
    reused = False
    if storage.exists(note_url):
        try:
            old = WeightsSource.model_validate_json(storage.read_text(note_url))
        except ValueError:
            old = None
        if old is None or old.sha256 != sha:
            what = f"{old.tag or old.repo} (sha256 {old.sha256})" if old else "an unreadable note"
            raise PretrainedError(f"{note_url}: the folder already holds {what}, not {note.tag or note.repo} "
                                  f"(sha256 {sha}); import into another folder or delete it")
        reused = storage.exists(weights_url)
    if not reused:
        storage.write_bytes(weights_url, data)
        storage.write_text(note_url, note.model_dump_json(indent=2, exclude_none=True) + "\n")
    log.info("%s %s (%s, %d tensors, sha256 %s) at %s", "kept" if reused else "imported",
             note.tag or note.repo, note.revision or "?", len(weights.state_dict), sha[:12], dest)
    return ImportWeightsOutput(pretrained=dest, weights_url=weights_url, note_url=note_url, tag=note.tag,
                               repo=note.repo, revision=note.revision, sha256=sha,
                               num_tensors=len(weights.state_dict), reused=reused)


# --- reading state dicts --------------------------------------------------------------------------

# Wrappers that training scripts put around a state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def parse_state_dict(data: bytes, url: str) -> dict[str, Any]:
    """A flat or nested dict of tensors from safetensors or a torch checkpoint (weights only)."""
    import torch

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


def unwrap(obj: dict[str, Any], url: str) -> dict[str, torch.Tensor]:
    """The tensors inside {"state_dict"|"model": ...} wrappers, without DDP's `module.` prefix."""
    while not _all_tensors(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            bad = [k for k, v in obj.items() if not _is_tensor(v)]
            raise ValueError(f"{url}: not a state dict: entries {preview(bad)} are not tensors")
        obj = inner
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


def _all_tensors(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and _is_tensor(v) for k, v in obj.items())


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


def preview(keys: list[str], n: int = 5) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
