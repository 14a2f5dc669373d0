"""KFP component over the validate step; its inputs are ValidateInput's fields."""

from imlt.components.kfp._factory import Io, step_component

validate = step_component(
    "validate",
    [
        Io("dataset", "dsl.Input[dsl.Dataset]", "A dataset from read_data."),
        Io("validation", "dsl.Output[dsl.Artifact]", "Folder with validation.json (every finding with its file:line) and report.html.", output=True),
        Io("report", "dsl.Output[dsl.HTML]", "The human-readable validation report.", output=True),
    ],
    summary="Decode every image and check the labels; fails naming file:line of the first fatal problems.",
    step="validate",
    bound=("dataset_dir", "output_dir"),
)
