"""Trigger-form parameters and template helpers shared by the DAGs in dags/.

The DAGs render templates as native objects (`render_template_as_native_obj=True`), so an
integer param reaches the step as an int and an unset optional param as None, not "None".
Class names are an array param for that reason: a string like "1,2,3" would render as a tuple.
"""

from __future__ import annotations

import re
from typing import Any

from airflow.sdk import Param

# Run-scoped folders: a retried task finds its own earlier output (train resumes), while two
# runs on the same day never share a folder.
RUN_DIR = "{{ params.output_root }}/{{ run_id | slug }}"


def slug(text: str) -> str:
    """A run id as a folder name: ':' and '+' are legal in OSS keys but awkward in local paths."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def data_params(example_root: str) -> dict[str, Param]:
    """Where the annotations are and how to read them."""
    from imlt.trainer.config import DataFormat

    return {
        "val_annotations": Param(
            f"{example_root}/annotations/val.txt",
            type="string",
            minLength=1,
            title="Validation annotations",
            description="Annotation file (local path or oss://) of the split that Recall@K is measured on",
        ),
        "data_root": Param(
            None,
            type=["null", "string"],
            title="Data root",
            description="Root that relative image paths are joined to (default: each annotation file's folder)",
        ),
        "data_format": Param(
            DataFormat.IMAGE_LIST.value,
            type="string",
            enum=[f.value for f in DataFormat],
            title="Annotation format",
        ),
        "output_root": Param(
            f"{example_root}/runs",
            type="string",
            minLength=1,
            title="Output root",
            description="Each run writes its datasets, reports, model and metrics under OUTPUT_ROOT/<run id>",
        ),
        "batch_size": Param(32, type="integer", minimum=1, title="Batch size"),
        "reader_threads": Param(4, type="integer", minimum=0, title="Data reader threads"),
    }


def template_filters() -> dict[str, Any]:
    return {"slug": slug}
