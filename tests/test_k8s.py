"""Kubernetes manifests (TrainJob, PyTorchJob) and the submit-and-wait loop.

The TrainJob is checked against the Kubeflow Trainer API package's own models (lossless round
trip), the PyTorchJob against a JSON schema kept in tests/schemas/ (from the public CRD) plus the
core/v1 PodTemplateSpec model. `submit_and_wait` runs against a small in-memory API: the thing
under test is our loop (create, re-attach, poll, fail, cancel), not Kubernetes.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubeflow_trainer_api.models import IoK8sApiCoreV1PodTemplateSpec

from imlt.trainer import k8s, k8s_jobs
from imlt.trainer.config import load_config

SCHEMA = json.loads((Path(__file__).parent / "schemas" / "pytorchjob-v1.schema.json").read_text())
IMAGE = "registry.example.com/imlt:0.1.0"
COMMAND = k8s.default_command("oss://bucket/runs/a/config.yaml")


def _cfg(**compute: Any) -> Any:
    raw: dict[str, Any] = {"output_dir": "oss://bucket/runs/a", "model": {"backbone": "resnet18"}, "train": {"max_hours": 2.5}}
    if compute:
        raw["compute"] = compute
    return load_config(raw)


CONFIGS = {
    "cpu-standalone": {},
    "instance-multinode": {"mode": "distributed", "nnodes": 3, "nproc_per_node": 4, "instance_type": "ecs.gn6v-c8g1.8xlarge"},
    "gpu-type-only": {"nproc_per_node": 2, "gpu_type": "nvidia-a10"},
}


def _validate_pytorchjob(manifest: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)
    for replica in manifest["spec"]["pytorchReplicaSpecs"].values():
        k8s.validate_against_model(IoK8sApiCoreV1PodTemplateSpec, replica["template"], "pod template")


def _env_by_name(env: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in env}


# ---- TrainJob -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONFIGS)
def test_trainjob_validates_against_the_trainer_api(case: str) -> None:
    manifest = k8s.render_trainjob(_cfg(**CONFIGS[case]), image=IMAGE, command=COMMAND)
    k8s.validate_trainjob(manifest)
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert manifest["spec"]["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime", "apiGroup": "trainer.kubeflow.org"}


def test_trainjob_fields_for_a_multi_node_gpu_run() -> None:
    cfg = _cfg(**CONFIGS["instance-multinode"])
    m = k8s.render_trainjob(cfg, image=IMAGE, command=COMMAND, namespace="ml", oss_secret="my-oss")
    trainer = m["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"], trainer["command"]) == (3, 4, IMAGE, COMMAND)
    # ecs.gn6v-c8g1.8xlarge: 32 vCPU, 128 GB, 4 x V100
    expected = {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": "4"}
    assert trainer["resourcesPerNode"] == {"requests": expected, "limits": expected}
    env = _env_by_name(trainer["env"])
    for var in ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_ENDPOINT"):
        assert "value" not in env[var]
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "my-oss"
        assert env[var]["valueFrom"]["secretKeyRef"]["key"] == var
    assert "optional" not in env["OSS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]
    assert m["spec"]["activeDeadlineSeconds"] == int(2.5 * 3600) + k8s.DEADLINE_GRACE_SECONDS
    (patch,) = m["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    pod = rjob["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"accelerator": "nvidia-tesla-v100"}
    assert m["metadata"]["namespace"] == "ml"
    assert m["metadata"]["labels"]["imlt/config-hash"] == cfg.config_hash()


def test_trainjob_cpu_run_has_no_gpu_parts_and_no_secret_when_disabled() -> None:
    m = k8s.render_trainjob(_cfg(), image=IMAGE, command=COMMAND, oss_secret=None)
    k8s.validate_trainjob(m)
    (patch,) = m["spec"]["runtimePatches"]  # only the /dev/shm volume: no node selector, no tolerations
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert set(job["template"]["spec"]["template"]["spec"]) == {"volumes", "containers"}
    assert "resourcesPerNode" not in m["spec"]["trainer"]
    assert "env" not in m["spec"]["trainer"]


def test_plain_resources_and_gpu_type() -> None:
    cfg = _cfg(**CONFIGS["gpu-type-only"])
    m = k8s.render_trainjob(cfg, image=IMAGE, command=COMMAND, resources={"cpu": 6, "memory": "40Gi"}, gpu_label="aliyun.accelerator/nvidia_name")
    k8s.validate_trainjob(m)
    res = m["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert res == {"cpu": "6", "memory": "40Gi", "nvidia.com/gpu": "2"}  # one GPU per process
    pod = m["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"aliyun.accelerator/nvidia_name": "nvidia-a10"}


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda m: m["spec"]["trainer"].__setitem__("numNode", 2), r"numNode \(unknown field\)"),
        (lambda m: m["spec"].__setitem__("runPolicy", {"activeDeadlineSeconds": 5}), r"spec.runPolicy \(unknown field\)"),
        (lambda m: m["spec"]["trainer"].__setitem__("numNodes", "2"), "numNodes"),
        (lambda m: m["spec"]["runtimeRef"].pop("name"), "name"),
        (lambda m: m["metadata"].__setitem__("name", "Bad_Name"), "RFC 1035"),
    ],
)
def test_trainjob_validation_catches_mistakes(mutate: Any, problem: str) -> None:
    m = k8s.render_trainjob(_cfg(), image=IMAGE, command=COMMAND)
    mutate(m)
    with pytest.raises(k8s.ManifestError, match=problem):
        k8s.validate_trainjob(m)


# ---- names --------------------------------------------------------------------------------------


def test_names_are_deterministic_rfc1035_and_depend_on_the_run() -> None:
    cfg = _cfg()
    a = k8s.render_trainjob(cfg, image=IMAGE, command=COMMAND)["metadata"]["name"]
    assert a == k8s.render_trainjob(_cfg(), image=IMAGE, command=COMMAND)["metadata"]["name"]
    other = load_config({**cfg.model_dump(mode="json"), "train": {"max_hours": 3.0}})
    assert k8s.job_name(other, image=IMAGE, command=COMMAND) != a
    assert k8s.job_name(cfg, image="imlt:0.2.0", command=COMMAND) != a
    for prefix in ("imlt", "9_My Prefix!!", "x" * 200, "---", "Metric-Learning.Products"):
        name = k8s.job_name(cfg, prefix=prefix)
        assert k8s.check_name(name) == name and len(name) <= 40, name


def test_explicit_bad_name_is_refused() -> None:
    with pytest.raises(k8s.ManifestError, match="RFC 1035"):
        k8s.render_pytorchjob(_cfg(), image=IMAGE, command=COMMAND, name="a" * 64)


def test_more_processes_than_gpus_is_refused() -> None:
    cfg = _cfg(nproc_per_node=2, instance_type="ecs.gn5-c8g1.2xlarge")  # 1 x P100
    with pytest.raises(k8s.ManifestError, match="has 1 GPU"):
        k8s.render_trainjob(cfg, image=IMAGE, command=COMMAND)


# ---- PyTorchJob ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONFIGS)
def test_pytorchjob_validates_against_the_crd_schema(case: str) -> None:
    cfg = _cfg(**CONFIGS[case])
    m = k8s.render_pytorchjob(cfg, image=IMAGE, command=COMMAND)
    _validate_pytorchjob(m)
    replicas = m["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == cfg.compute.nnodes - 1
    assert m["spec"]["nprocPerNode"] == str(cfg.compute.nproc_per_node)
    assert m["spec"]["runPolicy"]["activeDeadlineSeconds"] == int(2.5 * 3600) + k8s.DEADLINE_GRACE_SECONDS
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["command"] == COMMAND
    assert all("value" not in e for e in container["env"])


def test_pytorchjob_gpu_parts() -> None:
    m = k8s.render_pytorchjob(_cfg(**CONFIGS["instance-multinode"]), image=IMAGE, command=COMMAND)
    pod = m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == {"accelerator": "nvidia-tesla-v100"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert m["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("restartPolicy", "Sometimes"),
        lambda m: m["spec"].__setitem__("nprocPerNode", 4),
        lambda m: m["spec"]["runPolicy"].__setitem__("activeDeadline", 10),
        lambda m: m["spec"]["pytorchReplicaSpecs"].__setitem__("Chief", {"replicas": 1}),
        lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].__setitem__("imagePullPolicy", "Sometimes"),
        lambda m: m["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].__setitem__("commands", ["x"]),
    ],
)
def test_pytorchjob_validation_catches_mistakes(mutate: Any) -> None:
    m = k8s.render_pytorchjob(_cfg(), image=IMAGE, command=COMMAND)
    mutate(m)
    with pytest.raises((jsonschema.ValidationError, k8s.ManifestError)):
        _validate_pytorchjob(m)


# ---- CLI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_render_for_cli(tmp_path: Path, legacy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMLT_IMAGE", IMAGE)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "oss://bucket/runs/a", "model": {"backbone": "resnet18"}}))
    text = k8s.render_for_cli(str(path), legacy)
    assert text.startswith("# note:") and str(path) in text.splitlines()[0]
    manifest = yaml.safe_load(text)
    if legacy:
        _validate_pytorchjob(manifest)
        container = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        assert container["image"] == IMAGE and str(path) in container["command"]
    else:
        k8s.validate_trainjob(manifest)
        assert manifest["spec"]["trainer"]["image"] == IMAGE


# ---- submit and wait ----------------------------------------------------------------------------


class ApiError(Exception):
    """Shaped like kubernetes.client.ApiException: an HTTP status in `.status`."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _condition(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


