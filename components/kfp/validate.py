"""KFP component over the validate step; its inputs are ValidateInput's fields."""

from imlt.components.kfp._factory import Io, kfp_input, step_component
from imlt.trainer.step_models import ValidateInput, model_parameters

validate = step_component(
    "validate",
    [
        Io("dataset", "dsl.Input[dsl.Dataset]", "A dataset from read_data."),
        Io("validation", "dsl.Output[dsl.Artifact]", "Folder with validation.json (every finding with its file:line) and report.html.", output=True),
        Io("report", "dsl.Output[dsl.HTML]", "The human-readable validation report.", output=True),
        *[kfp_input(p) for p in model_parameters(ValidateInput, ("dataset_dir", "output_dir"))],
    ],
    summary="Decode every image and check the labels; fails naming file:line of the first fatal problems.",
    run="validate",
    module=__name__,
)
