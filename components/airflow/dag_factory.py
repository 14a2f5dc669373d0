"""The DAGs as factories: a deployment sets its data and schedule in a small DAG file of its own,
without editing package code.

    from imlt.components.airflow.dag_factory import retraining_dag
    retraining_dag("products_daily", "@daily", train_annotations="oss://bkt/products/train.txt",
                   val_annotations="oss://bkt/products/val.txt", destination="oss://bkt/models/products",
                   output_root="oss://bkt/imlt-runs/products", backbone="resnet_50", epochs=30)

Unpausing never starts a run on placeholder settings: the data settings (train/val annotations,
destination, output root) have no defaults, and a DAG with a schedule must be given all of them
(the factory refuses at parse time, naming the missing ones). Without a schedule the trigger form
asks for them. Every task that touches storage, the publish gate included, gets its OSS
credentials the same way: the `oss_conn_id` connection through ImltOssHook.use_connection.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, Param, chain, task

from imlt.components.airflow.dag_params import RUN_DIR, config_default, data_params, template_filters
from imlt.components.airflow.hooks.oss import ImltOssHook
from imlt.components.airflow.operators import (
    EvaluateRecallOperator,
    PublishModelOperator,
    ReadOssDataOperator,
    TrainMetricModelOperator,
    ValidateAnnotationsOperator,
)
from imlt.trainer.config import BACKBONES, LossName, RunConfig
from imlt.trainer.step_models import config_parameters

# The settings a run cannot do without: no defaults, so no run ever starts on made-up paths.
DATA_SETTINGS = ("train_annotations", "val_annotations", "destination", "output_root")


def _required(name: str, value: str | None, title: str, description: str) -> Param:
    kw: dict[str, Any] = {"type": "string", "minLength": 1, "title": title, "description": description}
    return Param(value, **kw) if value is not None else Param(**kw)


def _default(path: str, settings: dict[str, Any]) -> Any:
    """A RunConfig field's default (from the model, never written here) unless the settings give one."""
    name = next(p.name for p in config_parameters() if p.path == path)
    return settings.pop(name) if name in settings else config_default(path)


def _dag(dag_id: str, description: str, schedule: str | None, params: dict[str, Param], oss_conn_id: str | None,
         default_args: dict[str, Any] | None = None, **kw: Any) -> DAG:
    """What both DAGs share: native rendering (ints stay ints), the slug filter, no catch-up, and
    the OSS connection every imlt task uses (a default argument of the operators)."""
    return DAG(dag_id=dag_id, description=description, schedule=schedule, params=params, catchup=False,
               start_date=pendulum.datetime(2025, 1, 1, tz="UTC"), render_template_as_native_obj=True,
               user_defined_filters=template_filters(), default_args={**(default_args or {}), "oss_conn_id": oss_conn_id},
               **kw)


def retraining_dag(dag_id: str = "imlt_retraining", schedule: str | None = None, *,
                   oss_conn_id: str | None = ImltOssHook.default_conn_name, **settings: Any) -> DAG:
    """read -> validate -> train -> evaluate -> publish if Recall@1 beats the floor and the published model.

    settings: the data settings (DATA_SETTINGS), and any of the trigger form's other params
    (class_names, backbone, pretrained, feature_dim, image_size, loss, lr, epochs, device,
    batch_size, reader_threads, data_root, data_format, min_recall_at_1, config_overrides) as
    their defaults.
    """
    missing = [s for s in DATA_SETTINGS if not settings.get(s)]
    if schedule is not None and missing:
        raise ValueError(f"DAG {dag_id!r}: a scheduled DAG needs {', '.join(missing)} (retraining_dag(..., "
                         f"{missing[0]}='oss://...')); without them give schedule=None and set them when triggering")
    s = dict(settings)
    params = {
        "train_annotations": _required("train_annotations", s.pop("train_annotations", None), "Train annotations",
                                       "Annotation file (local path or oss://) of the training split"),
        **data_params(s.pop("val_annotations", None), s.pop("output_root", None), s),
        "class_names": Param(s.pop("class_names", None), type=["null", "array"], items={"type": "string"},
                             title="Class names",
                             description="Train classes in label order, one a line (or one line holding a class file path); empty: from the labels"),
        "destination": _required("destination", s.pop("destination", None), "Destination",
                                 "Published versions go to DESTINATION/vN, then DESTINATION/latest points at the newest"),
        "backbone": Param(_default("model.backbone", s), type="string", examples=list(BACKBONES), title="Backbone",
                          description="A listed name or any timm model name"),
        # ImageNet weights by default, as the reference product (the CLI and library default stays None)
        "pretrained": Param(s.pop("pretrained", "default"), type=["null", "string"], title="Pretrained weights",
                            description=RunConfig.model_fields["model"].default_factory.model_fields["pretrained"].description),
        "feature_dim": Param(_default("model.feature_dim", s), type="integer", minimum=1, title="Embedding dim"),
        "image_size": Param(_default("data.image_size", s), type="integer", minimum=8, title="Image size"),
        "loss": Param(_default("loss.name", s), type="string", enum=[n.value for n in LossName], title="Loss"),
        # null: the optimiser's own default (SGD 0.1, AdamW 1e-3)
        "lr": Param(_default("optim.lr", s), type=["null", "number"], exclusiveMinimum=0, title="Learning rate"),
        "epochs": Param(_default("train.epochs", s), type="integer", minimum=1, title="Epochs"),
        "device": Param(_default("train.device", s), type="string", enum=["auto", "cpu", "cuda"], title="Device"),
        "config_overrides": Param(s.pop("config_overrides", {}), type="object", title="Other config fields",
                                  description='Any RunConfig field by its path, e.g. {"loss.margin": 0.3, "optim.momentum": 0.8}'),
        "min_recall_at_1": Param(s.pop("min_recall_at_1", 0.0), type="number", minimum=0, maximum=1, title="Recall@1 floor",
                                 description="Publish only above this Recall@1 (and above the published model's)"),
    }
    if s:
        raise TypeError(f"retraining_dag: unknown settings {sorted(s)}")
    with _dag(dag_id, "Retrain the image embedding model; publish it only if Recall@1 improves", schedule, params,
              oss_conn_id, tags=["imlt", "training"], max_active_runs=1,
              default_args={"retries": 1, "retry_delay": pendulum.duration(minutes=5)}) as dag:
        _retraining_tasks(oss_conn_id)
    return dag


