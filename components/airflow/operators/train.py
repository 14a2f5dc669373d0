"""Step 3 as an operator: train the metric model on the worker.

This operator trains in the worker process; KubernetesTrainMetricModelOperator
(operators/train_k8s.py) runs the training as a Kubeflow TrainJob instead, deferring while it runs.
"""

from __future__ import annotations

from typing import Any

from imlt.components.airflow.operators._base import ImltStepOperator
from imlt.trainer.step_models import TrainInput


class TrainMetricModelOperator(ImltStepOperator):
    """Train an embedding model (the train step) from a RunConfig.

    Arguments (all templated): TrainInput's fields, where `config` is a RunConfig as a dict or
    the URL of a YAML/JSON config file, plus `overrides`: {field path: value} applied on top,
    e.g. {"train.epochs": 3} (None values are ignored, so unset DAG params never override the
    config). Any RunConfig field is settable either way.
    XCom: {"model_dir", "config_hash", "epochs_completed", "stopped_early", "final_loss",
    "instance_minutes"}; the per-epoch history stays in the model folder.
    """

    step = "train"
    input_model = TrainInput
    extra_fields = {"overrides": None}
    xcom_exclude = frozenset({"history"})

    def step_fields(self) -> dict[str, Any]:
        from imlt.trainer.config import load_config

        return {**super().step_fields(), "config": load_config(self.config, self.overrides)}
