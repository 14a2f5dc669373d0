"""End-to-end training pipeline: read -> validate -> train -> evaluate -> publish if Recall@1 passes.

`build_training_pipeline(instance_type=..., on_kubernetes=...)` fixes what must be known at
compile time (the train task's node type and GPUs, and whether training runs in the task's pod
or as a Kubeflow TrainJob the task submits and waits for); everything else is a run parameter
shown in the UI.
"""

from typing import Optional

from kfp import dsl

from imlt.components.kfp import evaluate, publish, read_data, train, train_on_kubernetes, validate
from imlt.pipelines._platform import set_train_resources, use_oss_secret


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
    node_type = instance_type  # the pipeline's own `instance_type` parameter shadows this name below

    @dsl.pipeline(name=name)
    def training_pipeline(
        train_annotations: str,
        val_annotations: str,
        destination: str,
        min_recall_at_1: float = 0.0,
        data_format: str = "ClsSourceImageList",
        data_root: str = "",
        delimiter: str = " ",
        class_names: str = "",
        min_images_per_class: int = 2,
        train_output_dir: str = "",
        backbone: str = "resnet_50",
        image_size: int = 224,
        feature_dim: int = 512,
        pretrained: str = "",
        loss: str = "AMSoftmax",
        margin: Optional[float] = None,
        scale: Optional[float] = None,
        loss_weight: float = 1.0,
        optimizer: str = "SGD",
        lr: float = 0.1,
        batch_size: int = 32,
        epochs: int = 10,
        checkpoint_every: int = 1,
        reader_threads: int = 4,
        fp16: bool = False,
        seed: int = 0,
        max_hours: float = 24.0,
        model_type: str = "data-parallel",
        compute_mode: str = "distributed" if on_kubernetes else "standalone",
        nnodes: int = 2 if on_kubernetes else 1,
        nproc_per_node: int = 1,
        instance_type: str = instance_type or "",
        gpu_type: str = "",
        oss_secret_name: str = "oss-credentials",
    ) -> None:
        """Image metric learning: read annotations, validate, train, evaluate Recall@K on val, publish if Recall@1 passes.

        Args:
            train_annotations: Train annotation file, local path or oss://bucket/key.
            val_annotations: Validation annotation file; its classes may differ from the train classes (open-set retrieval).
            destination: Local or oss:// folder that receives v1/, v2/, ... and the `latest` pointer.
            min_recall_at_1: Publish only when Recall@1 on the val split reaches this value (0 to 1).
            data_format: ClsSourceImageList (text lines "path label [label...]") or ClsSourceItag (iTAG JSON Lines export).
            data_root: Folder that relative image paths are joined to; default is each annotation file's folder.
            delimiter: Column delimiter of ClsSourceImageList lines.
            class_names: Train class names in label order, inline "a,b,c" or a class-list file URL.
            min_images_per_class: Validation fails for a class with fewer images.
            train_output_dir: Fixed local or oss:// folder for checkpoints, so a retried task resumes; default is the model artifact. Leave it empty in recurring runs, or each would resume the previous one. Training on Kubernetes (the distributed pipeline) needs it: an oss:// folder the job's pods write to, a new one per run.
            backbone: resnet_50, resnet18, resnet34, resnet101, swint_tiny/small/base, vit_tiny/small/base, xcit_tiny/small/base, or any timm name.
            image_size: Square input size in pixels.
            feature_dim: Embedding width.
            pretrained: Local or oss:// checkpoint to start from; empty means random initialisation.
            loss: AMSoftmax, ArcFace, CosFace, LargeMarginSoftmax, SphereFace, ModelParallelAMSoftmax or ModelParallelSoftmax.
            margin: Loss margin; empty uses the loss's default.
            scale: Logit scale; empty uses the loss's default.
            loss_weight: Weight of the metric loss in [0, 1]; the rest goes to a softmax classifier.
            optimizer: SGD or AdamW.
            lr: Peak learning rate.
            batch_size: Global batch size (also the evaluation batch size).
            epochs: Number of epochs.
            checkpoint_every: Write a checkpoint every N epochs.
            reader_threads: DataLoader worker processes.
            fp16: Mixed precision (needs a GPU).
            seed: Random seed.
            max_hours: Time limit of training (at most 24 h); on reaching it the run checkpoints and stops.
            model_type: data-parallel or model-parallel (needs a ModelParallel* loss).
            compute_mode: standalone (one node) or distributed (several nodes; the distributed pipeline runs them as a Kubeflow TrainJob).
            nnodes: Number of nodes in distributed mode.
            nproc_per_node: Processes (GPUs) per node.
            instance_type: ECS instance type recorded with the run's usage (the train pod's size is fixed when the pipeline is compiled).
            gpu_type: Accelerator model, e.g. nvidia-tesla-v100.
            oss_secret_name: Kubernetes Secret with access_key_id, access_key_secret, security_token (optional) and endpoint for oss:// URLs.
        """
        common = dict(data_format=data_format, data_root=data_root, delimiter=delimiter)
        train_read = read_data(annotations=train_annotations, class_names=class_names, split="train", **common)
        # the val split may hold classes unseen in training (open-set retrieval): no class list
        val_read = read_data(annotations=val_annotations, split="val", **common)
        train_check = validate(dataset=train_read.outputs["dataset"], min_images_per_class=min_images_per_class)
        val_check = validate(dataset=val_read.outputs["dataset"], min_images_per_class=min_images_per_class)
        for split, read, check in (("train", train_read, train_check), ("val", val_read, val_check)):
            read.set_display_name(f"read {split} annotations")
            # the URL's content can change between runs (recurring runs): never reuse a cached read
            read.set_caching_options(False)
            check.set_display_name(f"validate {split}")

        train_kwargs = dict(
            train_dataset=train_read.outputs["dataset"], val_dataset=val_read.outputs["dataset"],
            output_dir=train_output_dir, backbone=backbone, image_size=image_size, feature_dim=feature_dim,
            class_names=class_names, pretrained=pretrained, loss=loss, margin=margin, scale=scale,
            loss_weight=loss_weight, optimizer=optimizer, lr=lr, batch_size=batch_size, epochs=epochs,
            checkpoint_every=checkpoint_every, reader_threads=reader_threads, fp16=fp16, seed=seed,
            max_hours=max_hours, model_type=model_type, compute_mode=compute_mode, nnodes=nnodes,
            nproc_per_node=nproc_per_node, instance_type=instance_type, gpu_type=gpu_type,
        )
        if on_kubernetes:
            trained = train_on_kubernetes(oss_secret=oss_secret_name, legacy_pytorchjob=legacy_pytorchjob, **train_kwargs)
        else:
            trained = train(**train_kwargs)
        trained.after(train_check, val_check)
        set_train_resources(trained, node_type).set_display_name("train")

        scored = evaluate(model=trained.outputs["model"], dataset=val_read.outputs["dataset"],
                          batch_size=batch_size, reader_threads=reader_threads).set_display_name("evaluate on val")

        with dsl.If(scored.outputs["Output"] >= min_recall_at_1, name="recall-gate"):
            released = publish(
                model=trained.outputs["model"], metrics=scored.outputs["metrics"], dataset=train_read.outputs["dataset"],
                destination=destination, min_recall_at_1=min_recall_at_1,
            ).set_display_name("publish")

        for task in (train_read, val_read, train_check, val_check, trained, scored, released):
            use_oss_secret(task, oss_secret_name)

    return training_pipeline


training_pipeline = build_training_pipeline()
# The reference product's default GPU machine: 8 vCPU, 60 GB, one P100.
training_pipeline_gpu = build_training_pipeline(instance_type="ecs.gn5-c8g1.2xlarge", name="imlt-training-gpu")
# The same nodes, two of them by default, as a Kubeflow TrainJob the train task submits.
training_pipeline_distributed = build_training_pipeline(
    instance_type="ecs.gn5-c8g1.2xlarge", name="imlt-training-distributed", on_kubernetes=True)
