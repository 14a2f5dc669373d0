"""What the two train components share: component inputs -> RunConfig, TrainOutput -> artifacts.

`train` trains in its own pod, `train_on_kubernetes` submits a job; both take the same training
inputs and fill the same Model and HTML artifacts. Imported inside component bodies (the image
installs this package), like _artifacts.
"""

from __future__ import annotations

from typing import Any

from imlt.components.kfp import _artifacts
from imlt.trainer import storage
from imlt.trainer.config import RunConfig, load_config
from imlt.trainer.steps import TrainOutput

# component input -> RunConfig field
CONFIG_FIELDS = {
    "backbone": "model.backbone", "image_size": "data.image_size", "feature_dim": "model.feature_dim",
    "backbone_feature_dim": "model.backbone_feature_dim", "num_classes": "model.num_classes",
    "class_names": "data.class_names", "pretrained": "model.pretrained", "loss": "loss.name",
    "margin": "loss.margin", "scale": "loss.scale", "loss_weight": "loss.weight", "optimizer": "optim.optimizer",
    "lr": "optim.lr", "batch_size": "train.batch_size", "epochs": "train.epochs",
    "checkpoint_every": "train.checkpoint_every", "reader_threads": "data.reader_threads", "fp16": "train.fp16",
    "device": "train.device", "seed": "train.seed", "max_hours": "train.max_hours",
    "model_type": "compute.model_type", "compute_mode": "compute.mode", "nnodes": "compute.nnodes",
    "nproc_per_node": "compute.nproc_per_node", "instance_type": "compute.instance_type",
    "gpu_type": "compute.gpu_type",
}
# Unset is "" for strings and 0 for the two derived ints (kfp.local cannot run None-default
# pipeline inputs, nor None for an int input); these become None so the config derives them.
_UNSET_IS_EMPTY = {"backbone_feature_dim", "num_classes", "class_names", "pretrained", "instance_type", "gpu_type"}


def run_config(params: dict[str, Any], output_dir: str) -> RunConfig:
    """The RunConfig a train component's inputs describe (params: the component's arguments)."""
    overrides: dict[str, Any] = {"output_dir": output_dir}
    for name, dotted in CONFIG_FIELDS.items():
        value = params[name]
        overrides[dotted] = (value or None) if name in _UNSET_IS_EMPTY else value
    return load_config({}, overrides)


def fill_model_artifacts(out: TrainOutput, config: RunConfig, model: Any, training_curve: Any) -> None:
    """Copy the model folder into the Model artifact, set its metadata, draw the curve page.

    A model trained into an external output_dir is copied into the artifact so that downstream
    tasks and the UI see it; training into the artifact needs no copy.
    """
    if out.model_dir.rstrip("/") != model.path.rstrip("/"):
        storage.download_dir(out.model_dir, model.path)
    model.metadata.update({
        "backbone": config.model.backbone, "feature_dim": config.model.feature_dim, "loss": config.loss.name.value,
        "image_size": config.data.image_size, "config_hash": out.config_hash, "epochs_completed": out.epochs_completed,
        "stopped_early": out.stopped_early, "final_loss": out.final_loss, "instance_minutes": out.instance_minutes,
    })
    _artifacts.write_text(training_curve.path, _artifacts.html_page(
        f"Training {config.model.backbone} + {config.loss.name.value}", _artifacts.png_urls(out.model_dir), out.history))
