"""The pipeline steps as a typed registry: each step is a contract (input model -> output model)
and the function that fulfils it.

Steps exchange only URLs of folders, so each can run in its own process, pod or task. The
CLI, the KFP components and the Airflow operators look steps up here (`STEPS[name]`, or the
module attributes below) and never import an implementation module themselves. The contracts
live in trainer.step_models; the implementations are imported when a step runs, so importing
this registry stays cheap (no torch) and the implementations can import their contracts
without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from imlt.trainer.step_models import (
    EvaluateInput,
    EvaluateOutput,
    ImportModelInput,
    ImportModelOutput,
    ImportWeightsInput,
    ImportWeightsOutput,
    PublishInput,
    PublishOutput,
    ReadDataInput,
    ReadDataOutput,
    RemoteTrainInput,
    StepModel,
    TrainInput,
    TrainOutput,
    ValidateInput,
    ValidateOutput,
)

__all__ = [
    "STEPS", "Step", "register", "read_data", "validate", "train", "train_remote", "evaluate", "publish",
    "import_model", "import_weights", "StepModel", "ReadDataInput", "ReadDataOutput", "ValidateInput", "ValidateOutput",
    "TrainInput", "TrainOutput", "RemoteTrainInput", "EvaluateInput", "EvaluateOutput", "PublishInput",
    "PublishOutput", "ImportModelInput", "ImportModelOutput", "ImportWeightsInput", "ImportWeightsOutput",
]

In = TypeVar("In", bound=StepModel)
Out = TypeVar("Out", bound=StepModel)


@dataclass(frozen=True)
class Step(Generic[In, Out]):
    """One step: its registry name, its contract and the function that runs it."""

    name: str
    input_model: type[In]
    output_model: type[Out]
    run: Callable[[In], Out]

    def __call__(self, inp: In) -> Out:
        return self.run(inp)

    @property
    def summary(self) -> str:
        """The first line of the function's docstring: the help text adapters show."""
        return (self.run.__doc__ or self.name).strip().splitlines()[0]


STEPS: dict[str, Step[Any, Any]] = {}


def register(step: Step[In, Out]) -> Step[In, Out]:
    """Add a step to the registry; a second step under the same name is a programming error."""
    if step.name in STEPS:
        raise ValueError(f"step {step.name!r} is already registered")
    STEPS[step.name] = step
    return step


def _read_data(inp: ReadDataInput) -> ReadDataOutput:
    """Parse an annotation file into a dataset folder: manifest.jsonl, classes.txt, summary.json."""
    from imlt.trainer.data.reader import build_dataset

    return build_dataset(inp)


def _validate(inp: ValidateInput) -> ValidateOutput:
    """Decode every image and check labels; raises DataError (file:line) on fatal problems."""
    from imlt.trainer.data.validation import validate_dataset

    return validate_dataset(inp)


def _train(inp: TrainInput) -> TrainOutput:
    """Train a metric model on a read-data dataset folder in this process (or its torchrun group)."""
    from imlt.trainer.engine import run_training

    return run_training(inp)


def _train_remote(inp: RemoteTrainInput) -> TrainOutput:
    """Train as a Kubernetes job and wait for it; the same TrainOutput as `train`."""
    from imlt.trainer.remote_train import submit_training

    return submit_training(inp)


def _evaluate(inp: EvaluateInput) -> EvaluateOutput:
    """Leave-one-out cosine Recall@K and MAP@R of a model on a dataset."""
    from imlt.trainer.evaluate import evaluate_model

    return evaluate_model(inp)


def _publish(inp: PublishInput) -> PublishOutput:
    """Export weights, TorchScript and ONNX; publish DEST/vN, then move `latest`."""
    from imlt.trainer.publish import publish_model

    return publish_model(inp)


def _import_model(inp: ImportModelInput) -> ImportModelOutput:
    """Copy an existing model folder (e.g. a published version) to where a pipeline expects it."""
    from imlt.trainer import storage

    storage.download_dir(inp.model_url, inp.output_dir)
    return ImportModelOutput(model_dir=inp.output_dir)


def _import_weights(inp: ImportWeightsInput) -> ImportWeightsOutput:
    """Fetch pretrained weights once through timm/huggingface_hub and store them for `pretrained: oss://...`."""
    from imlt.trainer.weights import import_weights as run

    return run(inp)


read_data = register(Step("read_data", ReadDataInput, ReadDataOutput, _read_data))
validate = register(Step("validate", ValidateInput, ValidateOutput, _validate))
train = register(Step("train", TrainInput, TrainOutput, _train))
train_remote = register(Step("train_remote", RemoteTrainInput, TrainOutput, _train_remote))
evaluate = register(Step("evaluate", EvaluateInput, EvaluateOutput, _evaluate))
publish = register(Step("publish", PublishInput, PublishOutput, _publish))
import_weights = register(Step("import_weights", ImportWeightsInput, ImportWeightsOutput, _import_weights))
import_model = register(Step("import_model", ImportModelInput, ImportModelOutput, _import_model))
