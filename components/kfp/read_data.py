"""KFP component over the read_data step; its inputs are ReadDataInput's fields."""

from imlt.components.kfp._factory import Io, step_component

read_data = step_component(
    "read_data",
    [
        Io("dataset", "dsl.Output[dsl.Dataset]", "The dataset folder: manifest.jsonl (image URL, label ids, source file:line), classes.txt, summary.json.", output=True),
        Io("upstream_annotations", "Optional[dsl.Input[dsl.Artifact]]", "Annotation file produced by an upstream task; takes precedence over annotations.", default="None"),
    ],
    summary="Read an annotation file (ClsSourceImageList or ClsSourceItag) into a dataset folder.",
    step="read_data",
    bound=("output_dir", "upstream_annotations"),
)
