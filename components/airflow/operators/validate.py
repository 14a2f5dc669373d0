"""Step 2 as an operator: check a dataset folder before any training time is spent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imlt.components.airflow.operators._base import ImltStepOperator


class ValidateAnnotationsOperator(ImltStepOperator):
    """Decode every image and check labels (trainer.steps.validate).

    Fatal problems fail the task (no retries) with file:line of the first problems in the log.
    XCom: {"validation_dir", "ok", "num_errors", "num_warnings", "report_html"}.

    :param dataset_dir: output of ReadOssDataOperator (templated; an XComArg works)
    :param output_dir: folder for validation.json and the report (templated)
    """

    step = "validate"
    input_model = "ValidateInput"
    template_fields: Sequence[str] = (
        "dataset_dir",
        "output_dir",
        "min_images_per_class",
        "imbalance_ratio",
        "workers",
        "max_image_pixels",
    )

    def __init__(
        self,
        *,
        dataset_dir: str,
        output_dir: str,
        min_images_per_class: int = 2,
        imbalance_ratio: float = 10.0,
        workers: int = 4,
        max_image_pixels: int = 50_000_000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dataset_dir = dataset_dir
        self.output_dir = output_dir
        self.min_images_per_class = min_images_per_class
        self.imbalance_ratio = imbalance_ratio
        self.workers = workers
        self.max_image_pixels = max_image_pixels

    def step_fields(self) -> dict[str, Any]:
        return {
            "dataset_dir": self.dataset_dir,
            "output_dir": self.output_dir,
            "min_images_per_class": self.min_images_per_class,
            "imbalance_ratio": self.imbalance_ratio,
            "workers": self.workers,
            "max_image_pixels": self.max_image_pixels,
        }
