"""KFP component over trainer.steps.publish."""

from typing import Optional

from kfp import dsl

from imlt.components.kfp._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def publish(
    model: dsl.Input[dsl.Model],
    published_model: dsl.Output[dsl.Model],
    destination: str,
    metrics: Optional[dsl.Input[dsl.Metrics]] = None,
    dataset: Optional[dsl.Input[dsl.Dataset]] = None,
    min_recall_at_1: float = 0.0,
    export_onnx: bool = True,
    export_torchscript: bool = True,
):
    """Publish a trained model as DESTINATION/vN (weights, TorchScript, ONNX, model card), then move `latest`.

    Args:
        model: The trained model from train.
        destination: Local or oss:// folder that holds v1/, v2/, ... and the `latest` pointer.
        metrics: Evaluation of the model (evaluate); its Recall@1 is checked against min_recall_at_1 and goes into the model card.
        dataset: The train dataset, summarised in the model card.
        min_recall_at_1: Refuse to publish (the task fails) below this Recall@1.
        export_onnx: Also export ONNX (dynamic batch).
        export_torchscript: Also export TorchScript.

    Returns:
        published_model: A copy of the published version folder; its metadata holds the version, its URL and the metrics.
    """
    from imlt.trainer import steps, storage

    out = steps.publish(steps.PublishInput(
        model_dir=model.path,
        metrics_dir=metrics.path if metrics is not None else None,
        dataset_dir=dataset.path if dataset is not None else None,
        destination=destination,
        min_recall_at_1=min_recall_at_1,
        export_onnx=export_onnx,
        export_torchscript=export_torchscript,
    ))
    # A refusal is a result for the CLI (exit code) but a failed task here: the artifact
    # would otherwise claim a model that was not published.
    if not out.published:
        raise RuntimeError(f"not published: {out.reason}")
    storage.download_dir(out.version_dir, published_model.path)
    published_model.metadata.update({**model.metadata, **(metrics.metadata if metrics is not None else {}),
                                     "version": out.version, "uri": out.version_dir})
