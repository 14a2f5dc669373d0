"""KubernetesTrainMetricModelOperator and TrainJobTrigger against tests/support/fake_kube.FakeCluster.

The operator's execute -> defer -> trigger -> execute_complete path is driven by hand (what the
task runner and the triggerer do), with the fake cluster's pods really training.
"""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("airflow.sdk")

from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred  # noqa: E402

from imlt.components.airflow.operators import KubernetesTrainMetricModelOperator  # noqa: E402
from imlt.components.airflow.triggers import TrainJobTrigger  # noqa: E402
from tests.support.fake_kube import FakeCluster  # noqa: E402
from tests.support.images import write_split  # noqa: E402
from imlt.trainer import remote_train, steps  # noqa: E402

TINY_CONFIG = {
    "model": {"backbone": "resnet18", "feature_dim": 16},
    "data": {"image_size": 32, "reader_threads": 0},
    "train": {"epochs": 1, "batch_size": 8, "device": "cpu"},
}


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    ann = write_split(tmp_path / "data", "train", per_class=4, size=32, absolute=True)
    return steps.read_data(steps.ReadDataInput(output_dir=str(tmp_path / "ds"), annotations=str(ann))).dataset_dir


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    with FakeCluster(tmp_path, secrets={}) as fake:
        monkeypatch.setattr(remote_train, "kube_clients", lambda *a, **kw: (fake, fake))
        yield fake


def _operator(tmp_path: Path, dataset: str, **kw: Any) -> KubernetesTrainMetricModelOperator:
    config = {**TINY_CONFIG, "output_dir": str(tmp_path / "model")}
    kw.setdefault("oss_secret", None)
    return KubernetesTrainMetricModelOperator(
        task_id="train", config=config, overrides=kw.pop("overrides", None), train_dataset=dataset,
        oss_conn_id=None, namespace="ml", poll_seconds=0.2, **kw)


def _defer(op: KubernetesTrainMetricModelOperator) -> TrainJobTrigger:
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({})
    assert deferred.value.method_name == "execute_complete"
    trigger = deferred.value.trigger
    # the triggerer rebuilds the trigger from its serialized form
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


def _first_event(trigger: TrainJobTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(first(), timeout=600))


def test_operator_defers_the_trigger_waits_and_a_retry_reattaches(tmp_path: Path, dataset: str, cluster: FakeCluster) -> None:
    op = _operator(tmp_path, dataset)
    trigger = _defer(op)
    assert cluster.creates == 1
    (job,) = cluster.jobs.values()
    assert trigger.name == job.obj["metadata"]["name"] and trigger.namespace == "ml"

    event = _first_event(trigger)
    assert event["status"] == "succeeded" and event["name"] == trigger.name
    assert "config_hash" in event["log_tail"]  # node 0's output travelled with the event

    # a retried try (a fresh operator) finds the same job instead of starting another
    retried = _defer(_operator(tmp_path, dataset))
    assert retried.name == trigger.name and cluster.creates == 1

    xcom = op.execute_complete({}, event)
    assert set(xcom) == {"model_dir", "config_hash", "epochs_completed", "stopped_early", "final_loss", "instance_minutes"}
    assert xcom["model_dir"] == str(tmp_path / "model") and xcom["epochs_completed"] == 1
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_failed_job_fails_the_task_with_the_jobs_message(tmp_path: Path, dataset: str, cluster: FakeCluster) -> None:
    op = _operator(tmp_path, dataset, oss_secret="oss-credentials")  # the Secret does not exist
    event = _first_event(_defer(op))
    assert event["status"] == "failed"
    with pytest.raises(AirflowException, match="TrainJob ml/imlt-.* failed: TrainJobFailed: CreateContainerConfigError: secret 'oss-credentials'"):
        op.execute_complete({}, event)


def test_bad_config_fails_without_retry_and_submits_nothing(tmp_path: Path, dataset: str, cluster: FakeCluster) -> None:
    op = _operator(tmp_path, dataset, overrides={"loss.name": "NoSuchLoss"})
    with pytest.raises(AirflowFailException, match="loss.name"):
        op.execute({})
    assert cluster.creates == 0


def test_killing_the_task_deletes_the_job(tmp_path: Path, dataset: str, cluster: FakeCluster) -> None:
    # while deferred: the trigger's on_kill
    op = _operator(tmp_path, dataset, overrides={"train.epochs": 200})
    trigger = _defer(op)
    pods = cluster.pods_of(trigger.name)
    asyncio.run(trigger.on_kill())
    assert not cluster.jobs and all(p.exit_code is not None for p in pods)
    # before deferring (the operator still knows its job): the operator's on_kill
    op2 = _operator(tmp_path, dataset, overrides={"train.epochs": 201})
    _defer(op2)
    assert len(cluster.jobs) == 1
    op2.on_kill()
    assert not cluster.jobs and cluster.deletes == 2
