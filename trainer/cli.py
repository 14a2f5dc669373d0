"""`imlt`: one subcommand per step, plus `run` (all five from a config file) and `demo`.

Each subcommand builds the step's pydantic input and calls trainer.steps; expected failures
(bad config, bad data, storage errors) print one clear message and exit non-zero, without a
traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from imlt.trainer import steps
from imlt.trainer.config import ConfigError, DataFormat, load_config

app = typer.Typer(
    name="imlt",
    help="Image metric-learning trainer: read data, validate, train, evaluate Recall@K, publish.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

# exit codes: 2 = bad config or arguments, 1 = the step failed on its input or storage
EXIT_CONFIG, EXIT_FAILED = 2, 1


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging")] = False) -> None:
    """Log to stderr through rich: resume notices, time limits, retries."""
    import logging

    from rich.logging import RichHandler

    ours = logging.getLogger("imlt.trainer")
    if not any(isinstance(h, RichHandler) for h in ours.handlers):
        ours.addHandler(RichHandler(console=console, show_path=False))
    # our progress at INFO; libraries (oss2 logs every request, the ONNX exporter every pass) keep
    # their own levels unless --verbose. Root handlers (pytest's, Airflow's) are left alone.
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        logging.basicConfig(level=logging.DEBUG, handlers=[RichHandler(console=console, show_path=False)])


def _expected_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from imlt.trainer.errors import DataError
    from imlt.trainer.storage import StorageError

    return (DataError, StorageError, ValidationError, ValueError, FileNotFoundError, RuntimeError)


def _call(fn: Any, *args: Any) -> Any:
    """Run a step; expected failures become one message and an exit code."""
    try:
        return fn(*args)
    except ConfigError as e:
        console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None
    except _expected_errors() as e:
        console.print(f"[bold red]error:[/] {type(e).__name__}: {e}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None


def _emit(model: Any) -> None:
    out.print_json(model.model_dump_json())


@app.command("read-data")
def read_data(
    output_dir: Annotated[str, typer.Option(help="Folder (local or oss://) for the dataset")],
    annotations: Annotated[Optional[str], typer.Option(help="Annotation file (local or oss://)")] = None,
    upstream_annotations: Annotated[Optional[str], typer.Option(help="An upstream step's annotation file; wins over --annotations")] = None,
    data_format: Annotated[DataFormat, typer.Option(help="Annotation format")] = DataFormat.IMAGE_LIST,
    data_root: Annotated[Optional[str], typer.Option(help="Root for relative image paths (default: the annotation file's folder)")] = None,
    delimiter: Annotated[str, typer.Option(help="ImageList column delimiter")] = " ",
    class_names: Annotated[Optional[str], typer.Option(help="Class names 'a,b,c' or a class-list file")] = None,
    cache_images: Annotated[bool, typer.Option(help="Copy images into OUTPUT_DIR/images")] = False,
    multi_label: Annotated[bool, typer.Option(help="Accept iTAG multi-choice answers (several labels per image)")] = False,
    split: Annotated[str, typer.Option(help="Split name recorded in the summary")] = "train",
) -> None:
    """Parse an annotation file (ClsSourceImageList or ClsSourceItag) into a dataset folder."""
    _emit(_call(steps.read_data, _build(steps.ReadDataInput, locals())))


@app.command()
def validate(
    dataset_dir: Annotated[str, typer.Option(help="A read-data output folder")],
    output_dir: Annotated[str, typer.Option(help="Folder for validation.json and report.html")],
    min_images_per_class: Annotated[int, typer.Option(help="Fewer images in a class is fatal")] = 2,
    imbalance_ratio: Annotated[float, typer.Option(help="Warn when largest/smallest class exceeds this")] = 10.0,
    workers: Annotated[int, typer.Option(help="Threads decoding images")] = 4,
) -> None:
    """Decode every image and check labels; exit 1 naming file:line of the first problems."""
    _emit(_call(steps.validate, _build(steps.ValidateInput, locals())))


@app.command()
def train(
    ctx: typer.Context,
    # a str, not a Path: Path("oss://b/k") collapses to "oss:/b/k"
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML/JSON config, local or oss:// (flags below override it)")] = None,
    train_dataset: Annotated[Optional[str], typer.Option(help="read-data output for the train split")] = None,
    val_dataset: Annotated[Optional[str], typer.Option(help="read-data output for the val split")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="Model folder (local or oss://): checkpoints, weights, history")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="resnet_50, resnet18, swint_tiny, vit_small, ... or any timm name")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size in pixels")] = None,
    feature_dim: Annotated[Optional[int], typer.Option(help="Embedding width")] = None,
    backbone_feature_dim: Annotated[Optional[int], typer.Option(help="Must equal the backbone's output width")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Must match the class list")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="default, a timm tag (resnet50.a1_in1k), hf-hub:org/repo, or a local/oss:// file")] = None,
    loss: Annotated[Optional[str], typer.Option(help="AMSoftmax, ArcFace, CosFace, LargeMarginSoftmax, SphereFace, ModelParallelAMSoftmax, ModelParallelSoftmax")] = None,
    margin: Annotated[Optional[float], typer.Option(help="Loss margin")] = None,
    scale: Annotated[Optional[float], typer.Option(help="Loss scale")] = None,
    loss_weight: Annotated[Optional[float], typer.Option(help="Metric-loss weight (the rest goes to softmax CE)")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="SGD or AdamW")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N epochs")] = None,
    reader_threads: Annotated[Optional[int], typer.Option(help="DataLoader workers")] = None,
    fp16: Annotated[Optional[bool], typer.Option(help="Mixed precision (CUDA)")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed")] = None,
    max_hours: Annotated[Optional[float], typer.Option(help="Time limit (<= 24): checkpoint and stop")] = None,
    model_type: Annotated[Optional[str], typer.Option(help="data-parallel or model-parallel")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the last checkpoint in the output dir")] = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any field as section.key=value (YAML value)")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(help="Processes (GPUs) on this node; > 1 starts torchrun (compute.nproc_per_node)")] = None,
    nnodes: Annotated[Optional[int], typer.Option(help="Nodes; > 1 needs compute.mode=distributed and --master-addr (compute.nnodes)")] = None,
    node_rank: Annotated[Optional[int], typer.Option(help="This node's rank, 0..nnodes-1 (multi-node launch)")] = None,
    master_addr: Annotated[Optional[str], typer.Option(help="Address of node 0 (multi-node launch)")] = None,
    master_port: Annotated[Optional[int], typer.Option(help="Rendezvous port on node 0 (multi-node launch; default 29500)")] = None,
) -> None:
    """Train a metric model on a read-data dataset folder; several processes run through torchrun."""
    from imlt.trainer import launch

    overrides = {
        "output_dir": output_dir, "model.backbone": backbone, "data.image_size": image_size,
        "model.feature_dim": feature_dim, "model.backbone_feature_dim": backbone_feature_dim,
        "model.num_classes": num_classes, "model.pretrained": pretrained, "loss.name": loss,
        "loss.margin": margin, "loss.scale": scale, "loss.weight": loss_weight, "optim.optimizer": optimizer,
        "optim.lr": lr, "train.batch_size": batch_size, "train.epochs": epochs,
        "train.checkpoint_every": checkpoint_every, "data.reader_threads": reader_threads, "train.fp16": fp16,
        "train.device": device, "train.seed": seed, "train.max_hours": max_hours, "compute.model_type": model_type,
        "compute.nproc_per_node": nproc_per_node, "compute.nnodes": nnodes,
        **_parse_sets(set_ or []),
    }
    cfg = _call(load_config, str(config) if config else {}, overrides)
    if launch.needs_launch(cfg):  # the same command again, in nnodes x nproc_per_node processes
        code = _call(lambda: launch.launch_train(cfg, launch.cli_args(ctx), node_rank=node_rank,
                                                 master_addr=master_addr, master_port=master_port))
        raise typer.Exit(code)
    result = _call(steps.train, steps.TrainInput(config=cfg, train_dataset=train_dataset, val_dataset=val_dataset, resume=resume))
    if launch.is_main_process():
        _emit(result)


@app.command()
def evaluate(
    model_dir: Annotated[str, typer.Option(help="A train output folder or a published version")],
    dataset_dir: Annotated[str, typer.Option(help="read-data output with the query/gallery images")],
    output_dir: Annotated[str, typer.Option(help="Folder for metrics.json and the Recall@K plot")],
    batch_size: Annotated[int, typer.Option(help="Embedding batch size")] = 64,
    reader_threads: Annotated[int, typer.Option(help="DataLoader workers")] = 2,
) -> None:
    """Leave-one-out cosine Recall@1/2/4/8 and MAP@R (exact, faiss)."""
    _emit(_call(steps.evaluate, _build(steps.EvaluateInput, locals())))


@app.command()
def publish(
    model_dir: Annotated[str, typer.Option(help="A train output folder")],
    destination: Annotated[str, typer.Option(help="Folder (local or oss://) holding vN/ and `latest`")],
    metrics_dir: Annotated[Optional[str], typer.Option(help="An evaluate output folder (for the gate and the model card)")] = None,
    dataset_dir: Annotated[Optional[str], typer.Option(help="The train dataset (for the model card)")] = None,
    min_recall_at_1: Annotated[float, typer.Option(help="Refuse to publish below this Recall@1")] = 0.0,
) -> None:
    """Export weights, TorchScript and ONNX; publish DEST/vN, then move `latest`."""
    result = _call(steps.publish, _build(steps.PublishInput, locals()))
    _emit(result)
    if not result.published:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def run(config: Annotated[str, typer.Argument(help="Run file: training config sections + `workdir` + `publish`")]) -> None:
    """All five steps from one run file."""
    from imlt.trainer.pipeline import PipelineConfig, run_pipeline

    pc = _call(PipelineConfig.from_file, config)
    result = _call(run_pipeline, pc, lambda msg: console.print(f"[bold cyan]{msg}[/]"))
    _emit(result.published)


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Folder for the generated data, the model and the published versions")] = Path("demo-output"),
    epochs: Annotated[int, typer.Option(help="Training epochs")] = 10,
    backbone: Annotated[str, typer.Option(help="Backbone")] = "resnet18",
    seed: Annotated[int, typer.Option(help="Seed for data and training")] = 0,
) -> None:
    """Open-set glyph retrieval end to end: generate data, read, validate, train, evaluate, publish."""
    from imlt.trainer.demo import run_demo

    _call(run_demo, output, epochs, backbone, seed, out)


@app.command("k8s-job")
def k8s_job(
    config: Annotated[str, typer.Argument(help="Training config (YAML/JSON, local or oss://) the pods will read")],
    legacy_pytorchjob: Annotated[bool, typer.Option(help="Render a Training Operator v1 PyTorchJob instead of a Kubeflow Trainer TrainJob")] = False,
    train_dataset: Annotated[Optional[str], typer.Option(help="read-data output for the train split (oss://)")] = None,
    val_dataset: Annotated[Optional[str], typer.Option(help="read-data output for the val split (oss://)")] = None,
    image: Annotated[Optional[str], typer.Option(help="Trainer image (default: the project image of this version)")] = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace")] = "default",
    oss_secret: Annotated[str, typer.Option(help="Secret holding access_key_id / access_key_secret / endpoint")] = "oss-credentials",
) -> None:
    """Print the Kubernetes manifest that runs `imlt train` on CONFIG with torchrun on every node."""
    from imlt.trainer.k8s import render_for_cli

    extra = [a for flag, v in (("--train-dataset", train_dataset), ("--val-dataset", val_dataset)) if v for a in (flag, v)]
    out.print(_call(lambda: render_for_cli(config, legacy_pytorchjob, image=image, namespace=namespace,
                                           oss_secret=oss_secret, extra_args=extra)), markup=False, highlight=False)


@app.command("import-weights")
def import_weights(
    name: Annotated[str, typer.Argument(help="timm tag (resnet50.a1_in1k), backbone name for its default tag (resnet_50), or hf-hub:org/repo")],
    to: Annotated[str, typer.Option("--to", help="Folder (local or oss://) for model.safetensors + weights.json; then train with pretrained: FOLDER")],
    backbone: Annotated[Optional[str], typer.Option(help="Backbone the weights must fit (default: from NAME)")] = None,
) -> None:
    """Fetch pretrained weights once (Hugging Face cache, HF_ENDPOINT mirror) into a model store, for clusters without internet."""
    _emit(_call(steps.import_weights, _build(steps.ImportWeightsInput, {"name": name, "destination": to, "backbone": backbone})))


def _build(model: type, params: dict[str, Any]) -> Any:
    try:
        return model(**params)
    except Exception as e:  # pydantic ValidationError: a bad flag value
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            from imlt.trainer.config import format_validation_error

            console.print(f"[bold red]error:[/] {format_validation_error(e)}", highlight=False)
            raise typer.Exit(EXIT_CONFIG) from None
        raise


def _parse_sets(items: list[str]) -> dict[str, Any]:
    import yaml

    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            console.print(f"[bold red]error:[/] --set {item!r}: expected section.key=value")
            raise typer.Exit(EXIT_CONFIG)
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
