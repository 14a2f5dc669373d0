"""Step 2 as an operator: check a dataset folder before any training time is spent."""

from __future__ import annotations

from imlt.components.airflow.operators._base import ImltStepOperator
from imlt.trainer.step_models import ValidateInput


class ValidateAnnotationsOperator(ImltStepOperator):
    """Decode every image and check labels (the validate step).

    Arguments (all templated): ValidateInput's fields: dataset_dir (an XComArg of
    ReadOssDataOperator works), output_dir, min_images_per_class, imbalance_ratio, workers,
    max_image_pixels. Fatal problems fail the task (no retries) with file:line of the first
    problems in the log. XCom: {"validation_dir", "ok", "num_errors", "num_warnings", "report_html"}.
    """

    step = "validate"
    input_model = ValidateInput
