"""KFP component over trainer.steps.evaluate."""

from typing import List

from kfp import dsl

from imlt.components.kfp._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    model: dsl.Input[dsl.Model],
    dataset: dsl.Input[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    recall_plot: dsl.Output[dsl.HTML],
    ks: List[int] = [1, 2, 4, 8],
    batch_size: int = 64,
    reader_threads: int = 2,
) -> float:
    """Leave-one-out retrieval on a dataset: cosine Recall@K and MAP@R (exact search).

    Args:
        model: A trained model (train) or a published version (import_model).
        dataset: Query/gallery images from read_data; every image queries all the others.
        ks: The K values of Recall@K.
        batch_size: Images per embedding batch.
        reader_threads: DataLoader worker processes.

    Returns:
        metrics: Recall@K, MAP@R and counts, shown in the run's metrics; the folder holds metrics.json and the plot.
        recall_plot: Recall@K curve and the metric table.
        Output: Recall@1, for gating the publish step with dsl.If.
    """
    from imlt.components.kfp import _artifacts
    from imlt.trainer import steps

    out = steps.evaluate(steps.EvaluateInput(
        model_dir=model.path,
        dataset_dir=dataset.path,
        output_dir=metrics.path,
        ks=ks,
        batch_size=batch_size,
        reader_threads=reader_threads,
    ))
    for name, value in out.metrics.items():
        metrics.log_metric(name, value)
    _artifacts.write_text(recall_plot.path, _artifacts.html_page(
        "Retrieval on " + dataset.metadata.get("split", "the dataset"), _artifacts.png_urls(out.metrics_dir), [out.metrics]))
    return out.metrics["recall_at_1"]
