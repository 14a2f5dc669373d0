"""Submitting a training job's manifest (trainer.k8s) and waiting for it: one loop for KFP and Airflow.

No Kubernetes client here (kfp and the Airflow Kubernetes provider pin incompatible `kubernetes`
versions): `submit_and_wait` drives any object with the three CustomObjectsApi methods it needs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from imlt.trainer.k8s import ANNOTATION_MANIFEST_HASH, PYTORCHJOB_API, TRAINJOB_API, TRAINJOB_NODE, ManifestError

logger = logging.getLogger(__name__)


class CustomObjectsApi(Protocol):
    """The part of kubernetes.client.CustomObjectsApi this module uses."""

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]: ...

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str, **kw: Any) -> dict[str, Any]: ...

    def delete_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str, **kw: Any) -> Any: ...


class JobFailed(RuntimeError):
    """The job ended in a Failed condition; the message carries the job's reason and message."""


class JobCancelled(RuntimeError):
    """Waiting was cancelled; the job has been deleted."""


class JobTimeout(TimeoutError):
    """Waiting took longer than `timeout`; the job has been deleted."""


# Condition types: TrainJob uses Complete/Failed, PyTorchJob Succeeded/Failed.
_DONE = {"Complete", "Succeeded"}
_FAILED = {"Failed"}

LogSource = Callable[[dict[str, Any]], str]


def _api_of(manifest: dict[str, Any]) -> tuple[str, str, str]:
    for group, version, plural, kind in (TRAINJOB_API, PYTORCHJOB_API):
        if manifest.get("apiVersion") == f"{group}/{version}" and manifest.get("kind") == kind:
            return group, version, plural
    raise ManifestError(f"cannot submit apiVersion={manifest.get('apiVersion')!r} kind={manifest.get('kind')!r}: expected a TrainJob or a PyTorchJob")


def _http_status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)
    return status if isinstance(status, int) else None


def job_state(obj: dict[str, Any]) -> tuple[str, str]:
    """('succeeded' | 'failed' | 'running', message) from the job's status conditions."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if str(cond.get("status")) != "True":
            continue
        text = ": ".join(p for p in (cond.get("reason"), cond.get("message")) if p)
        if cond.get("type") in _FAILED:
            return "failed", text or "no message"
        if cond.get("type") in _DONE:
            return "succeeded", text
    return "running", ""


def node0_selector(manifest: dict[str, Any]) -> str:
    """Label selector of the first node's pod (the one whose logs are worth streaming)."""
    name = manifest["metadata"]["name"]
    if manifest.get("kind") == TRAINJOB_API[3]:
        return (
            f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={TRAINJOB_NODE},"
            "jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
        )
    return f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master,training.kubeflow.org/replica-index=0"


def pod_log_source(core_api: Any) -> LogSource:
    """A LogSource over a CoreV1Api-like object (list_namespaced_pod, read_namespaced_pod_log)."""

    def read(job: dict[str, Any]) -> str:
        ns = job["metadata"].get("namespace", "default")
        pods = core_api.list_namespaced_pod(ns, label_selector=node0_selector(job))
        items = pods.get("items", []) if isinstance(pods, dict) else getattr(pods, "items", [])
        if not items:
            return ""
        pod = items[0]
        pod_name = pod["metadata"]["name"] if isinstance(pod, dict) else pod.metadata.name
        try:
            return core_api.read_namespaced_pod_log(pod_name, ns) or ""
        except Exception as e:  # noqa: BLE001 - a pod still starting has no log yet
            if _http_status(e) in (400, 404):
                return ""
            raise

    return read


class _LogTail:
    """Emit only the lines not shown yet, from a source that returns the whole log so far."""

    def __init__(self, source: LogSource | None, echo: Callable[[str], None]) -> None:
        self.source, self.echo, self.seen = source, echo, ""

    def __call__(self, job: dict[str, Any]) -> None:
        if self.source is None:
            return
        try:
            text = self.source(job)
        except Exception as e:  # noqa: BLE001 - logs are a convenience; never fail the wait on them
            logger.debug("reading node-0 logs failed: %s", e)
            return
        new = text[len(self.seen):] if text.startswith(self.seen) else text  # a restarted pod starts over
        self.seen = text
        for line in new.splitlines():
            self.echo(line)


# Public name: callers that poll on their own (an Airflow trigger) tail the node-0 log the same way.
LogTail = _LogTail


