"""End-to-end training pipeline: read -> validate -> train -> evaluate -> publish if Recall@1 passes.

`build_training_pipeline(instance_type=..., on_kubernetes=...)` fixes what must be known at
compile time (the train task's node type and GPUs, and whether training runs in the task's pod
or as a Kubeflow TrainJob the task submits and waits for); everything else is a run parameter
shown in the UI. The training parameters are RunConfig's (the same list as the train
components'), with the pipeline's spelling of "unset" ("" for strings).
"""

from typing import Any, Optional

from kfp import dsl

from imlt.components.kfp import evaluate, publish, read_data, train, train_on_kubernetes, validate
from imlt.components.kfp._factory import Io, kfp_input, with_interface
from imlt.pipelines._platform import (
    OSS_SECRET_INPUT,
    retry_when_safe,
    set_step_resources,
    set_train_resources,
    use_oss_secret,
)
from imlt.trainer.step_models import (
    PublishInput,
    ReadDataInput,
    ValidateInput,
    config_parameters,
    model_parameters,
)
from imlt.trainer.config import DataConfig

DATA_INPUTS = [kfp_input(p, unset="empty") for p in model_parameters(ReadDataInput) if p.name in ("data_format", "data_root", "delimiter")]
TRAINING_INPUTS = config_parameters()


def _inputs(instance_type: Optional[str], on_kubernetes: bool) -> list[Io]:
    # starting from ImageNet weights, as the reference product does (the CLI and library default stays None)
    presets = {"pretrained": "default", "instance_type": instance_type or "",
               "compute_mode": "distributed" if on_kubernetes else "standalone", "nnodes": 2 if on_kubernetes else 1}
    annotations = {f: p for f, p in DataConfig.model_fields.items() if f.endswith("_annotations")}
    return [
        Io("train_annotations", "str", annotations["train_annotations"].description.split(";")[0] + "."),
        Io("val_annotations", "str", annotations["val_annotations"].description.split(";")[0]
           + "; its classes may differ from the train classes (open-set retrieval)."),
        *[kfp_input(p, unset="empty") for p in model_parameters(PublishInput) if p.name in ("destination", "min_recall_at_1")],
        *DATA_INPUTS,
        *[kfp_input(p) for p in model_parameters(ValidateInput) if p.name == "min_images_per_class"],
        Io("train_output_dir", "str", *(
            ("Required: the oss:// folder the TrainJob's pods write checkpoints and the model to; a new one per run "
             "(a retried task re-attaches to its job and resumes from here).", None) if on_kubernetes else
            ("Fixed local or oss:// folder for checkpoints, so a retried task resumes; empty: the model artifact. "
             "Leave it empty in recurring runs, or each would resume the previous one.", "''"))),
        *[kfp_input(p, unset="empty", default=presets.get(p.name, p.default)) for p in TRAINING_INPUTS],
        OSS_SECRET_INPUT,
    ]


def build_training_pipeline(
    instance_type: Optional[str] = None,
    name: str = "imlt-training",
    on_kubernetes: bool = False,
    legacy_pytorchjob: bool = False,
) -> dsl.graph_component.GraphComponent:
    """The training pipeline with its train task sized for `instance_type` (None: a CPU pod).

    `on_kubernetes`: the train task submits the training as a Kubeflow TrainJob (a PyTorchJob
    with `legacy_pytorchjob`) of `nnodes` nodes, each sized like the task (its resources and
    node selector pass through to the job), and waits for it; the defaults ask for two nodes.
    """

    def body(p: dict[str, Any]) -> None:
        common = {name: p[name] for name in ("data_format", "data_root", "delimiter")}
        train_read = read_data(annotations=p["train_annotations"], class_names=p["class_names"], split="train", **common)
        # the val split may hold classes unseen in training (open-set retrieval): its own class list
        val_read = read_data(annotations=p["val_annotations"], class_names=p["val_class_names"], split="val", **common)
        train_check = validate(dataset=train_read.outputs["dataset"], min_images_per_class=p["min_images_per_class"])
        val_check = validate(dataset=val_read.outputs["dataset"], min_images_per_class=p["min_images_per_class"])
        for split, read, check in (("train", train_read, train_check), ("val", val_read, val_check)):
            read.set_display_name(f"read {split} annotations")
            # the URL's content can change between runs (recurring runs): never reuse a cached read
            read.set_caching_options(False)
            check.set_display_name(f"validate {split}")

        train_kwargs = dict(
            train_dataset=train_read.outputs["dataset"], val_dataset=val_read.outputs["dataset"],
            output_dir=p["train_output_dir"], **{t.name: p[t.name] for t in TRAINING_INPUTS},
        )
        if on_kubernetes:
            # the job's pods run the image this task runs (a container cannot see its own image reference)
            trained = train_on_kubernetes(oss_secret=p["oss_secret_name"], legacy_pytorchjob=legacy_pytorchjob,
                                          image=train_on_kubernetes.component_spec.implementation.container.image,
                                          **train_kwargs)
        else:
            trained = train(**train_kwargs)
        trained.after(train_check, val_check)
        set_train_resources(trained, instance_type).set_display_name("train")

        scored = evaluate(model=trained.outputs["model"], dataset=val_read.outputs["dataset"],
                          batch_size=p["batch_size"], reader_threads=p["reader_threads"]).set_display_name("evaluate on val")
        # the GPU variants evaluate on a node like the training's; the CPU pipeline in a mid-size pod
        if instance_type is None:
            set_step_resources(scored, "evaluate")
        else:
            set_train_resources(scored, instance_type)

        with dsl.If(scored.outputs["Output"] >= p["min_recall_at_1"], name="recall-gate"):
            released = publish(
                model=trained.outputs["model"], metrics=scored.outputs["metrics"], dataset=train_read.outputs["dataset"],
                destination=p["destination"], min_recall_at_1=p["min_recall_at_1"],
            ).set_display_name("publish")

        for task in (train_read, val_read, train_check, val_check, released):
            set_step_resources(task)
        for task in (train_read, val_read, train_check, val_check, trained, scored, released):
            retry_when_safe(task)
        for task in (train_read, val_read, train_check, val_check, trained, scored, released):
            use_oss_secret(task, p["oss_secret_name"])

    summary = ("Image metric learning: read annotations, validate, train, evaluate Recall@K on val, "
               "publish if Recall@1 passes.")
    return dsl.pipeline(name=name)(with_interface(body, "training_pipeline", _inputs(instance_type, on_kubernetes), summary))


# The compiled variants (pipelines/compile.py builds each again when compiling for another image).
VARIANTS: dict[str, dict[str, Any]] = {
    "training_pipeline": {},
    # The reference product's default GPU machine: 8 vCPU, 60 GB, one P100.
    "training_pipeline_gpu": {"instance_type": "ecs.gn5-c8g1.2xlarge", "name": "imlt-training-gpu"},
    # The same nodes, two of them by default, as a Kubeflow TrainJob the train task submits.
    "training_pipeline_distributed": {"instance_type": "ecs.gn5-c8g1.2xlarge", "name": "imlt-training-distributed",
                                      "on_kubernetes": True},
}
training_pipeline = build_training_pipeline(**VARIANTS["training_pipeline"])
training_pipeline_gpu = build_training_pipeline(**VARIANTS["training_pipeline_gpu"])
training_pipeline_distributed = build_training_pipeline(**VARIANTS["training_pipeline_distributed"])