class FakeApi:
    """In-memory custom objects: each get advances the job through `script` (lists of conditions)."""

    def __init__(self, script: list[list[dict[str, Any]]] | None = None, *, interrupt_on_get: int | None = None) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.script = list(script or [])
        self.calls: list[str] = []
        self.gets = 0
        self.interrupt_on_get = interrupt_on_get

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        self.calls.append("create")
        assert kw.get("field_validation") == "Strict"
        key = (plural, namespace, body["metadata"]["name"])
        if key in self.objects:
            raise ApiError(409)
        self.objects[key] = {**copy.deepcopy(body), "status": {"conditions": []}}
        return self.objects[key]

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str, **kw: Any) -> dict[str, Any]:
        self.calls.append("get")
        self.gets += 1
        if self.interrupt_on_get == self.gets:
            raise KeyboardInterrupt
        key = (plural, namespace, name)
        if key not in self.objects:
            raise ApiError(404)
        if self.script:
            self.objects[key]["status"]["conditions"] = self.script.pop(0)
        return copy.deepcopy(self.objects[key])

    def delete_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str, **kw: Any) -> dict[str, Any]:
        self.calls.append("delete")
        if self.objects.pop((plural, namespace, name), None) is None:
            raise ApiError(404)
        return {}


RUNNING = [_condition("Created")]