def _job_handle(manifest: dict[str, Any], api: CustomObjectsApi, echo: Callable[[str], None], poll_seconds: float,
                cancel: threading.Event | None) -> tuple[str, Callable[[], dict[str, Any]], Callable[[], None], Callable[[], None]]:
    """(description, get, delete, wait_gone) for the job a manifest names."""
    group, version, plural = _api_of(manifest)
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"].get("namespace", "default")
    what = f"{manifest['kind']} {namespace}/{name}"
    args = (group, version, namespace, plural)

    def get() -> dict[str, Any]:
        return api.get_namespaced_custom_object(*args, name)

    def delete() -> None:
        try:
            api.delete_namespaced_custom_object(*args, name, propagation_policy="Foreground")
            echo(f"deleted {what}")
        except Exception as e:  # noqa: BLE001
            if _http_status(e) != 404:
                raise

    def wait_gone() -> None:
        for _ in range(max(1, int(300 / max(poll_seconds, 1.0)))):
            try:
                get()
            except Exception as e:  # noqa: BLE001
                if _http_status(e) == 404:
                    return
                raise
            _pause(cancel, poll_seconds)
        raise RuntimeError(f"{what} is still being deleted after 5 minutes")

    return what, get, delete, wait_gone


def create_or_attach(
    manifest: dict[str, Any],
    *,
    api: CustomObjectsApi,
    echo: Callable[[str], None] | None = None,
    replace_failed: bool = True,
    poll_seconds: float = 15.0,
    cancel: threading.Event | None = None,
) -> str:
    """Create the job, or re-attach to the one a previous attempt created; returns what happened.

    'created', 'attached' or 'replaced'. A 409 on create means the job exists (same
    deterministic name); its spec hash must match ours, else ManifestError. With
    `replace_failed`, an existing job that already failed is deleted and created again (a retry
    should retry; the trainer resumes from its last checkpoint); any other is re-attached to.
    Waiting is separate (`submit_and_wait`, or a deferred poll of the job's state).
    """
    echo = echo or logger.info
    group, version, plural = _api_of(manifest)
    namespace = manifest["metadata"].get("namespace", "default")
    args = (group, version, namespace, plural)
    what, get, delete, wait_gone = _job_handle(manifest, api, echo, poll_seconds, cancel)
    try:
        # Strict: the API server rejects unknown fields instead of dropping them
        api.create_namespaced_custom_object(*args, manifest, field_validation="Strict")
        echo(f"created {what}")
        return "created"
    except Exception as e:  # noqa: BLE001 - only a conflict is ours to handle
        if _http_status(e) != 409:
            raise
    existing = get()
    ours = manifest["metadata"].get("annotations", {}).get(ANNOTATION_MANIFEST_HASH)
    theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_MANIFEST_HASH)
    if ours != theirs:
        raise ManifestError(
            f"{what} already exists with a different spec ({ANNOTATION_MANIFEST_HASH} {theirs!r} != {ours!r}); "
            "delete it or render with another name"
        )
    state, message = job_state(existing)
    if state == "failed" and replace_failed:
        echo(f"{what} exists and failed earlier ({message}); replacing it")
        delete()
        wait_gone()
        api.create_namespaced_custom_object(*args, manifest, field_validation="Strict")
        echo(f"created {what}")
        return "replaced"
    echo(f"{what} already exists ({state}); re-attaching")
    return "attached"


def submit_and_wait(
    manifest: dict[str, Any],
    *,
    api: CustomObjectsApi,
    poll_seconds: float = 15.0,
    timeout: float | None = None,
    log: LogSource | None = None,
    echo: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    replace_failed: bool = True,
) -> dict[str, Any]:
    """Create the job (or re-attach to the one a previous attempt created) and wait for its end.

    - Create or re-attach: see `create_or_attach` (a failed earlier job is replaced when
      `replace_failed`; one that succeeded is returned as is).
    - Success: a Complete (TrainJob) or Succeeded (PyTorchJob) condition; returns the job object.
    - Failure: a Failed condition raises JobFailed with the job's reason and message.
    - Cancel (KeyboardInterrupt, `cancel` set) and `timeout` delete the job, then raise.
    - `log(job) -> str` returns the node-0 log so far (see `pod_log_source`); new lines go to `echo`.
    """
    echo = echo or logger.info
    create_or_attach(manifest, api=api, echo=echo, replace_failed=replace_failed, poll_seconds=poll_seconds, cancel=cancel)
    what, get, delete, _ = _job_handle(manifest, api, echo, poll_seconds, cancel)

    tail = _LogTail(log, echo)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            job = get()
            tail(job)
            state, message = job_state(job)
            if state == "succeeded":
                echo(f"{what} succeeded")
                return job
            if state == "failed":
                raise JobFailed(f"{what} failed: {message}")
            if cancel is not None and cancel.is_set():
                raise JobCancelled(f"{what} cancelled")
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"{what} still running after {timeout:g} s")
            _pause(cancel, poll_seconds)
    except (KeyboardInterrupt, JobCancelled, JobTimeout):
        # Nobody will watch the job any more: do not leave it holding GPUs.
        delete()
        raise


def _pause(cancel: threading.Event | None, seconds: float) -> None:
    if cancel is not None:
        cancel.wait(seconds)  # wakes at once on cancel
    elif seconds > 0:
        time.sleep(seconds)
