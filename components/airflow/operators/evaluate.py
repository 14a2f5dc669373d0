"""Step 4 as an operator: retrieval metrics of a trained (or published) model."""

from __future__ import annotations

from imlt.components.airflow.operators._base import ImltStepOperator
from imlt.trainer.step_models import EvaluateInput


class EvaluateRecallOperator(ImltStepOperator):
    """Embed a dataset and measure Recall@K and MAP@R (the evaluate step).

    Arguments (all templated): EvaluateInput's fields: model_dir, dataset_dir, output_dir, ks,
    batch_size, reader_threads, eval_mode, exact_max_samples, sample_queries, target_half_width,
    sample_seed, search_backend. XCom: {"metrics_dir", "metrics": {...}}, as in metrics.json.
    """

    step = "evaluate"
    input_model = EvaluateInput