@pytest.fixture()
def trainjob() -> dict[str, Any]:
    return k8s.render_trainjob(_cfg(), image=IMAGE, command=COMMAND)


def test_create_poll_and_succeed(trainjob: dict[str, Any]) -> None:
    api = FakeApi([RUNNING, RUNNING, [_condition("Created"), _condition("Complete", "JobsCompleted")]])
    lines: list[str] = []
    job = k8s_jobs.submit_and_wait(trainjob, api=api, poll_seconds=0, echo=lines.append)
    assert k8s_jobs.job_state(job)[0] == "succeeded"
    assert api.calls == ["create", "get", "get", "get"]
    assert lines[0].startswith("created TrainJob default/imlt-") and lines[-1].endswith("succeeded")


def test_pytorchjob_succeeded_condition() -> None:
    m = k8s.render_pytorchjob(_cfg(), image=IMAGE, command=COMMAND)
    api = FakeApi([[_condition("Running")], [_condition("Succeeded")]])
    job = k8s_jobs.submit_and_wait(m, api=api, poll_seconds=0, echo=lambda s: None)
    assert job["kind"] == "PyTorchJob" and api.calls.count("get") == 2


def test_reattach_on_conflict(trainjob: dict[str, Any]) -> None:
    api = FakeApi()
    api.create_namespaced_custom_object("g", "v", "default", "trainjobs", trainjob, field_validation="Strict")
    api.calls.clear()
    api.script = [RUNNING, RUNNING, [_condition("Complete")]]
    lines: list[str] = []
    k8s_jobs.submit_and_wait(trainjob, api=api, poll_seconds=0, echo=lines.append)
    assert api.calls == ["create", "get", "get", "get"]  # the 409'd create, then re-attached polling
    assert any("re-attaching" in line for line in lines)


