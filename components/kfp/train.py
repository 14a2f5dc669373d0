"""KFP component over trainer.steps.train.

Resources come from the task, not from parameters: in a pipeline call
`.set_cpu_limit()`, `.set_memory_limit()`, `.set_accelerator_type('nvidia.com/gpu')` and
`.set_accelerator_limit(n)` on the train task (pipelines/training.py derives them from an
instance type). `instance_type` and `gpu_type` are recorded in the config and model card.
"""

from typing import Optional

from kfp import dsl

from imlt.components.kfp._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    train_dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    training_curve: dsl.Output[dsl.HTML],
    val_dataset: Optional[dsl.Input[dsl.Dataset]] = None,
    output_dir: Optional[str] = None,
    backbone: str = "resnet_50",
    image_size: int = 224,
    feature_dim: int = 512,
    backbone_feature_dim: int = 0,
    num_classes: int = 0,
    class_names: Optional[str] = None,
    pretrained: Optional[str] = None,
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
    device: str = "auto",
    seed: int = 0,
    max_hours: float = 24.0,
    model_type: str = "data-parallel",
    compute_mode: str = "standalone",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    instance_type: Optional[str] = None,
    gpu_type: Optional[str] = None,
    resume: bool = True,
):
    """Train an image metric-learning model (timm backbone, embedding neck, margin loss).

    Args:
        train_dataset: Train split from read_data.
        val_dataset: Validation split from read_data; when connected, Recall@1 is tracked per epoch.
        output_dir: Local or oss:// folder for checkpoints and the model; set it to a fixed folder so a retried task resumes. Default is the model artifact.
        backbone: resnet_50, resnet18, resnet34, resnet101, swint_tiny/small/base, vit_tiny/small/base, xcit_tiny/small/base, or any timm model name.
        image_size: Square input size in pixels.
        feature_dim: Embedding (neck output) width.
        backbone_feature_dim: Must equal the backbone's output width (resnet_50 2048); 0 derives it from the backbone.
        num_classes: Number of train classes; must match the class list; 0 derives it from the dataset.
        class_names: Class names in label order, inline "a,b,c" or a class-list file URL; checked against the dataset.
        pretrained: Local or oss:// checkpoint to start from; empty means random initialisation (nothing is downloaded).
        loss: AMSoftmax, ArcFace, CosFace, LargeMarginSoftmax, SphereFace, ModelParallelAMSoftmax or ModelParallelSoftmax.
        margin: Loss margin; empty uses the loss's default (AMSoftmax 0.4, ArcFace 28.6 degrees, CosFace 0.35, LargeMarginSoftmax/SphereFace 4).
        scale: Logit scale; empty uses the loss's default (AMSoftmax 30, ArcFace/CosFace 64, LargeMarginSoftmax/SphereFace 1).
        loss_weight: Weight of the metric loss in [0, 1]; the rest goes to a plain softmax classifier.
        optimizer: SGD or AdamW.
        lr: Peak learning rate.
        batch_size: Global batch size.
        epochs: Number of epochs.
        checkpoint_every: Write a checkpoint every N epochs.
        reader_threads: DataLoader worker processes.
        fp16: Mixed precision with loss scaling (needs a CUDA device).
        device: auto, cpu or cuda.
        seed: Random seed.
        max_hours: Time limit (at most 24); on reaching it the run checkpoints and stops.
        model_type: data-parallel, or model-parallel (classifier sharded by class; needs a ModelParallel* loss).
        compute_mode: standalone (train in this task's pod) or distributed (several nodes).
        nnodes: Number of nodes (distributed only).
        nproc_per_node: Processes (GPUs) per node.
        instance_type: ECS instance type such as ecs.gn5-c8g1.2xlarge, recorded with the run's usage; set the task's resources to match.
        gpu_type: Accelerator model, e.g. nvidia-tesla-v100 (overrides the instance type's).
        resume: Continue from the last checkpoint in output_dir when one exists.

    Returns:
        model: The trained model folder: final weights, checkpoints, resolved config and its hash, per-epoch history, training curve.
        training_curve: Loss (and validation Recall@1) per epoch.
    """
    params = dict(locals())  # the inputs above, for the shared config builder
    from imlt.components.kfp import _training
    from imlt.trainer import steps

    config = _training.run_config(params, output_dir or model.path)
    out = steps.train(steps.TrainInput(
        config=config,
        train_dataset=train_dataset.path,
        val_dataset=val_dataset.path if val_dataset is not None else None,
        resume=resume,
    ))
    _training.fill_model_artifacts(out, config, model, training_curve)
