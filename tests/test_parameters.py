"""One parameter source: every RunConfig field and every step input field is settable from the
CLI, from each KFP train component (and the training pipelines) and from the Airflow operators,
with the default the models declare.

The adapters derive their parameters from the models (trainer.step_models); these tests walk the
models and check each adapter end to end as far as it can go without running a step: the CLI
through click's parser, KFP through the compiled component interface and the component body's
config builder, Airflow through the operator's constructor and its step input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import typer

from imlt.trainer import cli, steps
from imlt.trainer.config import RunConfig, load_config
from imlt.trainer.step_models import Parameter, config_parameters, model_parameters

REPO = Path(__file__).resolve().parents[1]
CONFIG_PARAMS = [model_parameters(RunConfig)[0], *config_parameters()]  # output_dir first

# A value for each RunConfig field that differs from its default and passes the config's
# cross-field checks on its own (fp16 needs CUDA: false is its only value on a CPU host).
SPECIAL = {
    "data.class_names": "a,b", "data.val_class_names": "c,d", "model.backbone": "resnet18",
    "model.backbone_feature_dim": 2048, "model.num_classes": 5, "model.pretrained": "weights/start.pt",
    "compute.model_type": "data-parallel", "compute.instance_type": "ecs.gn6i-c4g1.xlarge", "train.fp16": False,
    "loss.weight": 0.5, "optim.momentum": 0.5, "train.max_hours": 2.0, "loss.margin": 0.3, "loss.scale": 10.0,
    "loss.auto_scale": False, "model.zero_init_last": False,
    "optim.warmup_epochs": 0,  # a 0 that is a value (SGD's default is 1): no adapter may read it as "unset"
}


# fields whose sample needs another field set with it
COMPANIONS = {"compute.nnodes": {"compute.mode": "distributed"}}
BY_PATH = {p.path: p for p in CONFIG_PARAMS}


def settings(p: Parameter) -> dict[str, Any]:
    """{field path: value} that sets p (with its companions)."""
    return {p.path: sample(p), **COMPANIONS.get(p.path, {})}


def sample(p: Parameter) -> Any:
    if p.path in SPECIAL:
        return SPECIAL[p.path]
    field = _field(p.path)
    if isinstance(field.annotation, type) and issubclass(field.annotation, Enum):
        return next(m.value for m in field.annotation if m.value != p.default)
    if p.kind is bool:
        return not p.default
    if p.kind is int:
        return (p.default or 0) + 3
    if p.kind is float:
        return (p.default or 1.0) / 2
    return "x-" + p.name


def _field(path: str) -> Any:
    model: Any = RunConfig
    *sections, leaf = path.split(".")
    for s in sections:
        model = model.model_fields[s].annotation
    return model.model_fields[leaf]


def expected_config(p: Parameter) -> RunConfig:
    cfg = load_config({}, {"output_dir": "out", **settings(p)})
    # the two whose only valid value here is the default, and the derived width of the default backbone
    same = ("compute.model_type", "train.fp16", "model.backbone_feature_dim")
    assert cfg != load_config({}, {"output_dir": "out"}) or p.path in same, p.path
    return cfg


# --- the CLI -----------------------------------------------------------------------------------


def _click(command: str) -> Any:
    return typer.main.get_command(cli.app).commands[command]


def _parse(command: str, args: list[str]) -> dict[str, Any]:
    return _click(command).make_context(command, args).params


def _flag(p: Parameter, value: Any) -> list[str]:
    name = "--" + p.name.replace("_", "-")
    if p.kind is bool:
        return [name if value else "--no-" + p.name.replace("_", "-")]
    if isinstance(value, list):
        return [a for v in value for a in (name, str(v))]
    return [name, str(value)]


@pytest.mark.parametrize("p", CONFIG_PARAMS, ids=lambda p: p.path)
def test_cli_train_sets_every_config_field(p: Parameter) -> None:
    option = {o.name: o for o in _click("train").params}[p.name]
    assert option.default is None  # unset: the config file's value, else the model's default ...
    if p.default is not None:  # ... which the help shows
        assert option.show_default == str(p.default)
    if p.path == "output_dir":
        args = ["--output-dir", "out"]
    else:
        args = [a for path, value in settings(p).items() for a in _flag(BY_PATH[path], value)] + ["--output-dir", "out"]
    assert cli.train_config(_parse("train", args)) == (expected_config(p) if p.path != "output_dir"
                                                        else load_config({}, {"output_dir": "out"}))


STEP_CLI = {"read_data": "read-data", "validate": "validate", "evaluate": "evaluate", "publish": "publish"}
STEP_FIELDS = [(step, p) for step in STEP_CLI for p in model_parameters(steps.STEPS[step].input_model)]


@pytest.mark.parametrize("step,p", STEP_FIELDS, ids=lambda x: x if isinstance(x, str) else x.name)
def test_cli_step_commands_expose_every_input_field_with_its_default(step: str, p: Parameter) -> None:
    option = {o.name: o for o in _click(STEP_CLI[step]).params}[p.name]
    assert option.required == p.required
    if not p.required:
        assert option.default == p.default


# --- KFP ---------------------------------------------------------------------------------------


def _kfp_default(p: Parameter) -> Any:
    """A model default in KFP's spelling (components/kfp/_factory.kfp_input)."""
    return 0 if p.zero_is_unset and p.default is None else p.default


