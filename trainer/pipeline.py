"""The five steps chained in one process: what `imlt run CONFIG` and `imlt demo` execute.

KFP and Airflow chain the same steps across pods and tasks; this is the single-machine path,
with the same folders between steps so any step's output can be inspected or reused.
"""

from __future__ import annotations

from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imlt.trainer import steps, storage
from imlt.trainer.config import ConfigError, RunConfig, format_validation_error, validate_config


class PublishSettings(BaseModel):
    """The run file's `publish` section."""

    model_config = ConfigDict(extra="forbid")

    destination: str = Field(..., description="Folder (local or oss://) holding v1/, v2/, ... and `latest`")
    min_recall_at_1: float = Field(0.0, ge=0, le=1, description="Refuse to publish below this Recall@1 on the val split")


class PipelineConfig(BaseModel):
    """A run file: the training config plus where intermediate folders and the model go."""

    model_config = ConfigDict(extra="forbid")

    workdir: str = Field(..., description="Folder for the datasets, validation reports and metrics between steps")
    run: RunConfig
    publish: PublishSettings

    @classmethod
    def from_file(cls, url: str) -> "PipelineConfig":
        """Read and check a run file; every problem is a ConfigError naming the file and the field."""
        try:
            raw = yaml.safe_load(storage.read_text(url))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{url}{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{url}: a run file is a mapping of sections (workdir, publish, data, model, loss, "
                              f"optim, train, compute), got {type(raw).__name__}")
        for key in ("workdir", "publish"):
            if key not in raw:
                what = {"workdir": cls.model_fields["workdir"].description,
                        "publish": "`destination:` (and optionally `min_recall_at_1:`)"}[key]
                raise ConfigError(f"{url}: `{key}` is missing; add a top-level `{key}:` section: {what}")
        workdir, publish = raw.pop("workdir"), raw.pop("publish")
        if not isinstance(workdir, str) or not workdir:
            raise ConfigError(f"{url}: workdir: expected a folder (local path or oss://), got {workdir!r}")
        if not isinstance(publish, dict):
            raise ConfigError(f"{url}: publish: expected a section with `destination:` (and optionally "
                              f"`min_recall_at_1:`), got {publish!r}")
        raw.setdefault("output_dir", storage.join(workdir, "model"))
        try:
            settings = PublishSettings.model_validate(publish)
        except ValidationError as e:
            raise ConfigError(f"{url}: " + format_validation_error(e).replace("\n  ", "\n  publish.")) from None
        try:
            run = validate_config(raw)
        except ConfigError as e:
            raise ConfigError(f"{url}: {e}") from None
        return cls(workdir=workdir, run=run, publish=settings)


class PipelineResult(BaseModel):
    train_dataset: steps.ReadDataOutput
    val_dataset: steps.ReadDataOutput | None
    trained: steps.TrainOutput
    evaluation: steps.EvaluateOutput | None
    published: steps.PublishOutput


Announce = Callable[[str], Any]


def run_pipeline(pc: PipelineConfig, announce: Announce = print, *, resume: bool = True) -> PipelineResult:
    """read -> validate -> train -> evaluate -> publish; each step raises on failure.

    With `resume`, training continues from a checkpoint of the same config in the model folder's
    checkpoints and refuses one of another config; without, it starts over.
    """
    cfg, work = pc.run, pc.workdir
    data = cfg.data
    datasets: dict[str, steps.ReadDataOutput] = {}
    for split, ann in (("train", data.train_annotations), ("val", data.val_annotations)):
        if ann is None and split == "val":
            continue
        announce(f"[1/5] read {split} annotations")
        datasets[split] = steps.read_data(steps.ReadDataInput(
            output_dir=storage.join(work, "datasets", split), annotations=ann, data_format=data.data_format,
            data_root=data.data_root, delimiter=data.delimiter,
            class_names=data.class_names if split == "train" else data.val_class_names, split=split,
        ))
        announce(f"[2/5] validate {split}: {datasets[split].num_samples} images, {datasets[split].num_classes} classes")
        steps.validate(steps.ValidateInput(
            dataset_dir=datasets[split].dataset_dir, output_dir=storage.join(work, "validation", split),
            workers=max(1, data.reader_threads),
        ))
    val = datasets.get("val")
    announce(f"[3/5] train {cfg.model.backbone} + {cfg.loss.name.value} for {cfg.train.epochs} epochs")
    trained = steps.train(steps.TrainInput(
        config=cfg, train_dataset=datasets["train"].dataset_dir, val_dataset=val.dataset_dir if val else None,
        resume=resume,
    ))
    evaluation = None
    if val is not None:
        announce("[4/5] evaluate on the val split")
        evaluation = steps.evaluate(steps.EvaluateInput(
            model_dir=trained.model_dir, dataset_dir=val.dataset_dir, output_dir=storage.join(work, "metrics"),
            reader_threads=data.reader_threads,
        ))
    announce(f"[5/5] publish to {pc.publish.destination}")
    published = steps.publish(steps.PublishInput(
        model_dir=trained.model_dir, metrics_dir=evaluation.metrics_dir if evaluation else None,
        dataset_dir=datasets["train"].dataset_dir, destination=pc.publish.destination,
        min_recall_at_1=pc.publish.min_recall_at_1,
    ))
    return PipelineResult(train_dataset=datasets["train"], val_dataset=val, trained=trained,
                          evaluation=evaluation, published=published)
