"""KFP component over trainer.steps.read_data."""

from typing import Optional

from kfp import dsl

from imlt.components.kfp._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def read_data(
    dataset: dsl.Output[dsl.Dataset],
    annotations: Optional[str] = None,
    upstream_annotations: Optional[dsl.Input[dsl.Artifact]] = None,
    data_format: str = "ClsSourceImageList",
    data_root: Optional[str] = None,
    delimiter: str = " ",
    class_names: Optional[str] = None,
    cache_images: bool = False,
    multi_label: bool = False,
    split: str = "train",
):
    """Read an annotation file (ClsSourceImageList or ClsSourceItag) into a dataset folder.

    Args:
        annotations: Annotation file, local path or oss://bucket/key. Ignored when upstream_annotations is connected.
        upstream_annotations: Annotation file produced by an upstream task; takes precedence over annotations.
        data_format: ClsSourceImageList (text lines "path label [label...]") or ClsSourceItag (iTAG JSON Lines export).
        data_root: Folder that relative image paths are joined to; default is the annotation file's folder.
        delimiter: Column delimiter of ClsSourceImageList lines.
        class_names: Class names in label order, inline "a,b,c" or the URL of a file with one name a line; default is the order of first appearance.
        cache_images: Also copy the images into the dataset folder, so later steps read no remote storage.
        multi_label: Accept several labels per image from iTAG multi-choice answers; the first label is the primary one.
        split: Split name recorded in the dataset summary (train, val, ...).

    Returns:
        dataset: The dataset folder: manifest.jsonl (image URL, label ids, source file:line), classes.txt, summary.json.
    """
    from imlt.trainer import steps

    out = steps.read_data(steps.ReadDataInput(
        output_dir=dataset.path,
        annotations=annotations,
        upstream_annotations=upstream_annotations.path if upstream_annotations is not None else None,
        data_format=data_format,
        data_root=data_root or None,  # pipelines pass "" for unset strings
        delimiter=delimiter,
        class_names=class_names or None,
        cache_images=cache_images,
        multi_label=multi_label,
        split=split,
    ))
    dataset.metadata.update({"split": split, "num_samples": out.num_samples, "num_classes": out.num_classes})
