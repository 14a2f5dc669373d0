"""KFP component over trainer.steps.validate."""

from kfp import dsl

from imlt.components.kfp._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(
    dataset: dsl.Input[dsl.Dataset],
    validation: dsl.Output[dsl.Artifact],
    report: dsl.Output[dsl.HTML],
    min_images_per_class: int = 2,
    imbalance_ratio: float = 10.0,
    workers: int = 4,
    max_image_pixels: int = 50_000_000,
):
    """Decode every image and check the labels; fails naming file:line of the first fatal problems.

    Args:
        dataset: A dataset from read_data.
        min_images_per_class: A class with fewer images is a fatal error (retrieval needs pairs).
        imbalance_ratio: Warn when the largest class has this many times the images of the smallest.
        workers: Threads that decode images.
        max_image_pixels: Refuse images with more pixels than this (decompression bombs).

    Returns:
        validation: Folder with validation.json (every finding with its file:line) and report.html.
        report: The human-readable validation report.
    """
    from imlt.components.kfp import _artifacts
    from imlt.trainer import steps

    out = steps.validate(steps.ValidateInput(
        dataset_dir=dataset.path,
        output_dir=validation.path,
        min_images_per_class=min_images_per_class,
        imbalance_ratio=imbalance_ratio,
        workers=workers,
        max_image_pixels=max_image_pixels,
    ))
    _artifacts.copy_file(out.report_html, report.path)
    validation.metadata.update({"ok": out.ok, "num_errors": out.num_errors, "num_warnings": out.num_warnings})
