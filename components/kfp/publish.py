"""KFP component over the publish step; its inputs are PublishInput's fields."""

from imlt.components.kfp._factory import Io, step_component

publish = step_component(
    "publish",
    [
        Io("model", "dsl.Input[dsl.Model]", "The trained model from train."),
        Io("published_model", "dsl.Output[dsl.Model]", "A copy of the published version folder; its metadata holds the version, its URL and the metrics.", output=True),
        Io("metrics", "Optional[dsl.Input[dsl.Metrics]]", "Evaluation of the model (evaluate); its Recall@1 is checked against min_recall_at_1 and goes into the model card.", default="None"),
        Io("dataset", "Optional[dsl.Input[dsl.Dataset]]", "The train dataset, summarised in the model card.", default="None"),
    ],
    summary="Publish a trained model as DESTINATION/vN (weights, TorchScript, ONNX, model card), then move `latest`.",
    step="publish",
    bound=("model_dir", "metrics_dir", "dataset_dir"),
)
