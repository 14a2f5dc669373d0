"""`imlt`: one subcommand per step, plus `run` (all five from a config file) and `demo`.

Each subcommand builds the step's pydantic input and calls trainer.steps; expected failures
(bad config, bad data, storage errors) print one clear message and exit non-zero, without a
traceback.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from imlt.trainer import steps, storage
from imlt.trainer.config import ConfigError, load_config
from imlt.trainer.step_models import Parameter, config_parameters, model_parameters, overrides_from

app = typer.Typer(
    name="imlt",
    help="Image metric-learning trainer: read data, validate, train, evaluate Recall@K, publish.",
    no_args_is_help=True,
    # plain click help: rich's option table truncates long option names (…) at 80 columns
    rich_markup_mode=None,
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


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a step; expected failures become one message and an exit code."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
        raise typer.Exit(EXIT_CONFIG) from None
    except _expected_errors() as e:
        console.print(f"[bold red]error:[/] {type(e).__name__}: {e}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None


def _emit(model: Any) -> None:
    out.print_json(model.model_dump_json())


# --- the step subcommands: options derived from the step input models ---------------------------


def _cli_annotation(p: Parameter, optional: bool) -> Any:
    kind = p.kind if p.kind in (str, int, float, bool) or p.kind == list[int] else str
    return Optional[kind] if optional else kind


def _option(p: Parameter, *, unset_default: bool = False, help_suffix: str = "") -> inspect.Parameter:
    """A typer option for a parameter; `unset_default`: None (the config file's or the model's
    value applies), with the model's default shown in the help."""
    show = True
    if unset_default or p.required:
        default: Any = inspect.Parameter.empty if p.required and not unset_default else None
        show = str(p.default) if unset_default and p.default is not None else False
    else:
        default = p.default
    option = typer.Option(help=(p.description + help_suffix).strip(), show_default=show)
    optional = default is None or p.nullable
    return inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[_cli_annotation(p, optional), option])


def step_command(name: str, step: str, exclude: tuple[str, ...] = (), emit_exclude: frozenset[str] = frozenset(),
                 fail_unless: str | None = None) -> None:
    """Register `imlt NAME` for a step: one option per field of its input model."""
    entry = steps.STEPS[step]
    params = model_parameters(entry.input_model, exclude)

    def command(**values: Any) -> None:
        result = _call(entry, _build(entry.input_model, {k: v for k, v in values.items() if v is not None}))
        out.print_json(result.model_dump_json(exclude=set(emit_exclude)))
        if fail_unless and not getattr(result, fail_unless):
            raise typer.Exit(EXIT_FAILED)

    command.__signature__ = inspect.Signature([_option(p) for p in params])  # type: ignore[attr-defined]
    command.__doc__ = entry.summary
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)


# the class list can be long: it stays in DATASET/classes.txt
step_command("read-data", "read_data", emit_exclude=frozenset({"classes"}))
step_command("validate", "validate")
step_command("evaluate", "evaluate")
# a refused publish (below the Recall@1 gate) is a result, printed, and exit code 1
step_command("publish", "publish", fail_unless="published")


