"""Kubernetes jobs for a training run: their manifests, as plain dicts.

Two job kinds, both running the same image and a `torchrun ...` command:
- Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1), the current engine. It points
  at a torch ClusterTrainingRuntime and injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
  PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun reads as its defaults.
- Training Operator v1 `PyTorchJob` (kubeflow.org/v1), for clusters still on it. It sets the
  same PET_* variables (from Master/Worker replicas and spec.nprocPerNode).

No Kubernetes client here (kfp and the Airflow Kubernetes provider pin incompatible `kubernetes`
versions): manifests are dicts; trainer.k8s_jobs submits them and waits.

OSS credentials reach the pods only as `valueFrom.secretKeyRef` into a Kubernetes Secret whose
keys are the variable names (`kubectl create secret generic oss-credentials
--from-literal=OSS_ACCESS_KEY_ID=... --from-literal=OSS_ACCESS_KEY_SECRET=...
--from-literal=OSS_ENDPOINT=...`); a manifest never holds a credential value.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from imlt.trainer.config import INSTANCE_TYPES, ComputeConfig, RunConfig, canonical_json

TRAINJOB_API = ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob")
PYTORCHJOB_API = ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob")

# The torch ClusterTrainingRuntime's replicated job and container are both named "node".
TRAINJOB_NODE = TRAINJOB_CONTAINER = "node"
# The Training Operator finds its container by this name (it injects the torchrun env into it).
PYTORCHJOB_CONTAINER = "pytorch"
PATCH_MANAGER = "imlt"
LABEL_APP = "app.kubernetes.io/name"
LABEL_CONFIG_HASH = "imlt/config-hash"
ANNOTATION_MANIFEST_HASH = "imlt/manifest-hash"

# (variable, required): the first two must exist; the rest are used when the Secret has them.
OSS_SECRET_KEYS: tuple[tuple[str, bool], ...] = (
    ("OSS_ACCESS_KEY_ID", True),
    ("OSS_ACCESS_KEY_SECRET", True),
    ("OSS_ENDPOINT", False),
    ("OSS_REGION", False),
    ("OSS_SESSION_TOKEN", False),
)

# Kubernetes docs' convention for GPU node labels (`kubectl label nodes n1 accelerator=...`).
# Clusters differ: ACK uses aliyun.accelerator/nvidia_name, GKE cloud.google.com/gke-accelerator.
DEFAULT_GPU_LABEL = "accelerator"
GPU_RESOURCE = "nvidia.com/gpu"

# The trainer stops itself cleanly (checkpoint, then exit) at train.max_hours, counted from its
# own start; Kubernetes counts from the job's start (scheduling, image pull). The job deadline is
# a backstop this much later, so the clean stop comes first.
DEADLINE_GRACE_SECONDS = 900

_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Generated names stay short: JobSet and the operators append "-node-0-0", "-master-0" etc. to
# form pod host names, which must stay within 63 characters themselves.
_GENERATED_NAME_MAX = 40


class ManifestError(ValueError):
    """A manifest that must not be submitted; the message names the field."""


# ------------------------------------------------------------------------------------------------
# pieces shared by both job kinds
# ------------------------------------------------------------------------------------------------


def job_name(cfg: RunConfig, *, prefix: str = "imlt", image: str = "", command: Sequence[str] = ()) -> str:
    """Deterministic RFC 1035 name: a cleaned prefix plus a hash of config, image and command.

    The same run renders the same name, so a retried submit finds the job it started.
    """
    digest = hashlib.sha256(
        canonical_json({"config": cfg.config_hash(), "image": image, "command": list(command)}).encode()
    ).hexdigest()[:10]
    clean = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")
    clean = re.sub(r"^[^a-z]+", "", clean) or "imlt"  # must start with a letter
    clean = clean[: _GENERATED_NAME_MAX - len(digest) - 1].rstrip("-")
    return f"{clean}-{digest}"


def check_name(name: str) -> str:
    if len(name) > 63 or not _RFC1035.match(name):
        raise ManifestError(
            f"metadata.name={name!r} is not an RFC 1035 label (lowercase letters, digits and '-', "
            "starting with a letter, ending with a letter or digit, at most 63 characters)"
        )
    return name


def node_resources(compute: ComputeConfig, override: dict[str, str | int] | None = None) -> tuple[dict[str, dict[str, str]], int]:
    """(requests/limits for one node, GPUs per node) from the instance type table or plain values.

    Requests equal limits: GPUs must, and equal CPU/memory give the pods Guaranteed QoS, so a
    long run is not the first to be evicted.
    """
    values: dict[str, str] = {}
    gpus = 0
    if compute.instance_type is not None:
        it = INSTANCE_TYPES[compute.instance_type]
        values = {"cpu": str(it.cpu), "memory": f"{it.memory_gb}Gi"}
        gpus = it.gpus
        if compute.nproc_per_node > gpus:
            raise ManifestError(
                f"compute.nproc_per_node={compute.nproc_per_node} but {compute.instance_type} has {gpus} GPU(s): "
                f"use at most {gpus} processes per node or a larger instance type"
            )
    elif compute.gpu_type is not None:
        gpus = compute.nproc_per_node  # one GPU per process
    if override:
        values.update({k: str(v) for k, v in override.items()})
        gpus = int(values.get(GPU_RESOURCE, gpus))
    if gpus:
        values[GPU_RESOURCE] = str(gpus)
    return ({"requests": dict(values), "limits": dict(values)} if values else {}), gpus


def accelerator(compute: ComputeConfig) -> str | None:
    """The GPU type to select nodes by: compute.gpu_type, else the instance type's."""
    if compute.gpu_type:
        return compute.gpu_type
    if compute.instance_type:
        return INSTANCE_TYPES[compute.instance_type].accelerator
    return None