def test_conflict_with_a_different_job_is_refused(trainjob: dict[str, Any]) -> None:
    api = FakeApi()
    other = copy.deepcopy(trainjob)
    other["metadata"]["annotations"][k8s.ANNOTATION_MANIFEST_HASH] = "something-else"
    api.create_namespaced_custom_object("g", "v", "default", "trainjobs", other, field_validation="Strict")
    with pytest.raises(k8s.ManifestError, match="already exists with a different spec"):
        k8s_jobs.submit_and_wait(trainjob, api=api, poll_seconds=0, echo=lambda s: None)


def test_failure_raises_with_the_jobs_message(trainjob: dict[str, Any]) -> None:
    api = FakeApi([RUNNING, [_condition("Failed", "DeadlineExceeded", "TrainJob exceeded its activeDeadlineSeconds")]])
    with pytest.raises(k8s_jobs.JobFailed, match="DeadlineExceeded: TrainJob exceeded its activeDeadlineSeconds"):
        k8s_jobs.submit_and_wait(trainjob, api=api, poll_seconds=0, echo=lambda s: None)
    assert "delete" not in api.calls  # a failed job stays for inspection


def test_existing_failed_job_is_replaced_on_retry(trainjob: dict[str, Any]) -> None:
    api = FakeApi()
    api.create_namespaced_custom_object("g", "v", "default", "trainjobs", trainjob, field_validation="Strict")
    api.script = [[_condition("Failed", "BackoffLimitExceeded")], [_condition("Complete")]]
    api.calls.clear()
    job = k8s_jobs.submit_and_wait(trainjob, api=api, poll_seconds=0, echo=lambda s: None)
    # create (409) -> get (failed) -> delete -> get (404: gone) -> create -> get (complete)
    assert api.calls == ["create", "get", "delete", "get", "create", "get"]
    assert k8s_jobs.job_state(job)[0] == "succeeded"


def test_cancel_event_deletes_the_job(trainjob: dict[str, Any]) -> None:
    api = FakeApi([RUNNING] * 100)
    cancel = threading.Event()
    seen: list[str] = []

    def echo(line: str) -> None:
        seen.append(line)
        if line.startswith("created"):
            cancel.set()

    with pytest.raises(k8s_jobs.JobCancelled):
        k8s_jobs.submit_and_wait(trainjob, api=api, poll_seconds=5, echo=echo, cancel=cancel)
    assert api.calls[-1] == "delete" and not api.objects


def test_keyboard_interrupt_deletes_the_job(trainjob: dict[str, Any]) -> None:
    api = FakeApi([RUNNING] * 100, interrupt_on_get=3)
    with pytest.raises(KeyboardInterrupt):
        k8s_jobs.submit_and_wait(trainjob, api=api, poll_seconds=0, echo=lambda s: None)
    assert api.calls[-1] == "delete" and not api.objects