def _train_options() -> list[inspect.Parameter]:
    """`imlt train`'s options: every RunConfig field (by its flat name) plus TrainInput's and the launcher's."""
    from imlt.trainer.config import RunConfig

    output_dir = model_parameters(RunConfig)[0]
    config_options = [_option(p, unset_default=True, help_suffix=f" ({p.path})") for p in [output_dir, *config_parameters()]]
    train_input = [_option(p) for p in model_parameters(steps.TrainInput, ("config",))]
    opt = inspect.Parameter.KEYWORD_ONLY
    launcher = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        # a str, not a Path: Path("oss://b/k") collapses to "oss:/b/k"
        inspect.Parameter("config", opt, default=None, annotation=Annotated[Optional[str], typer.Option(
            "--config", "-c", help="YAML/JSON config, local or oss:// (the options below override it)")]),
        inspect.Parameter("set_", opt, default=None, annotation=Annotated[Optional[list[str]], typer.Option(
            "--set", help="Any field as section.key=value (YAML value)")]),
        inspect.Parameter("node_rank", opt, default=None, annotation=Annotated[Optional[int], typer.Option(
            help="This node's rank, 0..nnodes-1 (multi-node launch)")]),
        inspect.Parameter("master_addr", opt, default=None, annotation=Annotated[Optional[str], typer.Option(
            help="Address of node 0 (multi-node launch)")]),
        inspect.Parameter("master_port", opt, default=None, annotation=Annotated[Optional[int], typer.Option(
            help="Rendezvous port on node 0 (multi-node launch; default 29500)")]),
    ]
    return [*launcher[:2], *train_input, *config_options, *launcher[2:]]


def train_config(values: dict[str, Any]) -> Any:
    """The RunConfig `imlt train` runs: the config file (if any), the options, then --set."""
    from imlt.trainer.config import RunConfig

    params = [model_parameters(RunConfig)[0], *config_parameters()]
    overrides = {**overrides_from(params, values), **_parse_sets(values.get("set_") or [])}
    return _call(load_config, values.get("config") or {}, overrides)


def train(ctx: typer.Context, **values: Any) -> None:
    """Train a metric model on a read-data dataset folder; several processes run through torchrun."""
    from imlt.trainer import launch

    cfg = train_config(values)
    if launch.needs_launch(cfg):  # the same command again, in nnodes x nproc_per_node processes
        code = _call(lambda: launch.launch_train(cfg, launch.cli_args(ctx), node_rank=values["node_rank"],
                                                 master_addr=values["master_addr"], master_port=values["master_port"]))
        raise typer.Exit(code)
    result = _call(steps.train, _build(steps.TrainInput, {
        "config": cfg, **{k: values[k] for k in steps.TrainInput.model_fields if k != "config"}}))
    from imlt.trainer.process_group import DistEnv  # torch-free: rank 0 prints the result

    if DistEnv.from_env().is_main:
        _emit(result)


train.__signature__ = inspect.Signature(_train_options())  # type: ignore[attr-defined]
app.command()(train)


RUN_HELP = """All five steps from one run file: read, validate, train, evaluate, publish.

\b
A run file (YAML, local or oss://; examples/run.yaml is a commented one) has:
  workdir:  folder for the datasets, validation reports and metrics
  publish:  destination: folder of v1/, v2/, ... and `latest`;
            min_recall_at_1: publish only at or above this Recall@1 on val
  data:     train_annotations, val_annotations, data_format, data_root,
            class_names, val_class_names, image_size, reader_threads, ...
  model:    backbone, feature_dim, pretrained, ...
  loss:     name, margin, scale, weight
  optim:    optimizer, lr, momentum, weight_decay, scheduler, warmup_epochs
  train:    batch_size, epochs, checkpoint_every, fp16, seed, device, ...
  compute:  model_type, mode, nnodes, nproc_per_node, instance_type, gpu_type
  output_dir (optional): the model folder; default WORKDIR/model

\b
Every field of data ... compute is the same as in `imlt train --config`
(`imlt train --help` describes each). A problem in the file exits 2 naming
the field; a failed step exits 1.
"""


