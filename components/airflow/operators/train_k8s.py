"""Step 3 on Kubernetes: the training runs as a Kubeflow TrainJob, the worker slot is freed while it runs.

execute() writes the config for the pods, submits the job (or re-attaches to the one an earlier
try started: the name is deterministic) and defers to TrainJobTrigger, which polls the job from
the triggerer and tails node 0's log. execute_complete() shows the log's tail, then returns the
same XCom as TrainMetricModelOperator, read from the model folder the job wrote.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException

from imlt.components.airflow.operators.train import TrainMetricModelOperator
from imlt.components.airflow.triggers.train_job import TrainJobTrigger
from imlt.trainer.step_models import RemoteTrainInput


class KubernetesTrainMetricModelOperator(TrainMetricModelOperator):
    """Train as a Kubernetes job (trainer.remote_train), deferring while it runs.

    Arguments (all templated): RemoteTrainInput's fields (TrainMetricModelOperator's, whose
    config's output_dir and datasets must be URLs the job's pods can read and write: oss:// in
    practice, plus the job's: image, namespace, oss_secret, legacy_pytorchjob, runtime,
    resources, node_selector, poll_seconds, timeout_seconds, config_url, name_prefix), and:

    :param kube_config_file: kubeconfig file (default: the in-cluster service account, else ~/.kube/config)
    :param kube_context: kubeconfig context

    The worker (and the triggerer) need the `kubernetes` Python client and RBAC to create, get
    and delete trainjobs (or pytorchjobs), list pods and read pod logs in the namespace.
    """

    step = "train_remote"
    input_model = RemoteTrainInput
    extra_fields = {"overrides": None}
    ui_color = "#d6ecf3"

    def __init__(self, *, kube_config_file: str | None = None, kube_context: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kube_config_file = kube_config_file
        self.kube_context = kube_context
        self._job: tuple[str, str] | None = None  # (name, namespace) once submitted, for on_kill

    def remote_input(self) -> Any:
        """The RemoteTrainInput of this task; bad input fails the task without retries."""
        self.configure_storage()  # the config is written to (and the model read from) OSS here too
        return self.step_input()

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
