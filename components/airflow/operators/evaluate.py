"""Step 4 as an operator: retrieval metrics of a trained (or published) model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imlt.components.airflow.operators._base import ImltStepOperator


class EvaluateRecallOperator(ImltStepOperator):
    """Embed a dataset and measure Recall@K and MAP@R (trainer.steps.evaluate).

    XCom: {"metrics_dir", "metrics": {...}}, the metrics as in metrics.json.

    :param model_dir: a train output folder or a published version folder (templated)
    :param dataset_dir: dataset_dir of the split to evaluate on (templated; an XComArg works)
    :param output_dir: folder for metrics.json and the plot (templated)
    """

    step = "evaluate"
    input_model = "EvaluateInput"
    template_fields: Sequence[str] = ("model_dir", "dataset_dir", "output_dir", "ks", "batch_size", "reader_threads")

    def __init__(
        self,
        *,
        model_dir: str,
        dataset_dir: str,
        output_dir: str,
        ks: list[int] | None = None,
        batch_size: int = 64,
        reader_threads: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.dataset_dir = dataset_dir
        self.output_dir = output_dir
        self.ks = ks
        self.batch_size = batch_size
        self.reader_threads = reader_threads

    def step_fields(self) -> dict[str, Any]:
        fields = {
            "model_dir": self.model_dir,
            "dataset_dir": self.dataset_dir,
            "output_dir": self.output_dir,
            "ks": self.ks,
            "batch_size": self.batch_size,
            "reader_threads": self.reader_threads,
        }
        # None means the step's default list of K (the model has a default factory, not None)
        return {k: v for k, v in fields.items() if v is not None}