def test_timeout_deletes_the_job(trainjob: dict[str, Any]) -> None:
    api = FakeApi([RUNNING] * 100)
    with pytest.raises(k8s_jobs.JobTimeout, match="still running after 0 s"):
        k8s_jobs.submit_and_wait(trainjob, api=api, poll_seconds=0, timeout=0, echo=lambda s: None)
    assert api.calls[-1] == "delete" and not api.objects


def test_other_create_errors_propagate(trainjob: dict[str, Any]) -> None:
    class Forbidden(FakeApi):
        def create_namespaced_custom_object(self, *a: Any, **kw: Any) -> dict[str, Any]:
            raise ApiError(403)

    with pytest.raises(ApiError, match="403"):
        k8s_jobs.submit_and_wait(trainjob, api=Forbidden(), poll_seconds=0, echo=lambda s: None)


def test_node0_logs_are_streamed_once(trainjob: dict[str, Any]) -> None:
    class FakeCore:
        """CoreV1Api-like: one node-0 pod whose log grows on every read."""

        def __init__(self) -> None:
            self.reads = 0
            self.selectors: list[str] = []

        def list_namespaced_pod(self, namespace: str, label_selector: str) -> dict[str, Any]:
            self.selectors.append(label_selector)
            return {"items": [{"metadata": {"name": "job-node-0-0-abcde"}}]} if self.reads or self.selectors[1:] else {"items": []}

        def read_namespaced_pod_log(self, name: str, namespace: str) -> str:
            self.reads += 1
            return "".join(f"epoch {i}\n" for i in range(self.reads))

    core = FakeCore()
    api = FakeApi([RUNNING, RUNNING, RUNNING, [_condition("Complete")]])
    lines: list[str] = []
    k8s_jobs.submit_and_wait(trainjob, api=api, poll_seconds=0, echo=lines.append, log=k8s_jobs.pod_log_source(core))
    logged = [line for line in lines if line.startswith("epoch")]
    assert logged == ["epoch 0", "epoch 1", "epoch 2"]  # first poll: no pod yet; no line twice
    name = trainjob["metadata"]["name"]
    assert f"jobset.sigs.k8s.io/jobset-name={name}" in core.selectors[0]
    assert "batch.kubernetes.io/job-completion-index=0" in core.selectors[0]


def test_manifest_of_unknown_kind_is_refused() -> None:
    with pytest.raises(k8s.ManifestError, match="expected a TrainJob or a PyTorchJob"):
        k8s_jobs.submit_and_wait({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}}, api=FakeApi(), echo=lambda s: None)


# ---- /dev/shm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONFIGS)
def test_every_job_pod_mounts_a_memory_backed_dev_shm_sized_from_its_memory(case: str) -> None:
    cfg = _cfg(**CONFIGS[case])
    memory = k8s.node_resources(cfg.compute)[0].get("limits", {}).get("memory")
    expected = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size_limit(memory)}}
    mount = {"name": "dshm", "mountPath": "/dev/shm"}

    trainjob = k8s.render_trainjob(cfg, image=IMAGE, command=COMMAND)
    k8s.validate_trainjob(trainjob)
    (patch,) = trainjob["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["volumes"] == [expected]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [mount]}]

    pytorchjob = k8s.render_pytorchjob(cfg, image=IMAGE, command=COMMAND)
    _validate_pytorchjob(pytorchjob)
    for replica in pytorchjob["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["volumes"] == [expected]
        assert replica["template"]["spec"]["containers"][0]["volumeMounts"] == [mount]


@pytest.mark.parametrize("memory,size", [("60Gi", "30Gi"), ("16G", "8G"), ("3Gi", "1.5Gi"), (None, "4Gi"), ("lots", "4Gi")])
def test_shm_size_is_half_the_memory_limit(memory: str | None, size: str) -> None:
    assert k8s.shm_size_limit(memory) == size
