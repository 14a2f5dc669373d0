"""Import pretrained weights into the model store as an operator (the import_weights step)."""

from __future__ import annotations

from typing import Any

from imlt.components.airflow.operators._base import ImltStepOperator
from imlt.trainer.step_models import ImportWeightsInput


class ImportPretrainedWeightsOperator(ImltStepOperator):
    """Fetch pretrained weights once (Hugging Face cache, HF_ENDPOINT mirror); store safetensors + weights.json.

    Run it where the Hub is reachable; DAGs on workers without internet then train with
    `pretrained` set to the destination. Arguments (templated): ImportWeightsInput's fields, with
    `weights` for its `name` (an operator's `name` would read as the task's). XCom: the output fields.
    """

    step = "import_weights"
    input_model = ImportWeightsInput
    not_fields = ("name",)
    extra_fields = {"weights": None}

    def step_fields(self) -> dict[str, Any]:
        return {**super().step_fields(), "name": self.weights}
