"""A small in-memory Kubernetes for the remote-training tests: the API calls we make, and pods that run.

It stands in for the cluster, not for our code: `FakeCluster` offers the CustomObjectsApi methods
(create/get/delete_namespaced_custom_object) and the CoreV1Api ones (list_namespaced_pod,
read_namespaced_pod_log) that trainer.k8s and trainer.remote_train call, and behaves like the
Kubeflow controllers behind them:

- create validates a TrainJob against the Trainer API's models (what the API server's strict
  field validation does), answers 409 for an existing name, and starts the job's pods;
- each pod is a local process running the manifest's container command, with the PET_* variables
  the Kubeflow Trainer / Training Operator inject (torchrun reads them), the pod labels JobSet
  or the Training Operator set, and env from Secrets resolved as the kubelet would;
- the job's status conditions follow its pods: Complete/Succeeded when all exit 0, Failed with a
  message naming the pod and exit code otherwise;
- delete stops the pods (SIGTERM first, as the kubelet does) and removes the job.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imlt.trainer import k8s

REPO = Path(__file__).resolve().parents[2]


class ApiError(Exception):
    """Like kubernetes.client.ApiException: an HTTP status and a reason."""

    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(f"({status}) {reason}")
        self.status, self.reason = status, reason


@dataclass
class FakePod:
    name: str
    namespace: str
    labels: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    start_error: str = ""  # e.g. a missing Secret: the container never starts

    @property
    def exit_code(self) -> int | None:
        if self.start_error:
            return 1
        return None if self.proc is None else self.proc.poll()


@dataclass
class FakeJob:
    obj: dict[str, Any]
    pods: list[FakePod] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeCluster:
    """CustomObjectsApi + CoreV1Api over local processes. Use as a context manager (kills leftovers)."""

    def __init__(self, workdir: Path, *, secrets: dict[str, dict[str, str]] | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.secrets = secrets or {}
        self.extra_env = extra_env or {}
        self.jobs: dict[tuple[str, str, str], FakeJob] = {}  # (plural, namespace, name)
        self.creates = 0  # successful creates (a 409 is not one)
        self.deletes = 0
        self.lock = threading.Lock()

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for job in list(self.jobs.values()):
            self._stop(job)

    # --- CustomObjectsApi ---------------------------------------------------------------------

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        name = body["metadata"]["name"]
        key = (plural, namespace, name)
        with self.lock:
            if key in self.jobs:
                raise ApiError(409, f"{plural} {name!r} already exists")
            if plural == k8s.TRAINJOB_API[2]:
                try:
                    k8s.validate_trainjob(body)
                except k8s.ManifestError as e:
                    raise ApiError(422, str(e)) from None
            obj = copy.deepcopy(body)
            obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ"))
            obj["status"] = {}
            job = FakeJob(obj)
            self.jobs[key] = job
            self.creates += 1
        job.pods = self._start_pods(obj)
        return copy.deepcopy(obj)

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                     **kw: Any) -> dict[str, Any]:
        job = self.jobs.get((plural, namespace, name))
        if job is None:
            raise ApiError(404, f"{plural} {name!r} not found")
        self._update_status(job)
        return copy.deepcopy(job.obj)

    def delete_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str,
                                        **kw: Any) -> dict[str, Any]:
        job = self.jobs.get((plural, namespace, name))
        if job is None:
            raise ApiError(404, f"{plural} {name!r} not found")
        self._stop(job)  # foreground deletion: the pods go first, then the job
        del self.jobs[(plural, namespace, name)]
        self.deletes += 1
        return {"kind": "Status", "status": "Success"}

    # --- CoreV1Api ----------------------------------------------------------------------------

    def list_namespaced_pod(self, namespace: str, label_selector: str = "", **kw: Any) -> dict[str, Any]:
        wanted = dict(part.split("=", 1) for part in label_selector.split(",") if part)
        items = [
            {"metadata": {"name": pod.name, "namespace": pod.namespace, "labels": dict(pod.labels)}}
            for job in self.jobs.values() for pod in job.pods
            if pod.namespace == namespace and all(pod.labels.get(k) == v for k, v in wanted.items())
        ]
        return {"kind": "PodList", "items": items}

    def read_namespaced_pod_log(self, name: str, namespace: str, **kw: Any) -> str:
        for job in self.jobs.values():
            for pod in job.pods:
                if pod.name == name and pod.namespace == namespace:
                    if pod.start_error:
                        raise ApiError(400, f'container "node" in pod "{name}" is waiting to start: {pod.start_error}')
                    return pod.log_path.read_text(errors="replace") if pod.log_path.exists() else ""
        raise ApiError(404, f"pod {name!r} not found")

    # --- the controllers' part ------------------------------------------------------------------

    def pods_of(self, name: str) -> list[FakePod]:
        return [pod for (_, _, n), job in self.jobs.items() if n == name for pod in job.pods]

    def _start_pods(self, obj: dict[str, Any]) -> list[FakePod]:
        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        if obj["kind"] == k8s.TRAINJOB_API[3]:
            trainer = obj["spec"]["trainer"]
            nnodes, nproc = trainer.get("numNodes", 1), trainer.get("numProcPerNode", 1)
            command, env = trainer["command"], trainer.get("env", [])
            shapes = [(f"{name}-node-0-{i}", {
                "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": k8s.TRAINJOB_NODE,
                "jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-completion-index": str(i),
            }) for i in range(nnodes)]
        else:
            specs = obj["spec"]["pytorchReplicaSpecs"]
            (container,) = specs["Master"]["template"]["spec"]["containers"]
            command, env = container["command"], container.get("env", [])
            nproc = int(obj["spec"].get("nprocPerNode", "1"))
            workers = specs.get("Worker", {}).get("replicas", 0)
            nnodes = 1 + workers
            base = {"training.kubeflow.org/job-name": name}
            shapes = [(f"{name}-master-0", {**base, "training.kubeflow.org/replica-type": "master",
                                            "training.kubeflow.org/replica-index": "0"})]
            shapes += [(f"{name}-worker-{i}", {**base, "training.kubeflow.org/replica-type": "worker",
                                               "training.kubeflow.org/replica-index": str(i)}) for i in range(workers)]
        port = _free_port()
        pods = []
        for rank, (pod_name, labels) in enumerate(shapes):
            pod = FakePod(pod_name, ns, labels, self.workdir / f"{pod_name}.log")
            resolved, error = self._resolve_env(env)
            if error:
                pod.start_error = error
            else:
                pod_env = {
                    **os.environ, **self.extra_env, **resolved,
                    "PET_NNODES": str(nnodes), "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(rank),
                    "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                }
                for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                    pod_env.pop(var, None)
                exe = shutil.which(command[0], path=pod_env["PATH"]) or command[0]
                with open(pod.log_path, "wb") as out:
                    pod.proc = subprocess.Popen([exe, *command[1:]], cwd=self.workdir, env=pod_env,
                                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            pods.append(pod)
        return pods

    def _resolve_env(self, env: list[dict[str, Any]]) -> tuple[dict[str, str], str]:
        out: dict[str, str] = {}
        for item in env:
            if "value" in item:
                out[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            value = self.secrets.get(ref["name"], {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                return {}, f"CreateContainerConfigError: secret {ref['name']!r} has no key {ref['key']!r}"
            out[item["name"]] = value
        return out, ""

    def _update_status(self, job: FakeJob) -> None:
        if job.obj["status"].get("conditions"):
            return  # finished: conditions never change again
        codes = [(pod, pod.exit_code) for pod in job.pods]
        failed = [(pod, code) for pod, code in codes if code not in (None, 0)]
        legacy = job.obj["kind"] == k8s.PYTORCHJOB_API[3]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ")
        if failed:
            pod, code = failed[0]
            self._stop(job)  # a failed replicated job fails the whole JobSet / PyTorchJob
            why = pod.start_error or f"pod {pod.name} exited with code {code}"
            cond = {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed" if legacy else "TrainJobFailed",
                    "message": why, "lastTransitionTime": now}
        elif all(code == 0 for _, code in codes):
            cond = {"type": "Succeeded" if legacy else "Complete", "status": "True",
                    "reason": "PyTorchJobSucceeded" if legacy else "JobsCompleted",
                    "message": "all pods completed", "lastTransitionTime": now}
        else:
            return
        job.obj["status"]["conditions"] = [cond]

    @staticmethod
    def _stop(job: FakeJob) -> None:
        for pod in job.pods:
            if pod.proc is not None and pod.proc.poll() is None:
                os.killpg(pod.proc.pid, signal.SIGTERM)  # torchrun forwards it to the trainer
        for pod in job.pods:
            if pod.proc is not None:
                try:
                    pod.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(pod.proc.pid, signal.SIGKILL)
                    pod.proc.wait()
