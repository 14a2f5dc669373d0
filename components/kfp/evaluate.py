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
    eval_mode: str = "auto",
    exact_max_samples: int = 100000,
    sample_queries: int = 0,
    target_half_width: float = 0.005,
    sample_seed: int = 0,
) -> float:
    """Leave-one-out retrieval on a dataset: cosine Recall@K and MAP@R with 95% intervals.

    Args:
        model: A trained model (train) or a published version (import_model).
        dataset: Query/gallery images from read_data; every image queries all the others.
        ks: The K values of Recall@K.
        batch_size: Images per embedding batch.
        reader_threads: DataLoader worker processes.
        eval_mode: auto (exact up to exact_max_samples images, else sampled queries), exact or sampled.
        exact_max_samples: Largest set evaluated exactly in auto mode.
        sample_queries: Fixed number of sampled queries; 0 sizes the sample for target_half_width.
        target_half_width: Recall@1 95% interval half-width the sample is sized for.
        sample_seed: Seed of the query sample.

    Returns:
        metrics: Recall@K, MAP@R, their 95% half-widths (<metric>_ci95_half_width, 0 when exact) and counts;
            metadata "evaluation_method" says exact or sampled; the folder holds metrics.json and the plot.
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
        eval_mode=eval_mode,
        exact_max_samples=exact_max_samples,
        sample_queries=sample_queries or None,
        target_half_width=target_half_width,
        sample_seed=sample_seed,
    ))
    for name, value in out.metrics.items():
        metrics.log_metric(name, value)
    metrics.metadata["evaluation_method"] = out.evaluation.get("method", "exact")
    _artifacts.write_text(recall_plot.path, _artifacts.html_page(
        "Retrieval on " + dataset.metadata.get("split", "the dataset"), _artifacts.png_urls(out.metrics_dir), [out.metrics]))
    return out.metrics["recall_at_1"]
