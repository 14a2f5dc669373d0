"""The contracts of the pipeline steps: one pydantic input and output model per step.

These models are what every adapter (CLI, KFP component, Airflow operator) builds and what
every step implementation (data.reader, data.validation, engine, evaluate, publish,
remote_train) receives. They live apart from trainer.steps and import only the config, so an
implementation module can import its contract without importing the step registry, which in
turn imports the implementations: no cycle, not even through function-level imports.

Each field's default and description are written here once; the adapters derive their
parameters, defaults and help text from these models and from RunConfig.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field

from imlt.trainer.config import SEARCH_BACKENDS, DataFormat, RunConfig


class StepModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- 1. read data ------------------------------------------------------------------------------


class ReadDataInput(StepModel):
    output_dir: str = Field(..., description="Folder (local or oss://) that receives the dataset")
    annotations: str | None = Field(None, description="Annotation file (local or oss://)")
    upstream_annotations: str | None = Field(None, description="Annotation file from an upstream step; wins over `annotations`")
    data_format: DataFormat = Field(DataFormat.IMAGE_LIST, description="ClsSourceImageList (text lines \"path label [label...]\") or ClsSourceItag (iTAG JSON Lines export)")
    data_root: str | None = Field(None, description="Root for relative image paths (default: the annotation file's folder)")
    delimiter: str = Field(" ", description="Column delimiter of ClsSourceImageList lines")
    class_names: list[str] | str | None = Field(None, description="Class names in label order: list, 'a,b,c' or a file path")
    cache_images: bool = Field(False, description="Also copy the images into output_dir/images (a local cache)")
    multi_label: bool = Field(False, description="Accept several labels per image from iTAG multi-choice answers (ImageList lines may always list several); the first label is the primary one")
    split: str = Field("train", description="Name recorded in the summary (train, val, ...)")


class ReadDataOutput(StepModel):
    dataset_dir: str
    num_samples: int
    num_classes: int
    classes: list[str]


# --- 2. validate ---------------------------------------------------------------------------------


class ValidateInput(StepModel):
    dataset_dir: str = Field(..., description="Output of read_data")
    output_dir: str = Field(..., description="Folder that receives validation.json and report.html")
    min_images_per_class: int = Field(2, ge=1, description="A class with fewer images is a fatal error (retrieval needs pairs)")
    imbalance_ratio: float = Field(10.0, gt=1, description="Warn when the largest class is this many times the smallest")
    workers: int = Field(4, ge=1, description="Threads that decode images")
    max_image_pixels: int = Field(50_000_000, gt=0, description="Refuse images above this many pixels")


class ValidateOutput(StepModel):
    validation_dir: str
    ok: bool
    num_errors: int
    num_warnings: int
    report_html: str


# --- 3. train --------------------------------------------------------------------------------------


class TrainInput(StepModel):
    config: RunConfig = Field(..., description="The training run's parameters")
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


class RemoteTrainInput(StepModel):
    """Train as a Kubernetes job (Kubeflow TrainJob, or a legacy PyTorchJob) instead of in this process.

    The pods read the resolved config from `config_url` and write the model to
    config.output_dir, so both (and the datasets) must be URLs the pods can reach: oss:// in
    practice. Fields after the first four only shape the job.
    """

    config: RunConfig = Field(..., description="The training run's parameters")
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
    poll_seconds: float = Field(30.0, gt=0, description="Seconds between status polls")
    timeout_seconds: float | None = Field(None, gt=0, description="Give up (and delete the job) after this long; None: wait for the job's own deadline")
    config_url: str | None = Field(None, description="Where the resolved config is written for the pods; default {output_dir}/job-config.json")
    name_prefix: str = Field("imlt", description="Prefix of the job's deterministic name")


# --- 4. evaluate -----------------------------------------------------------------------------------


class EvaluateInput(StepModel):
    model_dir: str = Field(..., description="Output of train (or a published version folder)")
    dataset_dir: str = Field(..., description="dataset_dir of read_data holding the query/gallery images")
    output_dir: str = Field(..., description="Folder for metrics.json and recall_at_k.png")
    ks: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], description="The K values of Recall@K")
    batch_size: int = Field(64, gt=0, description="Images per embedding batch")
    reader_threads: int = Field(2, ge=0, description="DataLoader worker processes")
    # how to evaluate (trainer.retrieval.EvaluationSettings): exact up to a size, sampled queries above
    eval_mode: str = Field("auto", pattern="^(auto|exact|sampled)$",
                           description="auto: exact up to exact_max_samples images, else sampled queries; or force exact/sampled")
    exact_max_samples: int = Field(100_000, ge=1, description="Largest set evaluated exactly in auto mode")
    sample_queries: int | None = Field(None, ge=1, description="Fixed number of sampled queries (default: sized for target_half_width)")
    target_half_width: float = Field(0.005, gt=0, lt=0.5, description="Recall@1 95% interval half-width the sample is sized for")
    sample_seed: int = Field(0, description="Seed of the query sample")
    search_backend: str = Field("auto", pattern=f"^({'|'.join(SEARCH_BACKENDS)})$",
                                description="Exact search: auto (int8 candidates re-ranked in fp32 on the CPU for large sets, "
                                            "else faiss; torch on a GPU), or force faiss, int8 or torch; all give the same neighbours")


class EvaluateOutput(StepModel):
    metrics_dir: str
    metrics: dict[str, float]
    evaluation: dict[str, Any] = Field(default_factory=dict, description="Method, query counts, seed, 95% intervals")


# --- 5. publish ------------------------------------------------------------------------------------


class PublishInput(StepModel):
    model_dir: str = Field(..., description="Output of train")
    metrics_dir: str | None = Field(None, description="Output of evaluate; its Recall@1 is checked against the gate")
    dataset_dir: str | None = Field(None, description="Train dataset, for the data summary in the model card")
    destination: str = Field(..., description="Folder (local or oss://) holding v1/, v2/, ... and `latest`")
    min_recall_at_1: float = Field(0.0, ge=0, le=1, description="Refuse to publish below this Recall@1")
    export_onnx: bool = Field(True, description="Also export ONNX (dynamic batch)")
    export_torchscript: bool = Field(True, description="Also export TorchScript")


class PublishOutput(StepModel):
    published: bool
    version_dir: str | None
    version: int | None
    reason: str = ""


# --- model import ----------------------------------------------------------------------------------


class ImportModelInput(StepModel):
    model_url: str = Field(..., description="A published version folder (DEST/vN) or a train output folder, local or oss://")
    output_dir: str = Field(..., description="Folder that receives the copy")


class ImportModelOutput(StepModel):
    model_dir: str


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



# --- parameters as the adapters see them ------------------------------------------------------------
# KFP inputs, Airflow operator arguments and CLI options are flat names; these helpers derive
# them (type, default, description) from the models above and from RunConfig, so that an
# adapter never writes a parameter, its default or its help text a second time.

# Field paths whose leaf name alone would be ambiguous or unclear as a flat parameter name.
RENAMES = {"loss.name": "loss", "loss.weight": "loss_weight", "compute.mode": "compute_mode"}


@dataclass(frozen=True)
class Parameter:
    """One flat parameter of an adapter, for one model field (`path`, dotted for RunConfig)."""

    name: str
    path: str
    kind: Any  # str, int, float, bool, list[int], dict: what an adapter accepts
    default: Any  # in the adapters' spelling (an enum's value); None: unset, derived or the step's choice
    description: str
    required: bool
    nullable: bool  # None is a meaningful value (derive it, or "none")
    zero_allowed: bool = True  # 0 passes the field's bounds

    @property
    def zero_is_unset(self) -> bool:
        """A nullable int that cannot be 0: an adapter that cannot pass None (kfp.local) spells None as 0."""
        return self.kind is int and self.nullable and not self.zero_allowed


def _adapter_kind(annotation: Any) -> tuple[Any, bool]:
    """The type an adapter accepts for a field, and whether None is allowed."""
    nullable = False
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        nullable = type(None) in args
        rest = [a for a in args if a is not type(None)]
        annotation = str if str in rest else rest[0]  # `list[str] | str`: the string form ("a,b,c" or a file)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return str, nullable
    if get_origin(annotation) is list:
        # a list of names travels as "a,b,c" (or a file path), which the models split
        return (str if get_args(annotation)[0] is str else annotation), nullable
    if get_origin(annotation) is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return dict, nullable
    return annotation, nullable


def _zero_allowed(constraints: list[Any]) -> bool:
    """Whether 0 passes a field's gt/ge bounds (pydantic keeps them as annotated_types objects)."""
    for c in constraints:
        if getattr(c, "gt", None) is not None and not 0 > c.gt:
            return False
        if getattr(c, "ge", None) is not None and not 0 >= c.ge:
            return False
    return True


