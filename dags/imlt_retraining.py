"""Daily retraining: read -> validate -> train -> evaluate -> publish if the model is better.

Publishes only when Recall@1 on the validation split beats both the floor
(`min_recall_at_1`) and the model currently published at DESTINATION/latest (none published:
the floor alone decides). Every setting is a param in the trigger form; the defaults below are
what the daily scheduled run uses, so point them at your data before unpausing the DAG.

No torch/timm import here or in the operators: the scheduler parses this file often.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, chain, dag, task

from imlt.components.airflow.dag_params import RUN_DIR, data_params, template_filters
from imlt.components.airflow.operators import (
    EvaluateRecallOperator,
    PublishModelOperator,
    ReadOssDataOperator,
    TrainMetricModelOperator,
    ValidateAnnotationsOperator,
)
from imlt.trainer.config import BACKBONES, LossName

EXAMPLE_ROOT = "oss://my-bucket/imlt"


@dag(
    dag_id="imlt_retraining",
    description="Retrain the image embedding model daily; publish it only if Recall@1 improves",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    user_defined_filters=template_filters(),
    default_args={"retries": 1, "retry_delay": pendulum.duration(minutes=5)},
    tags=["imlt", "training"],
    params={
        "train_annotations": Param(
            f"{EXAMPLE_ROOT}/annotations/train.txt",
            type="string",
            minLength=1,
            title="Train annotations",
            description="Annotation file (local path or oss://) of the training split",
        ),
        **data_params(EXAMPLE_ROOT),
        "class_names": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            title="Class names",
            description="Train classes in label order, one a line (or one line holding a class file path); empty: from the labels",
        ),
        "destination": Param(
            f"{EXAMPLE_ROOT}/models",
            type="string",
            minLength=1,
            title="Destination",
            description="Published versions go to DESTINATION/vN, then DESTINATION/latest points at the newest",
        ),
        "backbone": Param("resnet_50", type="string", examples=list(BACKBONES), title="Backbone", description="A listed name or any timm model name"),
        "pretrained": Param(None, type=["null", "string"], title="Pretrained checkpoint", description="Local or oss:// checkpoint; empty: random init"),
        "feature_dim": Param(512, type="integer", minimum=1, title="Embedding dim"),
        "image_size": Param(224, type="integer", minimum=8, title="Image size"),
        "loss": Param(LossName.AMSOFTMAX.value, type="string", enum=[n.value for n in LossName], title="Loss"),
        "lr": Param(0.1, type="number", exclusiveMinimum=0, title="Learning rate"),
        "epochs": Param(10, type="integer", minimum=1, title="Epochs"),
        "device": Param("auto", type="string", enum=["auto", "cpu", "cuda"], title="Device"),
        "config_overrides": Param(
            {},
            type="object",
            title="Other config fields",
            description='Dotted RunConfig fields, e.g. {"loss.margin": 0.3, "compute.model_type": "model-parallel"}',
        ),
        "min_recall_at_1": Param(
            0.0,
            type="number",
            minimum=0,
            maximum=1,
            title="Recall@1 floor",
            description="Publish only above this Recall@1 (and above the published model's)",
        ),
    },
)
def imlt_retraining() -> None:
    datasets = {}
    validations = []
    for split in ("train", "val"):
        read = ReadOssDataOperator(
            task_id=f"read_{split}",
            annotations=f"{{{{ params.{split}_annotations }}}}",
            output_dir=f"{RUN_DIR}/datasets/{split}",
            data_format="{{ params.data_format }}",
            data_root="{{ params.data_root }}",
            # label order is the train split's; val classes may be unseen ones (open-set retrieval)
            class_names="{{ params.class_names }}" if split == "train" else None,
            split=split,
        )
        validations.append(
            ValidateAnnotationsOperator(
                task_id=f"validate_{split}",
                dataset_dir=read.output["dataset_dir"],
                output_dir=f"{RUN_DIR}/validation/{split}",
                workers="{{ [params.reader_threads, 1] | max }}",
            )
        )
        datasets[split] = read.output["dataset_dir"]

    train = TrainMetricModelOperator(
        task_id="train",
        config={
            "output_dir": f"{RUN_DIR}/model",
            "data": {
                "train_annotations": "{{ params.train_annotations }}",
                "val_annotations": "{{ params.val_annotations }}",
                "data_root": "{{ params.data_root }}",
                "data_format": "{{ params.data_format }}",
                "image_size": "{{ params.image_size }}",
                "reader_threads": "{{ params.reader_threads }}",
            },
            "model": {"backbone": "{{ params.backbone }}", "feature_dim": "{{ params.feature_dim }}", "pretrained": "{{ params.pretrained }}"},
            "loss": {"name": "{{ params.loss }}"},
            "optim": {"lr": "{{ params.lr }}"},
            "train": {"epochs": "{{ params.epochs }}", "batch_size": "{{ params.batch_size }}", "device": "{{ params.device }}"},
        },
        overrides="{{ params.config_overrides }}",
        train_dataset=datasets["train"],
        val_dataset=datasets["val"],
    )
    evaluate = EvaluateRecallOperator(
        task_id="evaluate",
        model_dir=train.output["model_dir"],
        dataset_dir=datasets["val"],
        output_dir=f"{RUN_DIR}/metrics",
        batch_size="{{ params.batch_size }}",
        reader_threads="{{ params.reader_threads }}",
    )

    @task.short_circuit(task_id="better_than_published")
    def better_than_published(metrics: dict, destination: str, floor: float) -> bool:
        """Skip publishing unless Recall@1 beats the floor and the published model."""
        import logging

        from imlt.trainer.publish import publish_decision

        go, reason = publish_decision(metrics, destination, floor)
        logging.getLogger(__name__).info(reason)
        return go

    gate = better_than_published(evaluate.output["metrics"], "{{ params.destination }}", "{{ params.min_recall_at_1 }}")
    publish = PublishModelOperator(
        task_id="publish",
        model_dir=train.output["model_dir"],
        metrics_dir=evaluate.output["metrics_dir"],
        dataset_dir=datasets["train"],
        destination="{{ params.destination }}",
        min_recall_at_1="{{ params.min_recall_at_1 }}",
    )
    chain(validations, train)
    chain(gate, publish)


imlt_retraining()