@app.command(help=RUN_HELP)
def run(
    config: Annotated[str, typer.Argument(help="Run file (YAML, local or oss://)")],
    resume: Annotated[bool, typer.Option(help="Continue from the model folder's last checkpoint (of the same config) if one exists")] = True,
) -> None:
    from imlt.trainer.pipeline import PipelineConfig, run_pipeline

    pc = _call(PipelineConfig.from_file, config)
    result = _call(run_pipeline, pc, lambda msg: console.print(f"[bold cyan]{msg}[/]"), resume=resume)
    _emit(result.published)
    if result.evaluation is not None:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in result.evaluation.metrics.items() if isinstance(v, float))
        console.print(f"Metrics on val ({result.evaluation.metrics_dir}): {metrics}", highlight=False)
    console.print(f"Model folder: {result.trained.model_dir}", highlight=False)
    pub = result.published
    if pub.published:
        console.print(f"Model published: [bold]{pub.version_dir}[/] (version {pub.version}); "
                      f"`latest` -> {storage.join(pc.publish.destination, 'latest')}", highlight=False)
    else:
        console.print(f"Not published: {pub.reason}", highlight=False)
        raise typer.Exit(EXIT_FAILED)


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Folder for the generated data, the model and the published versions")] = Path("demo-output"),
    epochs: Annotated[int, typer.Option(help="Training epochs")] = 10,
    backbone: Annotated[str, typer.Option(help="Backbone")] = "resnet10t",
    seed: Annotated[int, typer.Option(help="Seed for data and training")] = 0,
    data_only: Annotated[bool, typer.Option(help="Only write the glyph data to OUTPUT/data (what examples/run.yaml reads)")] = False,
) -> None:
    """Open-set glyph retrieval end to end: generate data, read, validate, train, evaluate, publish."""
    from imlt.trainer.demo import run_demo, write_data

    if data_only:
        _call(write_data, output, seed, out)
        return
    _call(run_demo, output, epochs, backbone, seed, out)


@app.command("k8s-job")
def k8s_job(
    config: Annotated[str, typer.Argument(help="Training config (YAML/JSON, local or oss://) the pods will read")],
    legacy_pytorchjob: Annotated[bool, typer.Option(help="Render a Training Operator v1 PyTorchJob instead of a Kubeflow Trainer TrainJob")] = False,
    train_dataset: Annotated[Optional[str], typer.Option(help="read-data output for the train split (oss://)")] = None,
    val_dataset: Annotated[Optional[str], typer.Option(help="read-data output for the val split (oss://)")] = None,
    image: Annotated[Optional[str], typer.Option(help="Trainer image (default: IMLT_IMAGE, else the project image of this version)")] = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace")] = "default",
    oss_secret: Annotated[str, typer.Option(help="Secret whose keys OSS_ACCESS_KEY_ID, OSS_ACCESS_KEY_SECRET (+ OSS_ENDPOINT, OSS_REGION, OSS_SESSION_TOKEN) become the pods' environment")] = "oss-credentials",
) -> None:
    """Print the Kubernetes manifest that runs `imlt train` on CONFIG with torchrun on every node."""
    from imlt.trainer.k8s import render_for_cli

    extra = [a for flag, v in (("--train-dataset", train_dataset), ("--val-dataset", val_dataset)) if v for a in (flag, v)]
    out.print(_call(lambda: render_for_cli(config, legacy_pytorchjob, image=image, namespace=namespace,
                                           oss_secret=oss_secret, extra_args=extra)), markup=False, highlight=False)


kfp_app = typer.Typer(help="Kubeflow Pipelines: compile the pipelines (needs the kfp extra).", no_args_is_help=True)
app.add_typer(kfp_app, name="kfp")


@kfp_app.command("compile")
def kfp_compile(
    out_dir: Annotated[Optional[str], typer.Argument(help="Folder for the YAML files (default: the installed pipelines folder)")] = None,
    image: Annotated[Optional[str], typer.Option(help="Image every component and job pod runs, e.g. registry.cn-hangzhou.aliyuncs.com/NAMESPACE/imlt:TAG (default: IMLT_IMAGE, else the project image of this version)")] = None,
) -> None:
    """Compile every pipeline to YAML, for the Pipelines UI or client.upload_pipeline."""
    from imlt.pipelines import compile as kfp_compiler  # an adapter: kfp is only needed here

    for path in _call(lambda: kfp_compiler.compile_all(out_dir or kfp_compiler.DEFAULT_OUT, image)):
        out.print(str(path), highlight=False)


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
