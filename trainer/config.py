"""Every parameter of a training run, as pydantic models with the reference product's defaults.

The models are the boundary: the CLI, KFP components and Airflow operators all build a
`RunConfig` and nothing downstream reads a raw dict. Cross-field rules live here so a bad run
is refused before any data is read. A resolved config has a content hash; resume compares it.
"""

from __future__ import annotations

import hashlib
import json
import math
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that must not run; the message names the field and the allowed values."""


class ModelType(str, Enum):
    DATA_PARALLEL = "data-parallel"
    MODEL_PARALLEL = "model-parallel"


class DataFormat(str, Enum):
    IMAGE_LIST = "ClsSourceImageList"
    ITAG = "ClsSourceItag"


class LossName(str, Enum):
    AMSOFTMAX = "AMSoftmax"
    ARCFACE = "ArcFace"
    COSFACE = "CosFace"
    LARGE_MARGIN_SOFTMAX = "LargeMarginSoftmax"
    SPHEREFACE = "SphereFace"
    MODEL_PARALLEL_AMSOFTMAX = "ModelParallelAMSoftmax"
    MODEL_PARALLEL_SOFTMAX = "ModelParallelSoftmax"


MODEL_PARALLEL_LOSSES = {LossName.MODEL_PARALLEL_AMSOFTMAX, LossName.MODEL_PARALLEL_SOFTMAX}

# (margin, scale) of the reference component; ArcFace's margin is in degrees as in PML.
LOSS_DEFAULTS: dict[LossName, tuple[float, float]] = {
    LossName.AMSOFTMAX: (0.4, 30.0),
    LossName.ARCFACE: (28.6, 64.0),
    LossName.COSFACE: (0.35, 64.0),
    LossName.LARGE_MARGIN_SOFTMAX: (4.0, 1.0),
    LossName.SPHEREFACE: (4.0, 1.0),
    LossName.MODEL_PARALLEL_AMSOFTMAX: (0.4, 30.0),
    LossName.MODEL_PARALLEL_SOFTMAX: (0.0, 1.0),
}

# Losses whose logits are a fixed scale times a function of the cosine. SphereFace is one here: PML
# multiplies its logits by the feature norm, which the embedding model's L2 normalisation sets to 1,
# so its reference scale 1 would cap every logit at 1 (R@1 0.33 on unseen glyphs with SGD, 0.51 at
# the class-count scale). LargeMarginSoftmax also multiplies by the class centres' norms, and
# ModelParallelSoftmax is a linear classifier: their scale is learned, not set.
FIXED_SCALE_LOSSES = {
    LossName.AMSOFTMAX, LossName.ARCFACE, LossName.COSFACE, LossName.SPHEREFACE, LossName.MODEL_PARALLEL_AMSOFTMAX,
}
_FIXED_SCALE_NAMES = ", ".join(n.value for n in LossName if n in FIXED_SCALE_LOSSES)
_REFERENCE_SCALES = ", ".join(f"{n.value} {LOSS_DEFAULTS[n][1]:g}" for n in LossName if n in FIXED_SCALE_LOSSES)


def class_count_scale(num_classes: int) -> float:
    """AdaCos's fixed logit scale for C classes, sqrt(2) ln(C - 1) (Zhang et al. 2019), at least 1.

    The reference scales (30, 64) come from face recognition with tens of thousands of identities.
    On tens of classes they over-specialise the embedding: measured on the glyph task (resnet18
    from scratch, 60 classes, 150 AdamW steps, benchmarks.quality's data), a plain normalised
    softmax at scale 64 fits the training classes (loss 7.7 -> 2.9) while Recall@1 on the unseen
    classes falls to 0.05, against 0.42 at this scale (5.8); ArcFace 0.065 -> 0.42, AMSoftmax
    0.21 -> 0.45 at their reference margins. Neither BatchNorm statistics (0.058 with batch
    statistics) nor the neck (0.085 on the backbone's features) was the cause.
    """
    return max(1.0, math.sqrt(2.0) * math.log(max(num_classes - 1, 1)))


# The exact-search back ends the evaluate step accepts (trainer.search implements them).
SEARCH_BACKENDS = ("auto", "faiss", "int8", "torch")


class AmpDtype(str, Enum):
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class OptimizerName(str, Enum):
    SGD = "SGD"
    ADAMW = "AdamW"


class Scheduler(str, Enum):
    COSINE = "cosine"
    STEP = "step"
    CONSTANT = "constant"


class ComputeMode(str, Enum):
    STANDALONE = "standalone"
    DISTRIBUTED = "distributed"


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


# The reference's spellings -> timm model names and their pooled feature widths. The widths are
# checked against timm itself in tests/test_config.py, so this table cannot drift silently; it
# exists so that validating a config does not have to import torch and build a network.
BACKBONES: dict[str, tuple[str, int]] = {
    "resnet_50": ("resnet50", 2048),
    "resnet18": ("resnet18", 512),
    "resnet34": ("resnet34", 512),
    "resnet101": ("resnet101", 2048),
    "swint_tiny": ("swin_tiny_patch4_window7_224", 768),
    "swint_small": ("swin_small_patch4_window7_224", 768),
    "swint_base": ("swin_base_patch4_window7_224", 1024),
    "vit_tiny": ("vit_tiny_patch16_224", 192),
    "vit_small": ("vit_small_patch16_224", 384),
    "vit_base": ("vit_base_patch16_224", 768),
    "xcit_tiny": ("xcit_tiny_12_p16_224", 192),
    "xcit_small": ("xcit_small_12_p16_224", 384),
    "xcit_base": ("xcit_medium_24_p16_224", 512),
}


def timm_name(backbone: str) -> str:
    """The timm model name for a reference spelling; any other timm name passes through."""
    return BACKBONES[backbone][0] if backbone in BACKBONES else backbone


def backbone_feature_dim(backbone: str) -> int:
    """The pooled feature width of a backbone, from the table or, for other names, from timm."""
    if backbone in BACKBONES:
        return BACKBONES[backbone][1]
    import timm  # only for names outside the table

    if not timm.is_model(backbone):
        known = ", ".join(BACKBONES)
        raise ConfigError(
            f"model.backbone: unknown backbone {backbone!r}; use one of {known} or any timm model name"
        )
    with _meta_device():
        return int(timm.create_model(backbone, pretrained=False, num_classes=0).num_features)


class _meta_device:
    """Build a network without allocating its weights (only its shapes are needed)."""

    def __enter__(self) -> None:
        import torch

        self._ctx = torch.device("meta")
        self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


class _Section(BaseModel):
    # forbid: a typo in a config file is an error, not a silently new key
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)


class DataConfig(_Section):
    train_annotations: str | None = Field(None, description="Train annotation file (path or oss://); an upstream dataset wins")
    val_annotations: str | None = Field(None, description="Validation annotation file; an upstream dataset wins")
    data_root: str | None = Field(None, description="Root that relative image paths are joined to (default: the annotation file's folder)")
    data_format: DataFormat = Field(DataFormat.IMAGE_LIST, description="ClsSourceImageList or ClsSourceItag")
    delimiter: str = Field(" ", description="ImageList column delimiter")
    class_names: list[str] | None = Field(None, description="Class names in label order: a list, 'a,b,c', or a path to a file with one name a line")
    val_class_names: list[str] | None = Field(None, description="Class names of the val split (open-set val classes differ from train's); same forms as class_names")
    image_size: int = Field(224, gt=0, description="Square input size in pixels")
    reader_threads: int = Field(4, ge=0, description="DataLoader worker processes")

    @field_validator("class_names", "val_class_names", mode="before")
    @classmethod
    def _split_inline(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v] if looks_like_path(v) else [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("delimiter")
    @classmethod
    def _delimiter_nonempty(cls, v: str) -> str:
        if v == "":
            raise ValueError("delimiter must not be empty (use ' ' for whitespace)")
        return v


def looks_like_path(v: str) -> bool:
    return "," not in v and ("/" in v or v.endswith(".txt") or "://" in v)


class ModelConfig(_Section):
    backbone: str = Field("resnet_50", description="resnet_50, resnet18/34/101, swint_*, vit_*, xcit_* or any timm name")
    backbone_feature_dim: int | None = Field(None, gt=0, description="Must equal the backbone's output width; derived when omitted")
    feature_dim: int = Field(512, gt=0, description="Embedding (neck output) width")
    num_classes: int | None = Field(None, gt=0, description="Number of train classes; derived from the class list when omitted")
    pretrained: str | None = Field(
        None,
        description="Starting weights: `default` (the backbone's default timm tag), a timm tag (resnet50.a1_in1k), "
        "hf-hub:org/repo, or a local/oss:// file or import-weights folder; empty: random init. See docs/pretrained.md",
    )
    zero_init_last: bool | None = Field(
        None, description="From scratch: zero the last BatchNorm scale of each residual block (timm's default). "
        "Default: on for SGD, off for AdamW, which grows those scales by only about lr a step and so keeps the residual "
        "branches shut through a short run (ArcFace, resnet18 on 60 glyph classes, 150 steps, unseen-class R@1: AdamW "
        "0.28 on, 0.61 off; SGD 0.51 on, 0.32 off)",
    )

    @model_validator(mode="after")
    def _check_backbone_dim(self) -> "ModelConfig":
        real = backbone_feature_dim(self.backbone)
        if self.backbone_feature_dim is None:
            object.__setattr__(self, "backbone_feature_dim", real)
        elif self.backbone_feature_dim != real:
            raise ValueError(
                f"model.backbone_feature_dim={self.backbone_feature_dim} but backbone {self.backbone!r} "
                f"outputs {real} features; set it to {real} or omit it"
            )
        if self.pretrained is not None:
            from imlt.trainer.weight_specs import check_spec  # registry lookups only, never the network

            check_spec(self.pretrained, self.backbone, timm_name(self.backbone), self.backbone in BACKBONES)
        return self


class LossConfig(_Section):
    name: LossName = Field(LossName.AMSOFTMAX, description="Metric loss: " + ", ".join(l.value for l in LossName))
    margin: float | None = Field(None, description="Loss margin (defaults per loss: AMSoftmax 0.4, ArcFace 28.6 deg, ...)")
    scale: float | None = Field(
        None, gt=0, description=f"Logit scale; default: the class-count scale (see loss.auto_scale) for "
        f"{_FIXED_SCALE_NAMES}, the reference 1 for the others. The reference component's scales are {_REFERENCE_SCALES}"
    )
    auto_scale: bool | None = Field(
        None, description="Logit scale from the class count, sqrt(2) ln(C - 1) (AdaCos), for the fixed-scale losses "
        f"({_FIXED_SCALE_NAMES}); default: on unless loss.scale is set. "
        "The reference scales (30, 64) suit tens of thousands of classes and over-specialise the embedding on tens"
    )
    weight: float = Field(1.0, ge=0, le=1, description="Weight of the metric loss; 1 - weight goes to a plain softmax classifier")

    @model_validator(mode="after")
    def _fill_defaults(self) -> "LossConfig":
        margin, scale = LOSS_DEFAULTS[self.name]
        fixed_scale = self.name in FIXED_SCALE_LOSSES
        if self.auto_scale and self.scale is not None:
            raise ValueError(f"loss.auto_scale=true sets the scale from the class count; remove loss.scale={self.scale}")
        if self.auto_scale and not fixed_scale:
            raise ValueError(
                f"loss.auto_scale applies to losses with a fixed logit scale "
                f"({_FIXED_SCALE_NAMES}); {self.name.value} learns its scale "
                "through the norms of its class weights"
            )
        if self.auto_scale is None:  # resolved here, so the saved config says which scale trained
            object.__setattr__(self, "auto_scale", fixed_scale and self.scale is None)
        if self.margin is None:
            object.__setattr__(self, "margin", margin)
        if self.scale is None and not self.auto_scale:  # auto: the class count decides (losses.loss_scale)
            object.__setattr__(self, "scale", scale)
        return self


class OptimDefaults(NamedTuple):
    lr: float
    weight_decay: float
    warmup_epochs: int


# Defaults that follow the optimiser. SGD keeps the reference product's lr 0.1 and weight decay
# 5e-4, plus one warm-up epoch: from scratch at lr 0.1 the first full-size steps are the ones that
# hurt (Goyal et al.); on the glyph benchmark (3 seeds) it lifted LargeMarginSoftmax from 0.42 to
# 0.52 R@1 and left the other losses within their spread (benchmarks/RESULTS.md, quality_sgd).
# AdamW at lr 0.1 diverges and its decoupled decay wants a smaller coefficient, so it gets
# PyTorch's lr 1e-3, the 1e-4 decay of the demo's recipe, and no warm-up (its steps are already
# about lr in size from the first one).
OPTIM_DEFAULTS: dict[OptimizerName, OptimDefaults] = {
    OptimizerName.SGD: OptimDefaults(lr=0.1, weight_decay=5e-4, warmup_epochs=1),
    OptimizerName.ADAMW: OptimDefaults(lr=1e-3, weight_decay=1e-4, warmup_epochs=0),
}


def _per_optimiser(field: str) -> str:
    return "default per optimiser: " + ", ".join(f"{name.value} {getattr(d, field):g}" for name, d in OPTIM_DEFAULTS.items())


class OptimConfig(_Section):
    optimizer: OptimizerName = Field(OptimizerName.SGD, description="SGD or AdamW; the loss's own parameters (class centres) are trained too")
    lr: float | None = Field(None, gt=0, description=f"Peak learning rate ({_per_optimiser('lr')})")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (AdamW ignores it)")
    weight_decay: float | None = Field(
        None, ge=0, description=f"Weight decay, L2 for SGD, decoupled for AdamW ({_per_optimiser('weight_decay')})"
    )
    scheduler: Scheduler = Field(Scheduler.COSINE, description="Learning-rate schedule after warm-up: cosine, step or constant")
    warmup_epochs: int | None = Field(
        None, ge=0, description=f"Epochs of linear learning-rate warm-up ({_per_optimiser('warmup_epochs')})"
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> "OptimConfig":
        """Resolved here, so the config hash and the saved config carry the numbers actually used."""
        for name, value in OPTIM_DEFAULTS[self.optimizer]._asdict().items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        return self


class TrainConfig(_Section):
    batch_size: int = Field(32, gt=0, description="Global batch size")
    epochs: int = Field(10, gt=0, description="Number of epochs")
    checkpoint_every: int = Field(1, gt=0, description="Write a checkpoint every N epochs")
    checkpoint_dir: str | None = Field(
        None,
        description="Local or oss:// folder for training checkpoints (what resume reads); default: the output_dir's "
        "sibling `<output_dir>-checkpoints`, so the model folder holds only the model",
    )
    keep_checkpoints: int = Field(1, gt=0, description="Epoch checkpoints kept: the last N, plus the best epoch's")
    threads: int | None = Field(
        None, gt=0, description="torch intra-op threads per process; default: the CPUs this process may use "
        "(cgroup CPU limit, affinity) shared by the node's processes, minus data.reader_threads"
    )
    log_every_steps: int = Field(
        50, gt=0, description="When stderr is not a terminal (KFP, Airflow logs): a progress line every N steps or 30 s"
    )
    fp16: bool = Field(False, description="Mixed precision with loss scaling (CUDA only; checked by the training process on its device)")
    amp_dtype: AmpDtype = Field(
        AmpDtype.FLOAT16, description="With train.fp16: the autocast dtype, float16 (with loss scaling) or bfloat16 "
        "(no loss scaling; GPUs with bf16 support, Ampere or newer)"
    )
    channels_last: bool = Field(False, description="Model and batches in channels_last memory layout (faster convolutions on GPU tensor cores)")
    deterministic: bool = Field(
        True, description="On GPU: deterministic cuDNN kernels, so a resumed run matches an uninterrupted one bit for bit; "
        "false lets cuDNN autotune (faster, not reproducible)"
    )
    seed: int = Field(0, description="Random seed (data order, initialisation)")
    max_hours: float = Field(24.0, gt=0, le=24, description="Time limit; on reaching it: checkpoint, then stop")
    device: Device = Field(Device.AUTO, description="auto, cpu or cuda")
    m_per_class: int = Field(0, ge=0, description="If > 0, batches hold M images of each sampled class")
    validate_every: int = Field(
        1, gt=0, description="With a val split: measure val Recall@1 and MAP@R every N epochs (and after the last); "
        "the model written is the best epoch by val Recall@1"
    )
    early_stop_patience: int | None = Field(
        None, gt=0, description="With a val split: stop after N validations in a row without a better val Recall@1; "
        "default: off"
    )
    val_exact_max_samples: int = Field(
        100_000, gt=0, description="Val splits up to this many images are measured exactly; above, on a seeded "
        "random sample of queries (the evaluate step's sampled mode; the log states the sample)"
    )


class InstanceType(BaseModel):
    cpu: int
    memory_gb: int
    gpus: int
    accelerator: str


# Alibaba ECS GPU instance types the reference lists, as Kubernetes requests.
INSTANCE_TYPES: dict[str, InstanceType] = {
    "ecs.gn5-c8g1.2xlarge": InstanceType(cpu=8, memory_gb=60, gpus=1, accelerator="nvidia-tesla-p100"),
    "ecs.gn5-c4g1.xlarge": InstanceType(cpu=4, memory_gb=30, gpus=1, accelerator="nvidia-tesla-p100"),
    "ecs.gn5-c8g1.4xlarge": InstanceType(cpu=16, memory_gb=120, gpus=2, accelerator="nvidia-tesla-p100"),
    "ecs.gn6v-c8g1.2xlarge": InstanceType(cpu=8, memory_gb=32, gpus=1, accelerator="nvidia-tesla-v100"),
    "ecs.gn6v-c8g1.8xlarge": InstanceType(cpu=32, memory_gb=128, gpus=4, accelerator="nvidia-tesla-v100"),
    "ecs.gn6v-c8g1.16xlarge": InstanceType(cpu=64, memory_gb=256, gpus=8, accelerator="nvidia-tesla-v100"),
    "ecs.gn6i-c4g1.xlarge": InstanceType(cpu=4, memory_gb=15, gpus=1, accelerator="nvidia-tesla-t4"),
    "ecs.gn7i-c8g1.2xlarge": InstanceType(cpu=8, memory_gb=30, gpus=1, accelerator="nvidia-a10"),
}


class ComputeConfig(_Section):
    model_type: ModelType = Field(ModelType.DATA_PARALLEL, description="data-parallel or model-parallel (classifier sharded by class)")
    mode: ComputeMode = Field(ComputeMode.STANDALONE, description="standalone (one node) or distributed (several nodes)")
    nnodes: int = Field(1, gt=0, description="Number of nodes (workers)")
    nproc_per_node: int = Field(1, gt=0, description="Processes (GPUs) per node")
    instance_type: str | None = Field(None, description="e.g. ecs.gn5-c8g1.2xlarge; maps to CPU/memory/GPU requests")
    gpu_type: str | None = Field(None, description="Accelerator type, e.g. nvidia-tesla-v100 (overrides the instance type's)")

    @model_validator(mode="after")
    def _check(self) -> "ComputeConfig":
        if self.mode == ComputeMode.STANDALONE and self.nnodes != 1:
            raise ValueError(f"compute.nnodes={self.nnodes} needs compute.mode=distributed (standalone is one node)")
        if self.instance_type is not None and self.instance_type not in INSTANCE_TYPES:
            raise ValueError(
                f"compute.instance_type={self.instance_type!r} is unknown; known: {', '.join(INSTANCE_TYPES)} "
                "(or leave it empty and set gpu_type)"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


class RunConfig(_Section):
    """One training run. Immutable after submission: resume refuses a changed hash."""

    output_dir: str = Field(..., description="Local path or oss:// folder for checkpoints and the trained model")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        loss, model_type = self.loss.name, self.compute.model_type
        if loss in MODEL_PARALLEL_LOSSES and model_type != ModelType.MODEL_PARALLEL:
            raise ValueError(
                f"loss.name={loss.value} needs compute.model_type=model-parallel "
                f"(got {model_type.value}); data-parallel losses: "
                + ", ".join(l.value for l in LossName if l not in MODEL_PARALLEL_LOSSES)
            )
        if model_type == ModelType.MODEL_PARALLEL and loss not in MODEL_PARALLEL_LOSSES:
            raise ValueError(
                f"compute.model_type=model-parallel needs loss.name in "
                f"{', '.join(l.value for l in MODEL_PARALLEL_LOSSES)} (got {loss.value})"
            )
        names = self.data.class_names
        if names is not None and not (len(names) == 1 and looks_like_path(names[0])):
            if self.model.num_classes is not None and self.model.num_classes != len(names):
                raise ValueError(
                    f"model.num_classes={self.model.num_classes} but data.class_names lists {len(names)} classes"
                )
        if self.model.zero_init_last is None:  # resolved here, so the saved config says which init trained
            object.__setattr__(self.model, "zero_init_last", self.optim.optimizer == OptimizerName.SGD)
        # Host-independent on purpose: whether this host has a GPU is the training process's
        # question (trainer.device.check_fp16); a CPU launcher or evaluate pod parses the same config.
        if self.train.fp16 and self.train.device == Device.CPU:
            raise ValueError(
                "train.fp16=true needs a CUDA device, but train.device=cpu; set train.fp16=false, "
                "or train.device to auto or cuda"
            )
        return self

    def config_hash(self) -> str:
        """Content hash of the resolved config, stable across key order and processes."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()[:16]

    def dump(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json"), "config_hash": self.config_hash()}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def load_config(source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML/JSON file (or dict), apply dotted overrides (`train.epochs`), validate.

    Raises ConfigError with one line per problem, each naming its field.
    """
    if isinstance(source, dict):
        raw = dict(source)
    else:
        from imlt.trainer import storage

        text = storage.read_text(str(source))
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a config must be a mapping of sections, got {type(raw).__name__}")
        raw.pop("config_hash", None)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue  # unset CLI flags never override the file
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "enum":
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(msg if msg.startswith(loc.split(".")[0]) else f"{loc}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ; resume uses it to say what changed."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name}: {va!r} -> {vb!r}")
    return out
