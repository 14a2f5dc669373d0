"""Evaluation only: measure a trained or published model's Recall@K on an annotation file.

Triggered by hand (no schedule), e.g. to compare a published version on a new test set.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag

from imlt.components.airflow.dag_params import RUN_DIR, data_params, template_filters
from imlt.components.airflow.operators import EvaluateRecallOperator, ReadOssDataOperator, ValidateAnnotationsOperator

EXAMPLE_ROOT = "oss://my-bucket/imlt"


@dag(
    dag_id="imlt_evaluation",
    description="Measure Recall@K and MAP@R of a trained or published embedding model",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    render_template_as_native_obj=True,
    user_defined_filters=template_filters(),
    tags=["imlt", "evaluation"],
    params={
        "model_dir": Param(
            f"{EXAMPLE_ROOT}/models/v1",
            type="string",
            minLength=1,
            title="Model",
            description="A train output folder or a published version folder (DESTINATION/vN)",
        ),
        **data_params(EXAMPLE_ROOT),
        "ks": Param([1, 2, 4, 8], type="array", items={"type": "integer", "minimum": 1}, title="K values of Recall@K"),
    },
)
def imlt_evaluation() -> None:
    read = ReadOssDataOperator(
        task_id="read_val",
        annotations="{{ params.val_annotations }}",
        output_dir=f"{RUN_DIR}/datasets/val",
        data_format="{{ params.data_format }}",
        data_root="{{ params.data_root }}",
        split="val",
    )
    validate = ValidateAnnotationsOperator(
        task_id="validate_val",
        dataset_dir=read.output["dataset_dir"],
        output_dir=f"{RUN_DIR}/validation/val",
        workers="{{ [params.reader_threads, 1] | max }}",
    )
    evaluate = EvaluateRecallOperator(
        task_id="evaluate",
        model_dir="{{ params.model_dir }}",
        dataset_dir=read.output["dataset_dir"],
        output_dir=f"{RUN_DIR}/metrics",
        ks="{{ params.ks }}",
        batch_size="{{ params.batch_size }}",
        reader_threads="{{ params.reader_threads }}",
    )
    validate >> evaluate


imlt_evaluation()
