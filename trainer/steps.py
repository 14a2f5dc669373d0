"""The five pipeline steps: a typed input model in, a typed output model out.

Steps exchange only URLs of folders, so each can run in its own process, pod or task. The
CLI, the KFP components and the Airflow operators are adapters over these functions; any
logic they would need belongs here or below.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from imlt.trainer.config import DataFormat, RunConfig


class StepModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- 1. read data ------------------------------------------------------------------------------


class ReadDataInput(StepModel):
    output_dir: str = Field(..., description="Folder (local or oss://) that receives the dataset")
    annotations: str | None = Field(None, description="Annotation file (local or oss://)")
    upstream_annotations: str | None = Field(None, description="Annotation file from an upstream step; wins over `annotations`")
    data_format: DataFormat = DataFormat.IMAGE_LIST
    data_root: str | None = Field(None, description="Root for relative image paths (default: the annotation file's folder)")
    delimiter: str = " "
    class_names: list[str] | str | None = Field(None, description="Class names in label order: list, 'a,b,c' or a file path")
    cache_images: bool = Field(False, description="Also copy the images into output_dir/images (a local cache)")
    multi_label: bool = Field(False, description="Accept several labels per image from iTAG multi-choice answers (ImageList lines may always list several); the first label is the primary one")
    split: str = Field("train", description="Name recorded in the summary (train, val, ...)")


class ReadDataOutput(StepModel):
    dataset_dir: str
    num_samples: int
    num_classes: int
    classes: list[str]


def read_data(inp: ReadDataInput) -> ReadDataOutput:
    """Parse an annotation file into a dataset folder: manifest.jsonl, classes.txt, summary.json."""
    from imlt.trainer.data.reader import build_dataset

    return build_dataset(inp)


# --- 2. validate ---------------------------------------------------------------------------------


class ValidateInput(StepModel):
    dataset_dir: str = Field(..., description="Output of read_data")
    output_dir: str = Field(..., description="Folder that receives validation.json and report.html")
    min_images_per_class: int = Field(2, ge=1)
    imbalance_ratio: float = Field(10.0, gt=1, description="Warn when the largest class is this many times the smallest")
    workers: int = Field(4, ge=1, description="Threads that decode images")
    max_image_pixels: int = Field(50_000_000, gt=0, description="Refuse images above this many pixels")


class ValidateOutput(StepModel):
    validation_dir: str
    ok: bool
    num_errors: int
    num_warnings: int
    report_html: str


def validate(inp: ValidateInput) -> ValidateOutput:
    """Decode every image and check labels; raises DataError (file:line) on fatal problems."""
    from imlt.trainer.data.validation import validate_dataset

    return validate_dataset(inp)


# --- 3. train --------------------------------------------------------------------------------------


class TrainInput(StepModel):
    config: RunConfig
    train_dataset: str | None = Field(None, description="dataset_dir of read_data for the train split")
    val_dataset: str | None = Field(None, description="dataset_dir of read_data for the val split (optional)")
    resume: bool = Field(True, description="Continue from the last checkpoint in output_dir if one exists")


class TrainOutput(StepModel):
    model_dir: str
    config_hash: str
    epochs_completed: int
    stopped_early: bool = Field(False, description="True when the time limit stopped the run")
    final_loss: float
    history: list[dict[str, Any]]
    instance_minutes: float


def train(inp: TrainInput) -> TrainOutput:
    from imlt.trainer.engine import run_training

    return run_training(inp)


class RemoteTrainInput(StepModel):
    """Train as a Kubernetes job (Kubeflow TrainJob, or a legacy PyTorchJob) instead of in this process.

    The pods read the resolved config from `config_url` and write the model to
    config.output_dir, so both (and the datasets) must be URLs the pods can reach: oss:// in
    practice. Fields after the first four only shape the job.
    """

    config: RunConfig
    train_dataset: str = Field(..., description="dataset_dir of read_data for the train split (a URL the pods can read)")
    val_dataset: str | None = Field(None, description="dataset_dir of read_data for the val split (optional)")
    resume: bool = Field(True, description="Continue from the last checkpoint in output_dir if one exists")
    image: str = Field("", description="Image every pod runs; empty: the project image of this package version (env IMLT_IMAGE overrides)")
    namespace: str = Field("", description="Namespace of the job; empty: this pod's own namespace in a cluster, else 'default'")
    oss_secret: str | None = Field("oss-credentials", description="Kubernetes Secret whose keys OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET, ... become the pods' env; None: no OSS credentials")
    legacy_pytorchjob: bool = Field(False, description="Submit a Training Operator v1 PyTorchJob instead of a Kubeflow Trainer v2 TrainJob")
    runtime: str = Field("torch-distributed", description="ClusterTrainingRuntime a TrainJob refers to")
    resources: dict[str, str] | None = Field(None, description="Per-node resources, e.g. {'cpu': '8', 'memory': '60Gi', 'nvidia.com/gpu': '1'}; override the instance type's")
    node_selector: dict[str, str] | None = Field(None, description="Node labels every pod must match, on top of the GPU-type label")
    poll_seconds: float = Field(15.0, gt=0, description="Seconds between status polls")
    timeout_seconds: float | None = Field(None, gt=0, description="Give up (and delete the job) after this long; None: wait for the job's own deadline")
    config_url: str | None = Field(None, description="Where the resolved config is written for the pods; default {output_dir}/job-config.json")
    name_prefix: str = Field("imlt", description="Prefix of the job's deterministic name")


def train_remote(inp: RemoteTrainInput) -> TrainOutput:
    """Train as a Kubernetes job and wait for it; the same TrainOutput as `train`."""
    from imlt.trainer.remote_train import submit_training

    return submit_training(inp)


# --- 4. evaluate -----------------------------------------------------------------------------------


class EvaluateInput(StepModel):
    model_dir: str = Field(..., description="Output of train (or a published version folder)")
    dataset_dir: str = Field(..., description="dataset_dir of read_data holding the query/gallery images")
    output_dir: str = Field(..., description="Folder for metrics.json and recall_at_k.png")
    ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = Field(64, gt=0)
    reader_threads: int = Field(2, ge=0)


class EvaluateOutput(StepModel):
    metrics_dir: str
    metrics: dict[str, float]


def evaluate(inp: EvaluateInput) -> EvaluateOutput:
    from imlt.trainer.evaluate import evaluate_model

    return evaluate_model(inp)


# --- 5. publish ------------------------------------------------------------------------------------


class PublishInput(StepModel):
    model_dir: str = Field(..., description="Output of train")
    metrics_dir: str | None = Field(None, description="Output of evaluate; its Recall@1 is checked against the gate")
    dataset_dir: str | None = Field(None, description="Train dataset, for the data summary in the model card")
    destination: str = Field(..., description="Folder (local or oss://) holding v1/, v2/, ... and `latest`")
    min_recall_at_1: float = Field(0.0, ge=0, le=1, description="Refuse to publish below this Recall@1")
    export_onnx: bool = True
    export_torchscript: bool = True


class PublishOutput(StepModel):
    published: bool
    version_dir: str | None
    version: int | None
    reason: str = ""


def publish(inp: PublishInput) -> PublishOutput:
    from imlt.trainer.publish import publish_model

    return publish_model(inp)


# --- import pretrained weights (once per model store, for clusters without internet) ---------------


class ImportWeightsInput(StepModel):
    name: str = Field(..., description="timm tag (resnet50.a1_in1k), a backbone name for its default tag (resnet_50), or hf-hub:org/repo")
    destination: str = Field(..., description="Folder (local or oss://) that receives model.safetensors and weights.json")
    backbone: str | None = Field(None, description="Backbone the weights must fit (default: from NAME; checked against a hub repo's config.json)")


class ImportWeightsOutput(StepModel):
    pretrained: str = Field(..., description="The value for model.pretrained: the destination folder")
    weights_url: str
    note_url: str
    tag: str | None = None
    repo: str | None = None
    revision: str | None = None
    sha256: str
    num_tensors: int
    reused: bool = Field(False, description="True when the destination already held these exact bytes")


def import_weights(inp: ImportWeightsInput) -> ImportWeightsOutput:
    """Fetch pretrained weights once through timm/huggingface_hub and store them for `pretrained: oss://...`."""
    from imlt.trainer.weights import import_weights as run

    return run(inp)
