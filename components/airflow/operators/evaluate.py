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
    :param eval_mode, exact_max_samples, sample_queries, target_half_width, sample_seed: how to
        evaluate (EvaluateInput's fields); None keeps the step's default
    """

    step = "evaluate"
    input_model = "EvaluateInput"
    template_fields: Sequence[str] = ("model_dir", "dataset_dir", "output_dir", "ks", "batch_size", "reader_threads", "eval_mode",
                                      "sample_queries")

    def __init__(
        self,
        *,
        model_dir: str,
        dataset_dir: str,
        output_dir: str,
        ks: list[int] | None = None,
        batch_size: int = 64,
        reader_threads: int = 2,
        eval_mode: str | None = None,
        exact_max_samples: int | None = None,
        sample_queries: int | None = None,
        target_half_width: float | None = None,
        sample_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.dataset_dir = dataset_dir
        self.output_dir = output_dir
        self.ks = ks
        self.batch_size = batch_size
        self.reader_threads = reader_threads
        self.eval_mode = eval_mode
        self.exact_max_samples = exact_max_samples
        self.sample_queries = sample_queries
        self.target_half_width = target_half_width
        self.sample_seed = sample_seed

    def step_fields(self) -> dict[str, Any]:
        fields = {
            "model_dir": self.model_dir,
            "dataset_dir": self.dataset_dir,
            "output_dir": self.output_dir,
            "ks": self.ks,
            "batch_size": self.batch_size,
            "reader_threads": self.reader_threads,
            "eval_mode": self.eval_mode,
            "exact_max_samples": self.exact_max_samples,
            "sample_queries": self.sample_queries,
            "target_half_width": self.target_half_width,
            "sample_seed": self.sample_seed,
        }
        # None means the step's default list of K (the model has a default factory, not None)
        return {k: v for k, v in fields.items() if v is not None}
