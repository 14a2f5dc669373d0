"""Step 5 as an operator: publish a model version under a destination."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowSkipException

from imlt.components.airflow.operators._base import ImltStepOperator


class PublishModelOperator(ImltStepOperator):
    """Export and publish DEST/vN then DEST/latest (trainer.steps.publish).

    When the step refuses (Recall@1 below `min_recall_at_1`), the task ends skipped, with the
    step's reason in the log, rather than failed: a model not good enough is not an error.
    XCom: {"published", "version_dir", "version", "reason"}.

    :param model_dir: train output folder (templated; an XComArg works)
    :param destination: folder (local or oss://) holding v1/, v2/, ... and `latest` (templated)
    :param metrics_dir: evaluate output folder; its Recall@1 is checked against the gate
    :param dataset_dir: train dataset folder, for the data summary in the model card
    :param min_recall_at_1: refuse to publish below this Recall@1
    """

    step = "publish"
    input_model = "PublishInput"
    template_fields: Sequence[str] = (
        "model_dir",
        "destination",
        "metrics_dir",
        "dataset_dir",
        "min_recall_at_1",
        "export_onnx",
        "export_torchscript",
    )

    def __init__(
        self,
        *,
        model_dir: str,
        destination: str,
        metrics_dir: str | None = None,
        dataset_dir: str | None = None,
        min_recall_at_1: float = 0.0,
        export_onnx: bool = True,
        export_torchscript: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.destination = destination
        self.metrics_dir = metrics_dir
        self.dataset_dir = dataset_dir
        self.min_recall_at_1 = min_recall_at_1
        self.export_onnx = export_onnx
        self.export_torchscript = export_torchscript

    def step_fields(self) -> dict[str, Any]:
        return {
            "model_dir": self.model_dir,
            "destination": self.destination,
            "metrics_dir": self.metrics_dir,
            "dataset_dir": self.dataset_dir,
            "min_recall_at_1": self.min_recall_at_1,
            "export_onnx": self.export_onnx,
            "export_torchscript": self.export_torchscript,
        }

    def execute(self, context: Context) -> dict[str, Any]:
        result = super().execute(context)
        if not result["published"]:
            raise AirflowSkipException(f"not published: {result['reason']}")
        return result