def _retraining_tasks(oss_conn_id: str | None) -> None:
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
        validations.append(ValidateAnnotationsOperator(
            task_id=f"validate_{split}", dataset_dir=read.output["dataset_dir"],
            output_dir=f"{RUN_DIR}/validation/{split}", workers="{{ [params.reader_threads, 1] | max }}",
        ))
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
        task_id="evaluate", model_dir=train.output["model_dir"], dataset_dir=datasets["val"],
        output_dir=f"{RUN_DIR}/metrics", batch_size="{{ params.batch_size }}", reader_threads="{{ params.reader_threads }}",
    )

    @task.short_circuit(task_id="better_than_published")
    def better_than_published(metrics: dict, destination: str, floor: float) -> bool:
        """Skip publishing unless Recall@1 beats the floor and the published model (read from DESTINATION)."""
        import logging

        from imlt.trainer.publish import publish_decision

        ImltOssHook.use_connection(oss_conn_id, [destination])  # the same credentials as the operators
        go, reason = publish_decision(metrics, destination, floor)
        logging.getLogger(__name__).info(reason)
        return go

    gate = better_than_published(evaluate.output["metrics"], "{{ params.destination }}", "{{ params.min_recall_at_1 }}")
    publish = PublishModelOperator(
        task_id="publish", model_dir=train.output["model_dir"], metrics_dir=evaluate.output["metrics_dir"],
        dataset_dir=datasets["train"], destination="{{ params.destination }}", min_recall_at_1="{{ params.min_recall_at_1 }}",
    )
    chain(validations, train)
    chain(gate, publish)


def evaluation_dag(dag_id: str = "imlt_evaluation", *, oss_conn_id: str | None = ImltOssHook.default_conn_name,
                   **settings: Any) -> DAG:
    """read -> validate -> evaluate a trained or published model; triggered by hand (no schedule)."""
    s = dict(settings)
    params = {
        "model_dir": _required("model_dir", s.pop("model_dir", None), "Model",
                               "A train output folder or a published version folder (DESTINATION/vN)"),
        **data_params(s.pop("val_annotations", None), s.pop("output_root", None), s),
        "ks": Param(s.pop("ks", [1, 2, 4, 8]), type="array", items={"type": "integer", "minimum": 1}, title="K values of Recall@K"),
    }
    if s:
        raise TypeError(f"evaluation_dag: unknown settings {sorted(s)}")
    with _dag(dag_id, "Measure Recall@K and MAP@R of a trained or published embedding model", None, params,
              oss_conn_id, tags=["imlt", "evaluation"]) as dag:
        read = ReadOssDataOperator(
            task_id="read_val", annotations="{{ params.val_annotations }}", output_dir=f"{RUN_DIR}/datasets/val",
            data_format="{{ params.data_format }}", data_root="{{ params.data_root }}", split="val",
        )
        validate = ValidateAnnotationsOperator(
            task_id="validate_val", dataset_dir=read.output["dataset_dir"], output_dir=f"{RUN_DIR}/validation/val",
            workers="{{ [params.reader_threads, 1] | max }}",
        )
        evaluate = EvaluateRecallOperator(
            task_id="evaluate", model_dir="{{ params.model_dir }}", dataset_dir=read.output["dataset_dir"],
            output_dir=f"{RUN_DIR}/metrics", ks="{{ params.ks }}", batch_size="{{ params.batch_size }}",
            reader_threads="{{ params.reader_threads }}",
        )
        validate >> evaluate
    return dag