def _spelling(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def model_parameters(model: type[BaseModel], exclude: Iterable[str] = (), prefix: str = "",
                     flatten: bool = True) -> list[Parameter]:
    """The fields of a model as flat parameters, sections of RunConfig flattened (`optim.lr` -> `lr`).

    flatten=False keeps a nested model (a step input's `config`) as one parameter.
    """
    out: list[Parameter] = []
    skip = set(exclude)
    for name, field in model.model_fields.items():
        path = prefix + name
        if path in skip:
            continue
        if flatten and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += model_parameters(field.annotation, skip, path + ".")
            continue
        kind, nullable = _adapter_kind(field.annotation)
        required = field.is_required()
        default = None if required else _spelling(field.get_default(call_default_factory=True))
        if isinstance(default, list):
            default = [_spelling(v) for v in default]
        out.append(Parameter(RENAMES.get(path, name), path, kind, default, field.description or "", required, nullable,
                             _zero_allowed(field.metadata)))
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:  # a new field whose leaf name clashes: give it an entry in RENAMES
        raise ValueError(f"{model.__name__}: flat parameter names clash: {dupes}; add them to RENAMES")
    return out


# RunConfig fields that describe how annotations are read: the read_data step's inputs in every
# adapter; train receives a dataset folder already read, so they are not train parameters there.
READ_SIDE_FIELDS = ("data.train_annotations", "data.val_annotations", "data.data_root", "data.data_format", "data.delimiter")


def config_parameters(exclude: Iterable[str] = ()) -> list[Parameter]:
    """Every RunConfig field as a flat training parameter (output_dir and the read side excluded)."""
    return model_parameters(RunConfig, ("output_dir", *READ_SIDE_FIELDS, *exclude))


def overrides_from(params: list[Parameter], values: dict[str, Any]) -> dict[str, Any]:
    """{field path: value} for the parameters given a value (None: not given, the default applies)."""
    return {p.path: values[p.name] for p in params if values.get(p.name) is not None}
