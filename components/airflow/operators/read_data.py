"""Step 1 as an operator: annotation file -> dataset folder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imlt.components.airflow.operators._base import ImltStepOperator


class ReadOssDataOperator(ImltStepOperator):
    """Parse an annotation file (local or oss://) into a dataset folder (trainer.steps.read_data).

    XCom: {"dataset_dir", "num_samples", "num_classes"}; the class list stays in classes.txt.

    :param output_dir: folder that receives manifest.jsonl, classes.txt, summary.json (templated)
    :param annotations: annotation file (templated)
    :param upstream_annotations: an upstream task's annotation file; wins over `annotations`
    :param data_format: ClsSourceImageList or ClsSourceItag
    :param data_root: root for relative image paths (default: the annotation file's folder)
    :param class_names: class names in label order: a list, "a,b,c" or a file path
    """

    step = "read_data"
    input_model = "ReadDataInput"
    xcom_exclude = frozenset({"classes"})
    template_fields: Sequence[str] = (
        "output_dir",
        "annotations",
        "upstream_annotations",
        "data_format",
        "data_root",
        "delimiter",
        "class_names",
        "cache_images",
        "split",
    )

    def __init__(
        self,
        *,
        output_dir: str,
        annotations: str | None = None,
        upstream_annotations: str | None = None,
        data_format: str = "ClsSourceImageList",
        data_root: str | None = None,
        delimiter: str = " ",
        class_names: list[str] | str | None = None,
        cache_images: bool = False,
        split: str = "train",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.output_dir = output_dir
        self.annotations = annotations
        self.upstream_annotations = upstream_annotations
        self.data_format = data_format
        self.data_root = data_root
        self.delimiter = delimiter
        self.class_names = class_names
        self.cache_images = cache_images
        self.split = split

    def step_fields(self) -> dict[str, Any]:
        return {
            "output_dir": self.output_dir,
            "annotations": self.annotations,
            "upstream_annotations": self.upstream_annotations,
            "data_format": self.data_format,
            "data_root": self.data_root,
            "delimiter": self.delimiter,
            "class_names": self.class_names,
            "cache_images": self.cache_images,
            "split": self.split,
        }
