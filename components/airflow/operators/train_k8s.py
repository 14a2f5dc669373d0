"""Step 3 on Kubernetes: the training runs as a Kubeflow TrainJob, the worker slot is freed while it runs.

execute() writes the config for the pods, submits the job (or re-attaches to the one an earlier
try started: the name is deterministic) and defers to TrainJobTrigger, which polls the job from
the triggerer and tails node 0's log. execute_complete() shows the log's tail, then returns the
same XCom as TrainMetricModelOperator, read from the model folder the job wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from imlt.components.airflow.operators.train import TrainMetricModelOperator
from imlt.components.airflow.triggers.train_job import TrainJobTrigger


class KubernetesTrainMetricModelOperator(TrainMetricModelOperator):
    """Train as a Kubernetes job (trainer.remote_train), deferring while it runs.

    Takes TrainMetricModelOperator's arguments (the config's output_dir and the datasets must be
    URLs the job's pods can read and write: oss:// in practice) plus:

    :param image: image the pods run; empty: the project image of this package version (templated)
    :param namespace: namespace of the job; empty: the worker's own in a cluster, else "default" (templated)
    :param oss_secret: Kubernetes Secret with OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET (+ OSS_ENDPOINT, ...)
        that becomes the pods' environment; None for none (templated)
    :param legacy_pytorchjob: submit a Training Operator v1 PyTorchJob instead of a TrainJob
    :param resources: per-node resources, e.g. {"cpu": "8", "memory": "60Gi", "nvidia.com/gpu": "1"};
        default from the config's compute.instance_type (templated)
    :param node_selector: node labels every pod must match (templated)
    :param poll_seconds: seconds between status polls in the triggerer
    :param kube_config_file: kubeconfig file (default: the in-cluster service account, else ~/.kube/config)
    :param kube_context: kubeconfig context

    The worker (and the triggerer) need the `kubernetes` Python client and RBAC to create, get
    and delete trainjobs (or pytorchjobs), list pods and read pod logs in the namespace.
    """

    template_fields: Sequence[str] = (
        *TrainMetricModelOperator.template_fields, "image", "namespace", "oss_secret", "resources", "node_selector",
    )
    ui_color = "#d6ecf3"

    def __init__(
        self,
        *,
        image: str = "",
        namespace: str = "",
        oss_secret: str | None = "oss-credentials",
        legacy_pytorchjob: bool = False,
        resources: dict[str, str] | None = None,
        node_selector: dict[str, str] | None = None,
        poll_seconds: float = 30.0,
        kube_config_file: str | None = None,
        kube_context: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.namespace = namespace
        self.oss_secret = oss_secret
        self.legacy_pytorchjob = legacy_pytorchjob
        self.resources = resources
        self.node_selector = node_selector
        self.poll_seconds = poll_seconds
        self.kube_config_file = kube_config_file
        self.kube_context = kube_context
        self._job: tuple[str, str] | None = None  # (name, namespace) once submitted, for on_kill

    def remote_input(self) -> Any:
        """The RemoteTrainInput of this task; bad input fails the task without retries."""
        from pydantic import ValidationError

        from imlt.trainer.config import ConfigError
        from imlt.trainer.steps import RemoteTrainInput

        if self.hook is not None:  # the config is written to (and the model read from) OSS here too
            self.hook.configure_storage(required=self.oss_conn_id != self.hook.default_conn_name)
        try:
            return RemoteTrainInput(
                **self.step_fields(), image=self.image or "", namespace=self.namespace or "",
                oss_secret=self.oss_secret or None, legacy_pytorchjob=self.legacy_pytorchjob,
                resources=self.resources or None, node_selector=self.node_selector or None,
                poll_seconds=self.poll_seconds,
            )
        except (ConfigError, ValidationError) as e:
            raise AirflowFailException(f"{self.task_id}: {e}") from e

    def kube_clients(self) -> tuple[Any, Any]:
        from imlt.trainer import remote_train

        return remote_train.kube_clients(self.kube_config_file, self.kube_context)

    def execute(self, context: Context) -> Any:
        from imlt.trainer import remote_train

        inp = self.remote_input()
        api, _ = self.kube_clients()
        ref = remote_train.start_training(inp, api, echo=self.log.info)
        self._job = (ref.name, ref.namespace)
        self.defer(
            trigger=TrainJobTrigger(
                name=ref.name, namespace=ref.namespace, legacy_pytorchjob=ref.legacy_pytorchjob,
                poll_seconds=self.poll_seconds, kube_config_file=self.kube_config_file, kube_context=self.kube_context,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Back from the trigger: show node 0's log tail; fail with the job's message, or collect the model."""
        from imlt.trainer import remote_train

        what = f"{'PyTorchJob' if self.legacy_pytorchjob else 'TrainJob'} {event.get('namespace')}/{event.get('name')}"
        if event.get("log_tail"):
            self.log.info("last lines of node 0's log (%s):\n%s", what, event["log_tail"])
        if event.get("status") != "succeeded":
            # retryable: a retry replaces a failed job, and training resumes from its last checkpoint
            raise AirflowException(f"{what} {event.get('status')}: {event.get('message') or 'no message'}")
        inp = self.remote_input()
        out = remote_train.collect_output(inp.config)
        self.log.info("%s trained %d epoch(s) into %s", what, out.epochs_completed, out.model_dir)
        return out.model_dump(mode="json", exclude=set(self.xcom_exclude))

    def on_kill(self) -> None:
        """Killed before deferring (while submitting): delete the job. While deferred, the trigger's on_kill does."""
        if self._job is None:
            return
        from imlt.trainer import remote_train

        name, namespace = self._job
        api, _ = self.kube_clients()
        remote_train.delete_job(name, namespace, api, legacy=self.legacy_pytorchjob)
        self.log.info("deleted %s/%s", namespace, name)
