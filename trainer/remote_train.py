"""Training as a Kubernetes job: the step behind `steps.train_remote`, and its non-blocking parts.

The KFP and Airflow train steps run here when the training itself must run elsewhere (several
nodes, GPUs the orchestrator's worker does not have):

1. `prepare_job`: write the resolved config where the pods read it (`{output_dir}/job-config.json`
   by default; oss:// in practice), stage datasets that only exist on this machine next to it,
   and render a Kubeflow Trainer `TrainJob` (or a legacy `PyTorchJob`) whose command is
   `torchrun -m imlt.trainer.cli train --config URL --train-dataset URL ...`.
2. Submit it. The job's name is a hash of config, image and command, so a retried task renders
   the same name and re-attaches to the job its first attempt started (trainer.k8s).
3. Wait: `submit_training` blocks (KFP: the component's pod waits anyway), streaming node 0's
   log; an Airflow operator instead calls `start_training`, defers, and polls `job_state` from a
   trigger without holding a worker slot.
4. `collect_output`: the same TrainOutput as local training, read back from the model folder the
   job wrote (history.json, usage.json, config.json).

No Kubernetes client is imported until one is needed (`kube_clients`): tests and callers pass
any object with the few CustomObjectsApi / CoreV1Api methods used here. No torch import either:
Airflow's triggerer and DAG parsing load this module.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from imlt.trainer import k8s, k8s_jobs, storage
from imlt.trainer.config import RunConfig
from imlt.trainer.model_files import CONFIG as CONFIG_FILE, HISTORY as HISTORY_FILE, USAGE as USAGE_FILE, WEIGHTS as WEIGHTS_FILE
from imlt.trainer.step_models import RemoteTrainInput, TrainOutput

__all__ = [
    "JobRef",
    "RemoteTrainInput",
    "collect_output",
    "delete_job",
    "flat_resources",
    "job_state",
    "kube_clients",
    "node0_log",
    "prepare_job",
    "start_training",
    "submit_training",
]

log = logging.getLogger(__name__)

JOB_CONFIG = "job-config.json"
# Where staged local datasets go, below output_dir.
STAGED_INPUTS = "inputs"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

Echo = Callable[[str], None]


class JobRef(BaseModel):
    """Enough to find a submitted job again (JSON-friendly: it travels in Airflow trigger kwargs)."""

    name: str
    namespace: str
    legacy_pytorchjob: bool = False

    @property
    def kind(self) -> str:
        return _api(self.legacy_pytorchjob)[3]

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


# --- clients ----------------------------------------------------------------------------------


def kube_clients(config_file: str | None = None, context: str | None = None) -> tuple[Any, Any]:
    """(CustomObjectsApi, CoreV1Api) of the `kubernetes` client for one cluster, on a client of their own.

    In a pod: the service account (load_incluster_config); elsewhere, or when a config file or
    context is named: the kubeconfig (load_kube_config).
    """
    try:
        from kubernetes import client, config
    except ImportError as e:
        raise ImportError(
            "submitting training to Kubernetes needs the kubernetes Python client (pip install kubernetes); "
            "it is in the `kfp` extra"
        ) from e
    # Each call builds its own ApiClient: loading into the process-wide default configuration would
    # let two deferred tasks in one triggerer, with different kubeconfigs, reach each other's cluster.
    if config_file is None and context is None:
        try:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
        except config.ConfigException:
            api_client = config.new_client_from_config()
    else:
        api_client = config.new_client_from_config(config_file=config_file, context=context)
    return client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)


def resolve_namespace(namespace: str) -> str:
    """The given namespace, else the one this pod runs in, else 'default'."""
    if namespace:
        return namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def flat_resources(requirements: dict[str, Any] | None) -> dict[str, str] | None:
    """Per-node resources for the job from a pod's ResourceRequirements (a KFP task's, say).

    The job's pods get requests equal to limits (trainer.k8s), so one value per resource: the
    request where there is one (what the scheduler must find on a node; a task's limits may be
    the node's whole capacity, which is never allocatable), else the limit (GPUs, which KFP
    sets as limits only).
    """
    if not requirements:
        return None
    out: dict[str, str] = {}
    for source in ("limits", "requests"):  # requests last: they win
        for name, value in (requirements.get(source) or {}).items():
            out[name] = str(value)
    return out or None


def _api(legacy: bool) -> tuple[str, str, str, str]:
    return k8s.PYTORCHJOB_API if legacy else k8s.TRAINJOB_API


# --- preparing and submitting ---------------------------------------------------------------------


def stage_datasets(inp: RemoteTrainInput, echo: Echo = print) -> tuple[str, str | None]:
    """Dataset URLs the pods can read: a local dataset folder is uploaded next to a remote output_dir.

    A KFP task sees its input artifacts as local paths (the launcher mounts them), which no
    other pod can read; the dataset folders are small (manifest, classes, summary), so they are
    copied to {output_dir}/inputs/<split>. With a local output_dir (a shared volume) nothing moves.
    """
    out = inp.config.output_dir
    staged: list[str | None] = []
    for split, url in (("train", inp.train_dataset), ("val", inp.val_dataset)):
        if url and storage.is_local(url) and not storage.is_local(out):
            target = storage.join(out, STAGED_INPUTS, split)
            echo(f"staging the {split} dataset {url} -> {target} (the job's pods cannot read local paths)")
            storage.upload_dir(url, target)
            url = target
        staged.append(url)
    return staged[0] or "", staged[1]


def job_command(config_url: str, train_dataset: str, val_dataset: str | None, resume: bool) -> list[str]:
    """`torchrun -m imlt.trainer.cli train --config URL` plus the datasets (and --no-resume)."""
    args = ["--train-dataset", train_dataset]
    if val_dataset:
        args += ["--val-dataset", val_dataset]
    if not resume:
        args.append("--no-resume")
    return k8s.default_command(config_url, args)


def prepare_job(inp: RemoteTrainInput, echo: Echo = print) -> dict[str, Any]:
    """Write the config for the pods, stage local datasets, and render the job's manifest."""
    cfg = inp.config
    if storage.is_local(cfg.output_dir):
        echo(f"note: output_dir {cfg.output_dir} is a local path; the job's pods must see it at the same path "
             "(a shared volume), else use an oss:// folder")
    train, val = stage_datasets(inp, echo)
    config_url = inp.config_url or storage.join(cfg.output_dir, JOB_CONFIG)
    # The resolved config, so the pods train exactly what was validated here (no config_hash key:
    # the loader recomputes it). Rewriting it on a retry writes the same bytes.
    storage.write_text(config_url, json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    command = job_command(config_url, train, val, inp.resume)
    common: dict[str, Any] = dict(
        image=inp.image or k8s.default_image(), command=command, oss_secret=inp.oss_secret,
        namespace=resolve_namespace(inp.namespace), name_prefix=inp.name_prefix, resources=inp.resources,
        node_selector=inp.node_selector or None,
    )
    if inp.legacy_pytorchjob:
        return k8s.render_pytorchjob(cfg, **common)
    return k8s.render_trainjob(cfg, runtime=inp.runtime, **common)


def ref_of(manifest: dict[str, Any]) -> JobRef:
    meta = manifest["metadata"]
    return JobRef(name=meta["name"], namespace=meta.get("namespace", "default"),
                  legacy_pytorchjob=manifest["kind"] == k8s.PYTORCHJOB_API[3])


def start_training(inp: RemoteTrainInput, api: Any, *, echo: Echo = print) -> JobRef:
    """Submit the job, or re-attach to the one an earlier attempt started; returns without waiting.

    A job of this run that already failed is replaced (a retry should retry; the trainer
    resumes from its last checkpoint); a running or finished one is kept.
    """
    manifest = prepare_job(inp, echo)
    k8s_jobs.create_or_attach(manifest, api=api, echo=echo, poll_seconds=inp.poll_seconds)
    return ref_of(manifest)


def submit_training(
    inp: RemoteTrainInput,
    *,
    api: Any = None,
    core_api: Any = None,
    log: Echo = print,
    cancel: threading.Event | None = None,
) -> TrainOutput:
    """Train as a Kubernetes job and wait for it; node 0's log goes to `log` as it is written.

    Raises trainer.k8s_jobs.JobFailed with the job's reason and message, JobCancelled (after
    deleting the job) when `cancel` is set, JobTimeout after inp.timeout_seconds.
    """
    if api is None:
        api, own_core = kube_clients()
        core_api = core_api if core_api is not None else own_core
    manifest = prepare_job(inp, log)
    logs = k8s_jobs.pod_log_source(core_api) if core_api is not None else None
    k8s_jobs.submit_and_wait(manifest, api=api, poll_seconds=inp.poll_seconds, timeout=inp.timeout_seconds,
                        log=logs, echo=log, cancel=cancel)
    return collect_output(inp.config)


# --- polling from elsewhere (an Airflow trigger) ---------------------------------------------------


def job_state(name: str, namespace: str, api: Any, *, legacy: bool = False) -> tuple[str, str]:
    """('running' | 'succeeded' | 'failed', message) of a submitted job.

    A job that no longer exists failed (someone deleted it before it finished).
    """
    group, version, plural, kind = _api(legacy)
    try:
        obj = api.get_namespaced_custom_object(group, version, namespace, plural, name)
    except Exception as e:  # noqa: BLE001 - only "not found" has a meaning here
        if getattr(e, "status", None) == 404:
            return "failed", f"{kind} {namespace}/{name} no longer exists (deleted before it finished)"
        raise
    return k8s_jobs.job_state(obj)


def delete_job(name: str, namespace: str, api: Any, *, legacy: bool = False) -> bool:
    """Delete the job and its pods; False when it was already gone."""
    group, version, plural, _ = _api(legacy)
    try:
        api.delete_namespaced_custom_object(group, version, namespace, plural, name, propagation_policy="Foreground")
    except Exception as e:  # noqa: BLE001
        if getattr(e, "status", None) == 404:
            return False
        raise
    return True


def node0_log(name: str, namespace: str, core_api: Any, *, legacy: bool = False) -> str:
    """The log of the job's first node so far ('' while its pod is not running yet)."""
    kind = _api(legacy)[3]
    return k8s_jobs.pod_log_source(core_api)({"kind": kind, "metadata": {"name": name, "namespace": namespace}})


def tail(text: str, lines: int = 50) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- results ------------------------------------------------------------------------------------


def collect_output(config: RunConfig) -> TrainOutput:
    """The TrainOutput of a finished job, read from the model folder it wrote.

    Fails clearly when the folder holds no model: a job that "succeeded" without writing to
    output_dir usually means the pods see another filesystem than the one given.
    """
    out = config.output_dir

    def read_json(name: str) -> Any:
        url = storage.join(out, name)
        if not storage.exists(url):
            raise FileNotFoundError(
                f"the job finished but {url} does not exist; the job's pods must write to the same output_dir "
                "(an oss:// folder, or a volume both sides mount at the same path)"
            )
        return json.loads(storage.read_text(url))

    saved, history, usage = read_json(CONFIG_FILE), read_json(HISTORY_FILE), read_json(USAGE_FILE)
    weights = storage.join(out, WEIGHTS_FILE)
    if not storage.exists(weights):
        raise FileNotFoundError(f"the job finished but wrote no weights: {weights} does not exist")
    epochs = int(history[-1]["epoch"]) if history else 0
    return TrainOutput(
        model_dir=out,
        config_hash=saved["config_hash"],
        epochs_completed=epochs,
        stopped_early=epochs < int(saved["train"]["epochs"]),
        final_loss=float(history[-1]["loss"]) if history else math.nan,
        history=history,
        instance_minutes=float(usage["instance_minutes"]),
    )
