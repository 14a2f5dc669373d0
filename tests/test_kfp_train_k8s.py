"""The train_on_kubernetes component and the distributed training pipeline.

The component's body runs here against tests/support/fake_kube.FakeCluster (whose pods really train),
the way KFP's executor calls it: with artifact objects and the task_config the backend fills.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl

from imlt.components.kfp import train_on_kubernetes
from tests.support.fake_kube import FakeCluster
from tests.support.images import write_split
from imlt.trainer import remote_train, steps

PIPELINE_DIR = Path(__file__).resolve().parents[1] / "pipelines"


def test_component_trains_through_a_job_and_fills_the_model_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ann = write_split(tmp_path / "data", "train", per_class=4, size=32, absolute=True)
    ds = steps.read_data(steps.ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=str(ann))).dataset_dir
    cluster = FakeCluster(tmp_path)
    monkeypatch.setattr(remote_train, "kube_clients", lambda *a, **kw: (cluster, cluster))
    model = dsl.Model(uri=str(tmp_path / "artifacts" / "model"))
    curve = dsl.HTML(uri=str(tmp_path / "artifacts" / "curve.html"))
    task_config = dsl.TaskConfig(resources={"requests": {"cpu": "1"}, "limits": {"cpu": "2", "memory": "4Gi"}},
                                 node_selector={"pool": "training"})
    with cluster:
        train_on_kubernetes.python_func(
            train_dataset=dsl.Dataset(uri=ds), model=model, training_curve=curve,
            val_metrics=dsl.Metrics(uri=str(tmp_path / "artifacts" / "val_metrics")),
            output_dir=str(tmp_path / "job-output"), backbone="resnet18", image_size=32, feature_dim=16,
            epochs=1, batch_size=8, reader_threads=0, device="cpu", oss_secret="", namespace="ml",
            poll_seconds=0.2, task_config=task_config,
        )
        (job,) = cluster.jobs.values()

    # the task's resources and node selector sized the job's nodes
    trainer = job.obj["spec"]["trainer"]
    assert trainer["resourcesPerNode"]["requests"] == {"cpu": "1", "memory": "4Gi"}
    pod_spec = job.obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod_spec["template"]["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "training"}
    assert "env" not in trainer  # no Secret asked for

    # the model the job wrote was copied into the artifact, with its metadata and curve page
    folder = Path(model.path)
    assert (folder / "model.safetensors").is_file() and (folder / "history.json").is_file()
    saved = json.loads((folder / "config.json").read_text())
    assert model.metadata["config_hash"] == saved["config_hash"] and model.metadata["epochs_completed"] == 1
    assert model.metadata["backbone"] == "resnet18" and model.metadata["feature_dim"] == 16
    assert "<img" in Path(curve.path).read_text()


def test_component_refuses_to_run_without_an_output_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs output_dir"):
        train_on_kubernetes.python_func(
            train_dataset=dsl.Dataset(uri=str(tmp_path)), model=dsl.Model(uri=str(tmp_path / "m")),
            training_curve=dsl.HTML(uri=str(tmp_path / "c.html")), val_metrics=dsl.Metrics(uri=str(tmp_path / "v")),
            backbone="resnet18")


def test_component_offers_every_train_input() -> None:
    from imlt.components.kfp import train

    shared = set(train.component_spec.inputs) - {"output_dir"}
    mine = train_on_kubernetes.component_spec.inputs
    assert shared <= set(mine)
    for name in shared:
        assert mine[name].default == train.component_spec.inputs[name].default, name


def _committed(filename: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all((PIPELINE_DIR / filename).read_text())
    return spec, platform


def test_distributed_pipeline_submits_the_job_with_the_tasks_settings() -> None:
    spec, platform = _committed("training_pipeline_distributed.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    assert "train" not in tasks and "train-on-kubernetes" in tasks
    task = tasks["train-on-kubernetes"]
    assert task["inputs"]["parameters"]["oss_secret"]["componentInputParameter"] == "oss_secret_name"
    component = spec["components"][task["componentRef"]["name"]]
    assert {p["field"] for p in component["taskConfigPassthroughs"]} == {"RESOURCES", "KUBERNETES_NODE_SELECTOR"}
    # the task carries the node's size and selector; KFP passes them through to the job
    executor = spec["deploymentSpec"]["executors"][component["executorLabel"]]
    assert executor["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    k8s_exec = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][component["executorLabel"]]
    assert k8s_exec["nodeSelector"]["labels"] == {"node.kubernetes.io/instance-type": "ecs.gn5-c8g1.2xlarge"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["compute_mode"]["defaultValue"] == "distributed" and params["nnodes"]["defaultValue"] == 2
    # everything else is the training pipeline's interface
    base = _committed("training_pipeline_gpu.yaml")[0]["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(base)
