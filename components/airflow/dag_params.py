"""Trigger-form parameters and template helpers shared by the DAG factories (dag_factory.py).

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


def _path_param(value: str | None, title: str, description: str) -> Param:
    """A required path: no default unless the deployment gave one (never a placeholder)."""
    kw: dict[str, Any] = {"type": "string", "minLength": 1, "title": title, "description": description}
    return Param(value, **kw) if value is not None else Param(**kw)


def data_params(val_annotations: str | None, output_root: str | None, settings: dict[str, Any]) -> dict[str, Param]:
    """Where the annotations are and how to read them; defaults from `settings` (popped) or the models."""
    from imlt.trainer.config import DataFormat
    from imlt.trainer.step_models import ReadDataInput

    return {
        "val_annotations": _path_param(val_annotations, "Validation annotations",
                                       "Annotation file (local path or oss://) of the split that Recall@K is measured on"),
        "data_root": Param(settings.pop("data_root", None), type=["null", "string"], title="Data root",
                           description=ReadDataInput.model_fields["data_root"].description),
        "data_format": Param(settings.pop("data_format", DataFormat.IMAGE_LIST.value), type="string",
                             enum=[f.value for f in DataFormat], title="Annotation format"),
        "output_root": _path_param(output_root, "Output root",
                                   "Each run writes its datasets, reports, model and metrics under OUTPUT_ROOT/<run id>"),
        "batch_size": Param(settings.pop("batch_size", config_default("train.batch_size")), type="integer", minimum=1,
                            title="Batch size"),
        "reader_threads": Param(settings.pop("reader_threads", config_default("data.reader_threads")), type="integer",
                                minimum=0, title="Data reader threads"),
    }


def config_default(path: str) -> Any:
    """A RunConfig field's default, in the spelling a Param takes (an enum's value)."""
    from imlt.trainer.step_models import config_parameters

    return next(p.default for p in config_parameters() if p.path == path)


def template_filters() -> dict[str, Any]:
    return {"slug": slug}
