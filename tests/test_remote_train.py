"""Training as a Kubernetes job (trainer.remote_train) against tests/support/fake_kube.FakeCluster.

The fake runs each pod as a local process executing the rendered command (torchrun -m
imlt.trainer.cli train ...), so these tests train real (tiny) models and check the model folder:
what is under test is our submit / re-attach / wait / collect logic, not Kubernetes.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.oss_server import OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET
from tests.support.fake_kube import FakeCluster
from tests.support.images import CLASSES, write_split
from imlt.trainer import k8s, k8s_jobs, remote_train, steps, storage
from imlt.trainer.config import load_config
from imlt.trainer.remote_train import RemoteTrainInput

TINY = {
    "model.backbone": "resnet18", "data.image_size": 32, "model.feature_dim": 16, "train.epochs": 1,
    "train.batch_size": 8, "data.reader_threads": 0, "train.device": "cpu",
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    out = {}
    for split in ("train", "val"):
        ann = write_split(root, split, per_class=4, size=32, seed=1 if split == "val" else 0, absolute=True)
        out[split] = steps.read_data(steps.ReadDataInput(
            output_dir=str(root / f"ds_{split}"), annotations=str(ann), split=split)).dataset_dir
    return out


def _input(output_dir: str, datasets: dict[str, str], **kw: Any) -> RemoteTrainInput:
    overrides = {**TINY, "output_dir": output_dir, **kw.pop("config", {})}
    return RemoteTrainInput(config=load_config({}, overrides), train_dataset=datasets["train"],
                            val_dataset=datasets["val"], image="imlt:test", poll_seconds=0.2, **kw)


def test_distributed_trainjob_on_oss_trains_a_model_and_a_retry_reattaches(
        tmp_path: Path, datasets: dict[str, str], oss_server: Any) -> None:
    secret = {"OSS_ACCESS_KEY_ID": OSS_TEST_ACCESS_KEY_ID, "OSS_ACCESS_KEY_SECRET": OSS_TEST_ACCESS_KEY_SECRET,
              "OSS_ENDPOINT": oss_server.endpoint}
    inp = _input(oss_server.url("runs/r1/model"), datasets,
                 config={"compute.mode": "distributed", "compute.nnodes": 2}, namespace="ml")
    lines: list[str] = []
    with FakeCluster(tmp_path, secrets={"oss-credentials": secret}) as cluster:
        out = remote_train.submit_training(inp, api=cluster, core_api=cluster, log=lines.append)

        # one TrainJob of two nodes; both pods trained (torchrun world of 2) from the staged inputs
        assert cluster.creates == 1
        (job,) = cluster.jobs.values()
        assert job.obj["kind"] == "TrainJob" and job.obj["metadata"]["namespace"] == "ml"
        assert job.obj["spec"]["trainer"]["numNodes"] == 2
        command = job.obj["spec"]["trainer"]["command"]
        staged = oss_server.url("runs/r1/model/inputs/train")
        assert command[:4] == ["torchrun", "-m", "imlt.trainer.cli", "train"]
        assert command[command.index("--train-dataset") + 1] == staged
        assert command[command.index("--config") + 1] == oss_server.url("runs/r1/model/job-config.json")
        assert [p.exit_code for p in job.pods] == [0, 0]

        # the output is the model folder the job wrote to OSS, read back like a local run's
        assert out.model_dir == inp.config.output_dir
        saved = json.loads(storage.read_text(storage.join(out.model_dir, "config.json")))
        assert out.config_hash == saved["config_hash"]
        assert saved["compute"]["nnodes"] == 2 and saved["model"]["num_classes"] == len(CLASSES)
        assert out.epochs_completed == 1 and not out.stopped_early and len(out.history) == 1
        assert out.final_loss == pytest.approx(out.history[0]["loss"])
        usage = json.loads(storage.read_text(storage.join(out.model_dir, "usage.json")))
        assert usage["processes"] == 2 and out.instance_minutes == usage["instance_minutes"] >= 2
        from imlt.trainer.model import load_embedding_model

        model, cfg = load_embedding_model(out.model_dir)  # a real, loadable model
        assert cfg.config_hash() == out.config_hash

        # node 0's log reached the caller: the CLI's JSON result printed by rank 0
        assert any(f"created TrainJob ml/{job.obj['metadata']['name']}" in line for line in lines)
        assert any(out.config_hash in line for line in lines)

        # a retried task renders the same name, finds the finished job and does not start another
        lines.clear()
        again = remote_train.submit_training(inp, api=cluster, core_api=cluster, log=lines.append)
        assert cluster.creates == 1 and len(cluster.jobs) == 1
        assert any("re-attaching" in line for line in lines)
        assert again == out


def test_failed_pytorchjob_raises_with_the_jobs_message_and_shows_the_log(tmp_path: Path, datasets: dict[str, str]) -> None:
    missing = str(tmp_path / "no-such-dataset")
    inp = _input(str(tmp_path / "model"), {**datasets, "train": missing}, legacy_pytorchjob=True, oss_secret=None)
    lines: list[str] = []
    with FakeCluster(tmp_path) as cluster:
        with pytest.raises(k8s_jobs.JobFailed) as err:
            remote_train.submit_training(inp, api=cluster, core_api=cluster, log=lines.append)
        (job,) = cluster.jobs.values()
    name = job.obj["metadata"]["name"]
    assert job.obj["kind"] == "PyTorchJob"
    assert f"PyTorchJob default/{name} failed: PyTorchJobFailed: pod {name}-master-0 exited with code" in str(err.value)
    # the trainer's own error, naming the missing folder, is in the node-0 log shown to the caller
    assert "no-such-dataset" in "".join("".join(line.split()) for line in lines), lines  # wrapped anywhere


def test_missing_secret_fails_with_the_kubelets_reason(tmp_path: Path, datasets: dict[str, str]) -> None:
    inp = _input(str(tmp_path / "model"), datasets, oss_secret="oss-credentials")
    with FakeCluster(tmp_path, secrets={}) as cluster, pytest.raises(k8s_jobs.JobFailed, match="secret 'oss-credentials' has no key 'OSS_ACCESS_KEY_ID'"):
        remote_train.submit_training(inp, api=cluster, core_api=cluster, log=lambda _: None)


def test_cancel_deletes_the_job_and_stops_its_pods(tmp_path: Path, datasets: dict[str, str]) -> None:
    inp = _input(str(tmp_path / "model"), datasets, config={"train.epochs": 200}, oss_secret=None)
    cancel = threading.Event()

    def echo(line: str) -> None:
        if line.startswith("created"):
            cancel.set()  # e.g. the KFP run was terminated right after submitting

    started: list[Any] = []

    class Watching(FakeCluster):
        def _start_pods(self, obj: dict[str, Any]) -> list[Any]:
            started.extend(super()._start_pods(obj))
            return started

    with Watching(tmp_path) as cluster:
        with pytest.raises(k8s_jobs.JobCancelled):
            remote_train.submit_training(inp, api=cluster, core_api=cluster, log=echo, cancel=cancel)
        assert cluster.creates == 1 and cluster.deletes == 1 and not cluster.jobs
        assert started and all(pod.exit_code is not None for pod in started)  # its pods are gone too


def test_start_poll_delete_without_waiting(tmp_path: Path, datasets: dict[str, str]) -> None:
    """What the Airflow operator and trigger use: start, poll the state, delete on kill."""
    inp = _input(str(tmp_path / "model"), datasets, config={"train.epochs": 200}, oss_secret=None, namespace="ml")
    with FakeCluster(tmp_path) as cluster:
        ref = remote_train.start_training(inp, cluster, echo=lambda _: None)
        assert ref.namespace == "ml" and not ref.legacy_pytorchjob and str(ref).startswith("TrainJob ml/")
        assert remote_train.job_state(ref.name, ref.namespace, cluster) == ("running", "")
        # a second start (a retried task) finds the running job
        assert remote_train.start_training(inp, cluster, echo=lambda _: None) == ref
        assert cluster.creates == 1
        pods = cluster.pods_of(ref.name)
        assert remote_train.delete_job(ref.name, ref.namespace, cluster) is True
        assert all(p.exit_code is not None for p in pods)  # the pods were stopped
        state, message = remote_train.job_state(ref.name, ref.namespace, cluster)
        assert state == "failed" and "no longer exists" in message
        assert remote_train.delete_job(ref.name, ref.namespace, cluster) is False


def test_prepare_job_writes_the_config_the_pods_load(tmp_path: Path, datasets: dict[str, str]) -> None:
    inp = _input(str(tmp_path / "model"), datasets, resume=False, resources={"cpu": "3"},
                 node_selector={"pool": "train"}, config={"compute.gpu_type": "nvidia-a10"})
    manifest = remote_train.prepare_job(inp, echo=lambda _: None)
    command = manifest["spec"]["trainer"]["command"]
    assert command[-1] == "--no-resume" and command[command.index("--val-dataset") + 1] == datasets["val"]
    loaded = load_config(command[command.index("--config") + 1])
    assert loaded.config_hash() == inp.config.config_hash()
    node = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert node["template"]["spec"]["template"]["spec"]["nodeSelector"] == {"accelerator": "nvidia-a10", "pool": "train"}
    assert manifest["spec"]["trainer"]["resourcesPerNode"]["requests"]["cpu"] == "3"
    k8s.validate_trainjob(manifest)
    # the same input renders the same job name; another config another
    assert remote_train.prepare_job(inp, echo=lambda _: None)["metadata"]["name"] == manifest["metadata"]["name"]
    other = inp.model_copy(update={"config": load_config({}, {**TINY, "output_dir": str(tmp_path / "model"), "train.epochs": 2})})
    assert remote_train.prepare_job(other, echo=lambda _: None)["metadata"]["name"] != manifest["metadata"]["name"]


def test_flat_resources_prefers_requests_and_keeps_gpu_limits() -> None:
    task = {"requests": {"cpu": "7", "memory": "48G"}, "limits": {"cpu": "8", "memory": "60G", "nvidia.com/gpu": "1"}}
    assert remote_train.flat_resources(task) == {"cpu": "7", "memory": "48G", "nvidia.com/gpu": "1"}
    assert remote_train.flat_resources(None) is None and remote_train.flat_resources({}) is None


def test_collect_output_names_the_missing_file(tmp_path: Path) -> None:
    cfg = load_config({}, {**TINY, "output_dir": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError, match="config.json does not exist; the job's pods must write to the same output_dir"):
        remote_train.collect_output(cfg)


def test_kube_clients_come_from_a_kubeconfig(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: t\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'}}]\n"
        "users: [{name: u, user: {token: abc}}]\n"
        "contexts: [{name: t, context: {cluster: c, user: u, namespace: ml}}]\n")
    custom, core = remote_train.kube_clients(str(kubeconfig), "t")
    assert type(custom).__name__ == "CustomObjectsApi" and type(core).__name__ == "CoreV1Api"
    assert custom.api_client.configuration.host == "https://127.0.0.1:6443"


def _kubeconfig(path: Path, server: str) -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }))
    return str(path)


def test_clients_are_built_per_kubeconfig_without_touching_the_process_default(tmp_path: Path) -> None:
    """Two deferred train tasks in one triggerer with different kubeconfigs each reach their own cluster."""
    kubernetes = pytest.importorskip("kubernetes")
    default_before = kubernetes.client.Configuration.get_default_copy().host
    a, _ = remote_train.kube_clients(_kubeconfig(tmp_path / "a.yaml", "https://cluster-a.example:6443"))
    b, core_b = remote_train.kube_clients(_kubeconfig(tmp_path / "b.yaml", "https://cluster-b.example:6443"))
    assert a.api_client.configuration.host == "https://cluster-a.example:6443"
    assert b.api_client.configuration.host == core_b.api_client.configuration.host == "https://cluster-b.example:6443"
    assert kubernetes.client.Configuration.get_default_copy().host == default_before
