"""KFP component over the evaluate step; its inputs are EvaluateInput's fields."""

from imlt.components.kfp._factory import Io, step_component

evaluate = step_component(
    "evaluate",
    [
        Io("model", "dsl.Input[dsl.Model]", "A trained model (train) or a published version (import_model)."),
        Io("dataset", "dsl.Input[dsl.Dataset]", "Query/gallery images from read_data; every image queries all the others."),
        Io("metrics", "dsl.Output[dsl.Metrics]", "Recall@K, MAP@R, their 95% half-widths (<metric>_ci95_half_width, 0 when exact) and counts, shown in the run's metrics; metadata evaluation_method says exact or sampled; the folder holds metrics.json and the plot.", output=True),
        Io("recall_plot", "dsl.Output[dsl.HTML]", "Recall@K curve and the metric table.", output=True),
    ],
    summary="Leave-one-out retrieval on a dataset: cosine Recall@K and MAP@R with 95% intervals (exact, or sampled queries above a size).",
    step="evaluate",
    bound=("model_dir", "dataset_dir", "output_dir"),
    returns={"Output": "Recall@1, for gating the publish step with dsl.If."},
    return_annotation="float",
)
