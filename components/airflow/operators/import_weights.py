"""Import pretrained weights into the model store as an operator (trainer.steps.import_weights)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imlt.components.airflow.operators._base import ImltStepOperator


class ImportPretrainedWeightsOperator(ImltStepOperator):
    """Fetch pretrained weights once (Hugging Face cache, HF_ENDPOINT mirror) and store safetensors + weights.json.

    Run it where the Hub is reachable; DAGs on workers without internet then train with
    `pretrained` set to the destination. XCom: {"pretrained", "weights_url", "note_url", "tag",
    "repo", "revision", "sha256", "num_tensors", "reused"}.

    :param weights: a timm tag (resnet50.a1_in1k), a backbone name for its default tag (resnet_50), or hf-hub:org/repo (templated)
    :param destination: folder (local or oss://) for model.safetensors and weights.json (templated)
    :param backbone: backbone the weights must fit; None: derived from `weights`
    """

    step = "import_weights"
    input_model = "ImportWeightsInput"
    template_fields: Sequence[str] = ("weights", "destination", "backbone")

    def __init__(self, *, weights: str, destination: str, backbone: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weights = weights
        self.destination = destination
        self.backbone = backbone

    def step_fields(self) -> dict[str, Any]:
        return {"name": self.weights, "destination": self.destination, "backbone": self.backbone or None}
