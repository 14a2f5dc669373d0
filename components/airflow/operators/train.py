"""Step 3 as an operator: train the metric model on the worker.

This operator trains in the worker process; KubernetesTrainMetricModelOperator
(operators/train_k8s.py) runs the training as a Kubeflow TrainJob instead, deferring while it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imlt.components.airflow.operators._base import ImltStepOperator


class TrainMetricModelOperator(ImltStepOperator):
    """Train an embedding model (trainer.steps.train) from a RunConfig.

    XCom: {"model_dir", "config_hash", "epochs_completed", "stopped_early", "final_loss",
    "instance_minutes"}; the per-epoch history stays in the model folder.

    :param config: a RunConfig as a dict, or the URL of a YAML/JSON config file (templated)
    :param overrides: dotted-name overrides applied on top, e.g. {"train.epochs": 3} (templated;
        None values are ignored, so unset DAG params never override the config)
    :param train_dataset: dataset_dir of the train split (templated; an XComArg works)
    :param val_dataset: dataset_dir of the val split, optional
    :param resume: continue from the last checkpoint in the output folder (a retried task resumes)
    """

    step = "train"
    input_model = "TrainInput"
    xcom_exclude = frozenset({"history"})
    template_fields: Sequence[str] = ("config", "overrides", "train_dataset", "val_dataset", "resume")

    def __init__(
        self,
        *,
        config: dict[str, Any] | str,
        overrides: dict[str, Any] | None = None,
        train_dataset: str | None = None,
        val_dataset: str | None = None,
        resume: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.overrides = overrides
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.resume = resume

    def step_fields(self) -> dict[str, Any]:
        from imlt.trainer.config import load_config

        return {
            "config": load_config(self.config, self.overrides),
            "train_dataset": self.train_dataset,
            "val_dataset": self.val_dataset,
            "resume": self.resume,
        }
