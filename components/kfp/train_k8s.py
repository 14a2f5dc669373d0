"""KFP component over trainer.steps.train_remote: the training runs as a Kubernetes job, not in this pod.

Same training inputs and outputs as `train`. The task submits a Kubeflow Trainer v2 TrainJob
(or a legacy PyTorchJob) and waits for it, streaming node 0's log into the task's log; a retried
task renders the same job name and re-attaches to the job instead of starting another.

Resources: set them on the task as for `train` (`.set_cpu_limit()`, `.set_memory_limit()`,
`.set_accelerator_type()`, `.set_accelerator_limit()`, a node selector). The component declares
`task_config_passthroughs` for RESOURCES and KUBERNETES_NODE_SELECTOR without applying them to the
task: KFP hands them to the component in `task_config`, they become each node's resources and
node selector, and this pod itself stays small and schedules anywhere. Without task settings,
the config's instance_type (or gpu_type and nproc_per_node) sizes the nodes.

The task needs a service account allowed to create, get and delete trainjobs (or pytorchjobs)
and to list pods and read their logs in the job's namespace (docs/kfp.md).
"""

from typing import Optional

from kfp import dsl

from imlt.components.kfp._image import IMAGE


@dsl.component(
    base_image=IMAGE,
    install_kfp_package=False,
    task_config_passthroughs=[
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.RESOURCES, apply_to_task=False),
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR, apply_to_task=False),
    ],
)
def train_on_kubernetes(
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
    image: str = "",
    namespace: str = "",
    oss_secret: str = "oss-credentials",
    legacy_pytorchjob: bool = False,
    poll_seconds: float = 30.0,
    task_config: dsl.TaskConfig = None,
):
    """Train an image metric-learning model as a Kubernetes job (Kubeflow TrainJob) and wait for it.

    Args:
        train_dataset: Train split from read_data.
        val_dataset: Validation split from read_data; when connected, Recall@1 is tracked per epoch.
        output_dir: Required: the oss:// folder (or a volume every pod mounts at the same path) the job writes checkpoints and the model to, and reads its config and staged datasets from; a retried task re-attaches to its job and resumes from here.
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
        compute_mode: standalone (one node) or distributed (nnodes nodes, each running nproc_per_node processes).
        nnodes: Number of nodes (distributed only).
        nproc_per_node: Processes (GPUs) per node.
        instance_type: ECS instance type such as ecs.gn5-c8g1.2xlarge: the job's per-node CPU, memory, GPUs and GPU node label (the task's own resources, when set, override them).
        gpu_type: Accelerator model, e.g. nvidia-tesla-v100 (overrides the instance type's).
        resume: Continue from the last checkpoint in output_dir when one exists.
        image: Image the job's pods run; empty means this component's image (the project image of the same version).
        namespace: Namespace of the job; empty means the namespace this task runs in.
        oss_secret: Kubernetes Secret whose keys OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET and optionally OSS_ENDPOINT, OSS_REGION, OSS_SESSION_TOKEN become the pods' environment; empty for none.
        legacy_pytorchjob: Submit a Training Operator v1 PyTorchJob instead of a Kubeflow Trainer v2 TrainJob.
        poll_seconds: Seconds between checks of the job's status.
        task_config: Filled by KFP: the task's resources and node selector, passed through to the job's nodes.

    Returns:
        model: The trained model folder (copied from output_dir): final weights, checkpoints, resolved config and its hash, per-epoch history, training curve.
        training_curve: Loss per epoch.
    """
    params = dict(locals())  # the inputs above, for the shared config builder
    from imlt.components.kfp import _training
    from imlt.trainer import remote_train, steps

    if not output_dir:
        raise ValueError("train_on_kubernetes needs output_dir: an oss:// folder the job's pods write the model to "
                         "(this task's artifact folder is local to its own pod)")
    config = _training.run_config(params, output_dir)
    resources = task_config.resources if task_config is not None else None
    selector = task_config.node_selector if task_config is not None else None
    out = steps.train_remote(steps.RemoteTrainInput(
        config=config,
        train_dataset=train_dataset.path,
        val_dataset=val_dataset.path if val_dataset is not None else None,
        resume=resume,
        image=image,
        namespace=namespace,
        oss_secret=oss_secret or None,
        legacy_pytorchjob=legacy_pytorchjob,
        resources=remote_train.flat_resources(resources),
        node_selector=selector or None,
        poll_seconds=poll_seconds,
    ))
    _training.fill_model_artifacts(out, config, model, training_curve)
