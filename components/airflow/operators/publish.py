"""Step 5 as an operator: publish a model version under a destination."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowSkipException

from imlt.components.airflow.operators._base import ImltStepOperator
from imlt.trainer.step_models import PublishInput


class PublishModelOperator(ImltStepOperator):
    """Export and publish DEST/vN then DEST/latest (the publish step).

    Arguments (all templated): PublishInput's fields: model_dir, destination, metrics_dir,
    dataset_dir, min_recall_at_1, export_onnx, export_torchscript. When the step refuses (Recall@1
    below `min_recall_at_1`), the task ends skipped, with the step's reason in the log, rather
    than failed: a model not good enough is not an error.
    XCom: {"published", "version_dir", "version", "reason"}.
    """

    step = "publish"
    input_model = PublishInput

    def execute(self, context: Context) -> dict[str, Any]:
        result = super().execute(context)
        if not result["published"]:
            raise AirflowSkipException(f"not published: {result['reason']}")
        return result
