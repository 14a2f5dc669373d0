"""One Airflow operator per pipeline step; each is a thin adapter over trainer.steps."""

from components.airflow.operators.evaluate import EvaluateRecallOperator
from components.airflow.operators.publish import PublishModelOperator
from components.airflow.operators.read_data import ReadOssDataOperator
from components.airflow.operators.train import TrainMetricModelOperator
from components.airflow.operators.train_k8s import KubernetesTrainMetricModelOperator
from components.airflow.operators.validate import ValidateAnnotationsOperator

__all__ = [
    "EvaluateRecallOperator",
    "KubernetesTrainMetricModelOperator",
    "PublishModelOperator",
    "ReadOssDataOperator",
    "TrainMetricModelOperator",
    "ValidateAnnotationsOperator",
]
