"""One Airflow operator per pipeline step; each is a thin adapter over trainer.steps."""

from imlt.components.airflow.operators.evaluate import EvaluateRecallOperator
from imlt.components.airflow.operators.import_weights import ImportPretrainedWeightsOperator
from imlt.components.airflow.operators.publish import PublishModelOperator
from imlt.components.airflow.operators.read_data import ReadOssDataOperator
from imlt.components.airflow.operators.train import TrainMetricModelOperator
from imlt.components.airflow.operators.train_k8s import KubernetesTrainMetricModelOperator
from imlt.components.airflow.operators.validate import ValidateAnnotationsOperator

__all__ = [
    "EvaluateRecallOperator",
    "ImportPretrainedWeightsOperator",
    "KubernetesTrainMetricModelOperator",
    "PublishModelOperator",
    "ReadOssDataOperator",
    "TrainMetricModelOperator",
    "ValidateAnnotationsOperator",
]