@pytest.mark.parametrize("component", ["train", "train_on_kubernetes"])
@pytest.mark.parametrize("p", config_parameters(), ids=lambda p: p.path)
def test_kfp_train_components_set_every_config_field(component: str, p: Parameter) -> None:
    import imlt.components.kfp as kfp_components
    from imlt.components.kfp import _run

    inp = getattr(kfp_components, component).component_spec.inputs[p.name]
    assert inp.default == _kfp_default(p), f"{p.name}: component default {inp.default!r}, model {p.default!r}"
    values = {BY_PATH[path].name: value for path, value in settings(p).items()}
    assert _run.run_config(values, "out") == expected_config(p)


@pytest.mark.parametrize("pipeline", ["training_pipeline", "training_pipeline_gpu", "training_pipeline_distributed"])
def test_training_pipelines_pass_every_config_field_to_train(pipeline: str) -> None:
    import imlt.pipelines.training as training

    spec = getattr(training, pipeline).pipeline_spec
    inputs = spec.root.input_definitions.parameters
    (train_task,) = [t for name, t in spec.root.dag.tasks.items() if name.startswith("train")]
    wired = {k: v.component_input_parameter for k, v in train_task.inputs.parameters.items()}
    for p in config_parameters():
        assert p.name in inputs, f"{pipeline}: no pipeline input {p.name}"
        assert wired.get(p.name) == p.name, f"{pipeline}: {p.name} is not passed to the train task"


KFP_STEP = {"read_data": "read_data", "validate": "validate", "evaluate": "evaluate", "publish": "publish",
            "train_remote": "train_on_kubernetes", "import_model": "import_model", "train": "train"}
# filled from artifacts, the task's settings (task_config) or the config built from the inputs above
FROM_ARTIFACTS = {"output_dir", "dataset_dir", "model_dir", "metrics_dir", "train_dataset", "val_dataset",
                  "upstream_annotations", "config", "resources", "node_selector"}


@pytest.mark.parametrize("step", sorted(KFP_STEP))
def test_kfp_components_expose_every_step_input_field_with_its_default(step: str) -> None:
    import imlt.components.kfp as kfp_components

    inputs = getattr(kfp_components, KFP_STEP[step]).component_spec.inputs
    for p in model_parameters(steps.STEPS[step].input_model, flatten=False):
        if p.name in FROM_ARTIFACTS:
            continue
        assert p.name in inputs, f"{KFP_STEP[step]} does not expose {p.name}"
        assert inputs[p.name].default == _kfp_default(p), p.name


def test_kfp_docstrings_describe_every_input_from_the_models() -> None:
    import imlt.components.kfp as kfp_components

    for p in config_parameters():
        assert kfp_components.train.component_spec.inputs[p.name].description == p.description


# --- Airflow (in a subprocess: Airflow reads its configuration at import) ----------------------

AIRFLOW = """
import json, sys
from imlt.components.airflow.operators import (EvaluateRecallOperator, KubernetesTrainMetricModelOperator,
    PublishModelOperator, ReadOssDataOperator, TrainMetricModelOperator, ValidateAnnotationsOperator)
cases = json.loads(sys.argv[1])
out = {"configs": {}, "operators": {}}
for path, value in cases.items():
    for cls in (TrainMetricModelOperator, KubernetesTrainMetricModelOperator):
        op = cls(task_id="t", config={"output_dir": "out"}, overrides=value, train_dataset="ds", oss_conn_id=None)
        out["configs"][f"{cls.__name__}:{path}"] = op.step_input().config.model_dump(mode="json")
for cls in (ReadOssDataOperator, ValidateAnnotationsOperator, EvaluateRecallOperator, PublishModelOperator,
            TrainMetricModelOperator, KubernetesTrainMetricModelOperator):
    out["operators"][cls.__name__] = {"step": cls.step, "template_fields": list(cls.template_fields),
                                      "defaults": {p.name: p.default for p in cls.parameters}}
print(json.dumps(out))
"""
OPERATOR_STEP = {"ReadOssDataOperator": "read_data", "ValidateAnnotationsOperator": "validate",
                 "EvaluateRecallOperator": "evaluate", "PublishModelOperator": "publish",
                 "TrainMetricModelOperator": "train", "KubernetesTrainMetricModelOperator": "train_remote"}


@pytest.fixture(scope="module")
def airflow_view(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("airflow.sdk")
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    cases = {p.path: settings(p) for p in config_parameters()}
    proc = subprocess.run([sys.executable, "-c", AIRFLOW, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("p", config_parameters(), ids=lambda p: p.path)
def test_airflow_train_operators_set_every_config_field(airflow_view: dict[str, Any], p: Parameter) -> None:
    for cls in ("TrainMetricModelOperator", "KubernetesTrainMetricModelOperator"):
        assert airflow_view["configs"][f"{cls}:{p.path}"] == expected_config(p).model_dump(mode="json"), cls


@pytest.mark.parametrize("operator", sorted(OPERATOR_STEP))
def test_airflow_operators_take_every_step_input_field_with_its_default(airflow_view: dict[str, Any], operator: str) -> None:
    view = airflow_view["operators"][operator]
    assert view["step"] == OPERATOR_STEP[operator]
    for p in model_parameters(steps.STEPS[view["step"]].input_model, flatten=False):
        assert p.name in view["template_fields"], f"{operator}: {p.name} is not a templated argument"
        assert view["defaults"][p.name] == (p.default if p.path != "config" else None), f"{operator}.{p.name}"
