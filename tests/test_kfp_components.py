"""The KFP components: their interfaces as the Pipelines UI sees them, and single steps under kfp.local."""

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from kfp import dsl, local

import imlt.components.kfp as kfp_components
from tests.support.images import CLASSES, write_split
from imlt.trainer.image import project_image

pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")  # kfp.local, custom image

COMPONENTS = [getattr(kfp_components, name) for name in kfp_components.__all__]


def _spec(component: Any) -> dict[str, Any]:
    """The component's compiled pipeline spec (what the YAML holds), as a dict."""
    from google.protobuf import json_format

    return json_format.MessageToDict(component.pipeline_spec)


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.name)
def test_component_runs_the_project_image_without_installing_anything(component: Any) -> None:
    container = component.component_spec.implementation.container
    assert container.image == project_image() == f"ghcr.io/imlt/imlt:{version('imlt')}"
    command = " ".join(container.command)
    assert "pip install" not in command  # the image holds kfp, trainer and every dependency


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.name)
def test_every_input_and_output_is_described(component: Any) -> None:
    assert component.component_spec.description, f"{component.name}: no component description"
    (spec,) = _spec(component)["components"].values()
    for kind in ("inputDefinitions", "outputDefinitions"):
        for group in ("parameters", "artifacts"):
            for name, item in spec.get(kind, {}).get(group, {}).items():
                assert item.get("description"), f"{component.name}.{name} has no description"


def test_step_inputs_are_all_reachable_from_the_components() -> None:
    """Every field of a step's input model is a component input (or filled from an artifact)."""
    from imlt.trainer import steps

    from_artifacts = {"output_dir", "dataset_dir", "model_dir", "metrics_dir", "train_dataset", "val_dataset",
                      "upstream_annotations", "config"}
    for component, model in [(kfp_components.read_data, steps.ReadDataInput),
                             (kfp_components.validate, steps.ValidateInput),
                             (kfp_components.evaluate, steps.EvaluateInput),
                             (kfp_components.publish, steps.PublishInput),
                             (kfp_components.train, steps.TrainInput)]:
        missing = set(model.model_fields) - set(component.component_spec.inputs) - from_artifacts
        assert not missing, f"{component.name} does not expose {sorted(missing)}"


# --- single steps under kfp.local (no training: these need no torch model) ------------------------


@pytest.fixture
def local_runner(tmp_path: Path) -> Path:
    root = tmp_path / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


def _executor_output(root: Path, task: str) -> dict[str, Any]:
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return json.loads((run / task / "executor_output.json").read_text())


def test_upstream_annotations_win_over_the_path(tmp_path: Path, local_runner: Path) -> None:
    upstream = write_split(tmp_path / "upstream", "train", per_class=2, absolute=True)
    stale = write_split(tmp_path / "stale", "train", per_class=3, absolute=True)

    @dsl.pipeline(name="precedence")
    def precedence(upstream_file: str, path: str) -> None:
        produced = dsl.importer(artifact_uri=upstream_file, artifact_class=dsl.Artifact)
        kfp_components.read_data(annotations=path, upstream_annotations=produced.output)

    precedence(upstream_file=str(upstream), path=str(stale))
    out = _executor_output(local_runner, "read-data")
    meta = out["artifacts"]["dataset"]["artifacts"][0]["metadata"]
    assert meta["num_samples"] == 2 * len(CLASSES)  # the upstream file's 8 lines, not the path's 12
    summary = json.loads((Path(out["artifacts"]["dataset"]["artifacts"][0]["uri"]) / "summary.json").read_text())
    assert summary["annotations"] == str(upstream)


def test_read_and_validate_produce_dataset_report_and_findings(tmp_path: Path, local_runner: Path) -> None:
    ann = write_split(tmp_path / "data", "train", per_class=3)

    @dsl.pipeline(name="read-validate")
    def read_validate(annotations: str) -> None:
        read = kfp_components.read_data(annotations=annotations, class_names=",".join(CLASSES))
        kfp_components.validate(dataset=read.outputs["dataset"], workers=1)

    read_validate(annotations=str(ann))
    dataset = _executor_output(local_runner, "read-data")["artifacts"]["dataset"]["artifacts"][0]
    assert dataset["metadata"] == {"split": "train", "num_samples": 12, "num_classes": 4}
    assert (Path(dataset["uri"]) / "classes.txt").read_text().split() == CLASSES
    checked = _executor_output(local_runner, "validate")["artifacts"]
    assert checked["validation"]["artifacts"][0]["metadata"] == {"ok": True, "num_errors": 0, "num_warnings": 0}
    report = Path(checked["report"]["artifacts"][0]["uri"]).read_text()
    assert report.lstrip().lower().startswith("<!doctype html") or "<html" in report.lower()


def test_validate_fails_the_task_on_fatal_problems(tmp_path: Path, local_runner: Path) -> None:
    ann = write_split(tmp_path / "data", "train", per_class=1)  # one image a class: no pairs

    @dsl.pipeline(name="too-few")
    def too_few(annotations: str) -> None:
        read = kfp_components.read_data(annotations=annotations)
        kfp_components.validate(dataset=read.outputs["dataset"], workers=1)

    with pytest.raises(RuntimeError, match="validate"):
        too_few(annotations=str(ann))