def oss_env(secret: str | None) -> list[dict[str, Any]]:
    """OSS_* variables, each read from the Secret (never a literal value)."""
    if not secret:
        return []
    return [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": var, **({} if required else {"optional": True})}}}
        for var, required in OSS_SECRET_KEYS
    ]


SHM_VOLUME = "dshm"
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")


def shm_size_limit(memory_limit: str | None) -> str:
    """Size of a pod's memory-backed /dev/shm: half its memory limit (it counts against it), 4Gi if unknown.

    Kubernetes' default 64 MiB there is too small for DataLoader workers handing over batches.
    """
    m = _QUANTITY.match(str(memory_limit or ""))
    if not m:
        return "4Gi"
    half = float(m.group(1)) / 2
    return f"{half:g}{m.group(2) or ''}"


def shm_volume(memory_limit: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(pod volume, container mount) of a memory-backed /dev/shm."""
    volume = {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size_limit(memory_limit)}}
    return volume, {"name": SHM_VOLUME, "mountPath": "/dev/shm"}


def active_deadline_seconds(cfg: RunConfig, grace_seconds: int = DEADLINE_GRACE_SECONDS) -> int:
    return int(math.ceil(cfg.train.max_hours * 3600)) + grace_seconds


def _node_selector(gpu_label: str, gpu_type: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    """The GPU-type label plus any given labels (e.g. a KFP task's node selector passed through)."""
    return {**({gpu_label: gpu_type} if gpu_type else {}), **(extra or {})}


def _gpu_tolerations() -> list[dict[str, str]]:
    # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule; tolerating it is harmless elsewhere.
    return [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


def _metadata(name: str, namespace: str, cfg: RunConfig) -> dict[str, Any]:
    return {
        "name": check_name(name),
        "namespace": namespace,
        "labels": {LABEL_APP: "imlt", LABEL_CONFIG_HASH: cfg.config_hash()},
    }


def _stamp(manifest: dict[str, Any]) -> dict[str, Any]:
    """Record a hash of the spec, so re-attaching can tell our job from a namesake."""
    digest = hashlib.sha256(canonical_json(manifest["spec"]).encode()).hexdigest()[:16]
    manifest["metadata"].setdefault("annotations", {})[ANNOTATION_MANIFEST_HASH] = digest
    return manifest


def _common(cfg: RunConfig, image: str, command: Sequence[str], resources: dict[str, str | int] | None) -> tuple[list[str], dict, int]:
    if not image:
        raise ManifestError("image must be given (the project image every pod runs)")
    if not command:
        raise ManifestError("command must be given, e.g. ['torchrun', '-m', 'imlt.trainer.cli', 'train', '--config', URL]")
    res, gpus = node_resources(cfg.compute, resources)
    return list(command), res, gpus


class JobOptions(BaseModel):
    """What a TrainJob and a PyTorchJob are rendered with besides the config, image and command."""

    model_config = ConfigDict(extra="forbid")

    oss_secret: str | None = Field("oss-credentials", description="Secret whose keys become the OSS_* variables; None: none")
    namespace: str = "default"
    name: str | None = Field(None, description="Job name; default: derived from the run (deterministic, so a retry re-attaches)")
    name_prefix: str = "imlt"
    resources: dict[str, str | int] | None = Field(None, description="Per-node requests = limits, over the instance type's")
    gpu_label: str = Field(DEFAULT_GPU_LABEL, description="Node label that carries the GPU type")
    node_selector: dict[str, str] | None = None
    extra_env: dict[str, str] | None = None
    deadline_grace_seconds: int = DEADLINE_GRACE_SECONDS


# ------------------------------------------------------------------------------------------------
# Kubeflow Trainer v2 TrainJob
# ------------------------------------------------------------------------------------------------


def render_trainjob(
    cfg: RunConfig,
    *,
    image: str,
    command: list[str],
    runtime: str = "torch-distributed",
    **options: Any,
) -> dict[str, Any]:
    """A TrainJob running `command` on cfg.compute.nnodes nodes x nproc_per_node processes.

    The GPU node selector (and a toleration for the GPU taint) go into `runtimePatches`, the
    TrainJob's sanctioned way to patch the runtime's pod template.
    """
    o = JobOptions(**options)
    command, res, gpus = _common(cfg, image, command, o.resources)
    group, version, _, kind = TRAINJOB_API
    trainer: dict[str, Any] = {
        "image": image,
        "command": command,
        "numNodes": cfg.compute.nnodes,
        "numProcPerNode": cfg.compute.nproc_per_node,
    }
    if res:
        trainer["resourcesPerNode"] = res
    env = [{"name": k, "value": v} for k, v in (o.extra_env or {}).items()] + oss_env(o.oss_secret)
    if env:
        trainer["env"] = env
    spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime, "kind": "ClusterTrainingRuntime", "apiGroup": group},
        "trainer": trainer,
        "activeDeadlineSeconds": active_deadline_seconds(cfg, o.deadline_grace_seconds),
    }
    gpu_type = accelerator(cfg.compute)
    selector = _node_selector(o.gpu_label, gpu_type, o.node_selector)
    # every node's DataLoader workers need more than Kubernetes' 64 MiB /dev/shm
    volume, mount = shm_volume(res.get("limits", {}).get("memory") if res else None)
    pod_spec: dict[str, Any] = {"volumes": [volume], "containers": [{"name": TRAINJOB_CONTAINER, "volumeMounts": [mount]}]}
    if selector:
        pod_spec["nodeSelector"] = selector
    if gpus:
        pod_spec["tolerations"] = _gpu_tolerations()
    spec["runtimePatches"] = [
        {
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {
                "template": {
                    "spec": {
                        "replicatedJobs": [
                            {"name": TRAINJOB_NODE, "template": {"spec": {"template": {"spec": pod_spec}}}}
                        ]
                    }
                }
            },
        }
    ]
    name = o.name or job_name(cfg, prefix=o.name_prefix, image=image, command=command)
    return _stamp({"apiVersion": f"{group}/{version}", "kind": kind, "metadata": _metadata(name, o.namespace, cfg), "spec": spec})


def validate_trainjob(manifest: dict[str, Any]) -> None:
    """Check a TrainJob against the Kubeflow Trainer API's own models (kubeflow-trainer-api).

    Parsing alone ignores unknown keys, so the parsed model is dumped back and must equal the
    input: a misspelt or misplaced field fails here instead of being dropped by the API server.
    """
    try:
        from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    except ImportError as e:  # the package is in the `kfp` extra
        raise ImportError("validating a TrainJob needs kubeflow-trainer-api (pip install 'imlt[kfp]')") from e

    group, version, _, kind = TRAINJOB_API
    if manifest.get("apiVersion") != f"{group}/{version}" or manifest.get("kind") != kind:
        raise ManifestError(f"not a {kind} of {group}/{version}: apiVersion={manifest.get('apiVersion')!r}, kind={manifest.get('kind')!r}")
    validate_against_model(TrainerV1alpha1TrainJob, manifest, kind)
    check_name(manifest["metadata"]["name"])


def validate_against_model(model: Any, obj: dict[str, Any], what: str) -> None:
    """Parse `obj` with an OpenAPI-generated pydantic model and require a lossless round trip."""
    from pydantic import ValidationError

    try:
        parsed = model.from_dict(obj)
    except (ValidationError, ValueError) as e:
        raise ManifestError(f"{what} does not match the API: {e}") from None
    back = _plain(parsed.to_dict())
    if back != obj:
        raise ManifestError(f"{what} has fields the API does not know: " + "; ".join(_diff(obj, back)))


def _plain(obj: Any) -> Any:
    """to_dict() leaves Quantity wrappers as {'actual_instance': v}-like values; unwrap them."""
    if isinstance(obj, dict):
        if set(obj) >= {"actual_instance"} and "one_of_schemas" in obj:
            return obj["actual_instance"]
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if hasattr(obj, "actual_instance"):
        return obj.actual_instance
    return obj


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            where = f"{path}.{k}" if path else k
            if k not in b:
                out.append(f"{where} (unknown field)")
            elif k not in a:
                out.append(f"{where} (added by the API model)")
            else:
                out += _diff(a[k], b[k], where)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


# ------------------------------------------------------------------------------------------------
# Training Operator v1 PyTorchJob (legacy)
# ------------------------------------------------------------------------------------------------


def render_pytorchjob(
    cfg: RunConfig,
    *,
    image: str,
    command: list[str],
    **options: Any,
) -> dict[str, Any]:
    """A PyTorchJob: one Master and nnodes - 1 Workers, each running torchrun with nproc_per_node.

    restartPolicy Never and backoffLimit 0: a failed run fails; retrying is the orchestrator's
    job (KFP/Airflow retries re-attach or replace it), and the trainer resumes from checkpoints.
    """
    o = JobOptions(**options)
    command, res, gpus = _common(cfg, image, command, o.resources)
    group, version, _, kind = PYTORCHJOB_API
    container: dict[str, Any] = {"name": PYTORCHJOB_CONTAINER, "image": image, "command": command}
    env = [{"name": k, "value": v} for k, v in (o.extra_env or {}).items()] + oss_env(o.oss_secret)
    if env:
        container["env"] = env
    if res:
        container["resources"] = res
    volume, mount = shm_volume(res.get("limits", {}).get("memory") if res else None)
    container["volumeMounts"] = [mount]
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": [volume]}
    selector = _node_selector(o.gpu_label, accelerator(cfg.compute), o.node_selector)
    if selector:
        pod_spec["nodeSelector"] = selector
    if gpus:
        pod_spec["tolerations"] = _gpu_tolerations()

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "Never", "template": {"spec": pod_spec}}

    replicas = {"Master": replica(1)}
    if cfg.compute.nnodes > 1:
        replicas["Worker"] = replica(cfg.compute.nnodes - 1)
    spec = {
        "nprocPerNode": str(cfg.compute.nproc_per_node),
        "pytorchReplicaSpecs": replicas,
        "runPolicy": {
            "activeDeadlineSeconds": active_deadline_seconds(cfg, o.deadline_grace_seconds),
            "backoffLimit": 0,
            "cleanPodPolicy": "None",  # keep finished pods so their logs can still be read
        },
    }
    name = o.name or job_name(cfg, prefix=o.name_prefix, image=image, command=command)
    return _stamp({"apiVersion": f"{group}/{version}", "kind": kind, "metadata": _metadata(name, o.namespace, cfg), "spec": spec})


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def default_image() -> str:
    """The image job pods run unless told otherwise: trainer.image's one definition."""
    from imlt.trainer.image import project_image

    return project_image()


def default_command(config_url: str, extra_args: Sequence[str] = ()) -> list[str]:
    """torchrun (reading the PET_* variables the operators set) over `imlt train`'s module."""
    return ["torchrun", "-m", "imlt.trainer.cli", "train", "--config", config_url, *extra_args]


def render_for_cli(
    config_path: str,
    legacy: bool = False,
    *,
    image: str | None = None,
    namespace: str = "default",
    oss_secret: str | None = "oss-credentials",
    extra_args: Sequence[str] = (),
) -> str:
    """YAML for `imlt k8s-job CONFIG [--legacy-pytorchjob]` (validated when the API package is there)."""
    import yaml

    from imlt.trainer import storage
    from imlt.trainer.config import load_config

    cfg = load_config(config_path)
    image = image or default_image()
    command = default_command(config_path, extra_args)
    render = render_pytorchjob if legacy else render_trainjob
    manifest = render(cfg, image=image, command=command, oss_secret=oss_secret, namespace=namespace)
    if not legacy:
        try:
            validate_trainjob(manifest)
        except ImportError:
            pass  # kubeflow-trainer-api not installed: the renderer's own tests cover the shape
    head = ""
    if storage.is_local(config_path):
        head = f"# note: {config_path} is a local path; the pods must see it there (or use an oss:// config)\n"
    return head + yaml.safe_dump(manifest, sort_keys=False)
