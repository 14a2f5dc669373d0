"""The KFP pipelines: committed YAML is current, the UI sees documented inputs, and the
training pipeline runs end to end under kfp.local (SubprocessRunner, this environment)."""

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import local

import imlt.components.kfp as kfp_components
from imlt.pipelines.compile import PIPELINES, compile_all
from imlt.pipelines.evaluation import evaluation_pipeline
from imlt.pipelines.training import training_pipeline
from tests.support.images import write_split
from imlt.trainer.config import INSTANCE_TYPES
from imlt.trainer.image import project_image

PIPELINE_DIR = Path(__file__).resolve().parents[1] / "pipelines"
pytestmark = [
    pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning"),  # kfp.local on our custom image
    pytest.mark.filterwarnings("ignore:.*have no effect in the current local runner:UserWarning"),
]


def _docs(filename: str) -> list[dict[str, Any]]:
    """The YAML documents of a committed pipeline (the pipeline spec, then the platform spec)."""
    return list(yaml.safe_load_all((PIPELINE_DIR / filename).read_text()))


def test_committed_yaml_is_current(tmp_path: Path) -> None:
    written = compile_all(tmp_path)
    assert {p.name for p in written} == set(PIPELINES)
    for path in written:
        committed = PIPELINE_DIR / path.name
        assert committed.exists(), f"{committed} missing: run `python -m imlt.pipelines.compile`"
        assert path.read_text() == committed.read_text(), f"{committed} is stale: run `python -m imlt.pipelines.compile`"


@pytest.mark.parametrize("filename", sorted(PIPELINES))
def test_pipeline_inputs_are_documented(filename: str) -> None:
    spec = _docs(filename)[0]
    assert spec["pipelineInfo"].get("description")
    for name, param in spec["root"]["inputDefinitions"]["parameters"].items():
        assert param.get("description"), f"{filename}: pipeline input {name} has no description"


@pytest.mark.parametrize("filename", ["training_pipeline.yaml", "training_pipeline_gpu.yaml"])
def test_training_pipeline_defaults_match_the_train_component(filename: str) -> None:
    """A pipeline input passed straight to train must not show a different default in the UI."""
    params = _docs(filename)[0]["root"]["inputDefinitions"]["parameters"]
    train_inputs = kfp_components.train.component_spec.inputs
    # the GPU variant presets its node type; pipelines start from ImageNet weights (`default`), like the reference
    shared = set(params) & set(train_inputs) - {"instance_type", "pretrained"}
    assert len(shared) > 20
    for name in shared:
        # pipelines default unset strings to "" (kfp.local cannot run None-default pipeline inputs)
        expected = "" if train_inputs[name].default is None and params[name]["parameterType"] == "STRING" \
            else train_inputs[name].default
        assert params[name].get("defaultValue") == expected, name


@pytest.mark.parametrize("filename", sorted(PIPELINES))
def test_every_task_gets_the_oss_secret(filename: str) -> None:
    spec, platform = _docs(filename)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for name, config in executors.items():
        required, optional = config["secretAsEnv"]
        for secret in (required, optional):
            # inside dsl.If the pipeline input arrives as the condition's input pipelinechannel--<name>
            source = secret["secretNameParameter"]["componentInputParameter"]
            assert source.removeprefix("pipelinechannel--") == "oss_secret_name", name
        # the keys that must be there fail the pod at start when missing (Kubernetes names Secret and key)
        assert {m["secretKey"]: m["envVar"] for m in required["keyToEnv"]} == {
            "OSS_ACCESS_KEY_ID": "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET": "OSS_ACCESS_KEY_SECRET"}
        assert not required.get("optional", False)
        assert {m["secretKey"] for m in optional["keyToEnv"]} == {"OSS_ENDPOINT", "OSS_REGION", "OSS_SESSION_TOKEN"}
        assert optional["optional"] is True


def test_the_ui_names_the_secret_keys_the_code_reads() -> None:
    from imlt.trainer.k8s import OSS_SECRET_KEYS

    for filename in PIPELINES:
        text = _docs(filename)[0]["root"]["inputDefinitions"]["parameters"]["oss_secret_name"]["description"]
        assert all(var in text for var, _ in OSS_SECRET_KEYS), text
        assert "access_key_id" not in text


def test_publish_is_gated_on_recall() -> None:
    spec = _docs("training_pipeline.yaml")[0]
    (condition,) = [t for t in spec["root"]["dag"]["tasks"].values() if "triggerPolicy" in t]
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-Output'] >= "
        "inputs.parameter_values['pipelinechannel--min_recall_at_1']"
    )
    gated = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(gated) == {"publish"}


def test_gpu_variant_sizes_the_train_task_from_its_instance_type() -> None:
    spec, platform = _docs("training_pipeline_gpu.yaml")
    instance = INSTANCE_TYPES["ecs.gn5-c8g1.2xlarge"]
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == str(instance.gpus)
    assert resources["resourceCpuLimit"] == str(instance.cpu)
    assert resources["resourceMemoryLimit"] == f"{instance.memory_gb}G"
    selector = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]["nodeSelector"]
    assert selector["labels"] == {"node.kubernetes.io/instance-type": "ecs.gn5-c8g1.2xlarge"}
    cpu = _docs("training_pipeline.yaml")[0]["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert "accelerator" not in cpu


# --- end to end under kfp.local ---------------------------------------------------------------------


def _run_dir(root: Path, pipeline_name: str, index: int) -> Path:
    runs = sorted(p for p in root.iterdir() if p.name.startswith(pipeline_name + "-"))
    return runs[index]


def _outputs(run: Path, task: str) -> dict[str, Any]:
    """Output artifacts of a finished task: name -> {"uri", "metadata"}."""
    out = json.loads((run / task / "executor_output.json").read_text())
    return {name: lst["artifacts"][0] for name, lst in out.get("artifacts", {}).items()}


# margin, scale, auto_scale, lr, weight decay, warm-up and zero_init_last default to None (the loss's and optimiser's own);
# kfp.local needs a value
TINY = dict(backbone="resnet18", image_size=32, feature_dim=16, epochs=1, batch_size=8, reader_threads=0,
            lr=0.01, weight_decay=5e-4, warmup_epochs=0, max_hours=1.0, margin=0.4, scale=30.0, auto_scale=False,
            zero_init_last=True, pretrained="")  # the pipelines default to ImageNet weights; tests never touch the network


@pytest.mark.slow
def test_training_pipeline_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    train_ann, val_ann = write_split(data, "train", seed=1), write_split(data, "val", seed=2)
    destination = tmp_path / "published"
    root = tmp_path / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)

    # 1. gate 0: train, evaluate, publish v1
    training_pipeline(train_annotations=str(train_ann), val_annotations=str(val_ann),
                      destination=str(destination), min_recall_at_1=0.0, **TINY)
    run = _run_dir(root, "imlt-training", 0)
    metrics = _outputs(run, "evaluate")["metrics"]
    logged = metrics["metadata"]
    assert set(logged) >= {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r"}
    assert json.loads((Path(metrics["uri"]) / "metrics.json").read_text())["recall_at_1"] == logged["recall_at_1"]
    assert "data:image/png;base64," in Path(_outputs(run, "evaluate")["recall_plot"]["uri"]).read_text()

    trained = _outputs(run, "train")
    assert trained["model"]["metadata"]["backbone"] == "resnet18"
    assert trained["model"]["metadata"]["feature_dim"] == 16
    assert trained["model"]["metadata"]["epochs_completed"] == 1
    assert "data:image/png;base64," in Path(trained["training_curve"]["uri"]).read_text()

    published = _outputs(run, "publish")["published_model"]
    assert published["metadata"]["version"] == 1
    assert published["metadata"]["uri"] == str(destination / "v1")
    assert published["metadata"]["recall_at_1"] == logged["recall_at_1"]
    assert json.loads((destination / "latest").read_text())["path"] == "v1"
    assert sorted(p.name for p in Path(published["uri"]).iterdir()) == sorted(p.name for p in (destination / "v1").iterdir())

    # 2. a gate above the achieved Recall@1: publish is skipped, nothing new is published
    recall = logged["recall_at_1"]
    assert recall < 1.0, "noise images should not retrieve perfectly; the gate test needs room above"
    external = tmp_path / "checkpoints"  # a fixed output_dir: trained there, copied into the artifact
    training_pipeline(train_annotations=str(train_ann), val_annotations=str(val_ann), train_output_dir=str(external),
                      destination=str(destination), min_recall_at_1=(recall + 1.0) / 2, **TINY)
    gated_run = _run_dir(root, "imlt-training", 1)
    assert (gated_run / "evaluate").is_dir() and not (gated_run / "publish").exists()
    model_artifact = Path(_outputs(gated_run, "train")["model"]["uri"])
    assert sorted(p.relative_to(model_artifact) for p in model_artifact.rglob("*")) == \
        sorted(p.relative_to(external) for p in external.rglob("*"))
    assert sorted(p.name for p in destination.iterdir()) == ["latest", "v1"]

    # 3. the evaluation pipeline scores the published model on the same split: same numbers
    evaluation_pipeline(model_url=str(destination / "v1"), annotations=str(val_ann), batch_size=8, reader_threads=0)
    again = _outputs(_run_dir(root, "imlt-evaluation", 0), "evaluate")["metrics"]["metadata"]
    assert again == pytest.approx(logged)


def test_compiling_for_another_image_points_every_task_and_job_at_it(tmp_path: Path) -> None:
    """`imlt kfp compile --image`: every executor runs it, and the TrainJob pods get it too."""
    image = "registry.cn-hangzhou.aliyuncs.com/team/imlt:7.7.7"
    compile_all(tmp_path, image=image)
    for filename in PIPELINES:
        spec = list(yaml.safe_load_all((tmp_path / filename).read_text()))[0]
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
        assert images == {image}, filename
    spec = list(yaml.safe_load_all((tmp_path / "training_pipeline_distributed.yaml").read_text()))[0]
    train = spec["root"]["dag"]["tasks"]["train-on-kubernetes"]["inputs"]["parameters"]["image"]
    assert train["runtimeValue"]["constant"] == image
    # the components themselves are left as they were
    assert {getattr(kfp_components, n).component_spec.implementation.container.image for n in kfp_components.__all__} \
        == {project_image()}


def test_one_image_definition_with_an_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import version

    from imlt.trainer import k8s

    monkeypatch.delenv("IMLT_IMAGE", raising=False)
    assert project_image() == k8s.default_image() == f"ghcr.io/imlt/imlt:{version('imlt')}"
    monkeypatch.setenv("IMLT_IMAGE", "reg.example/imlt:dev")
    assert project_image() == k8s.default_image() == "reg.example/imlt:dev"


@pytest.mark.parametrize("filename", sorted(PIPELINES))
def test_every_task_has_resources_and_retries(filename: str) -> None:
    spec = _docs(filename)[0]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"].get("resources", {})
        assert {"resourceCpuRequest", "resourceMemoryRequest", "resourceCpuLimit", "resourceMemoryLimit"} <= set(resources), name
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    for name, task in tasks.items():
        if "componentRef" in task and name.startswith("condition"):
            continue
        # publish too: a retried publish returns the version its first attempt wrote (tests/faults/test_publish.py)
        assert "retryPolicy" in task, name
    if filename != "evaluation_pipeline.yaml":
        gpu = filename != "training_pipeline.yaml"
        assert ("accelerator" in spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]) == gpu


def test_required_pipeline_inputs_have_no_empty_defaults() -> None:
    params = _docs("training_pipeline_distributed.yaml")[0]["root"]["inputDefinitions"]["parameters"]
    assert "defaultValue" not in params["train_output_dir"] and not params["train_output_dir"].get("isOptional")
    for filename in PIPELINES:
        params = _docs(filename)[0]["root"]["inputDefinitions"]["parameters"]
        for name in ("train_annotations", "val_annotations", "destination", "model_url", "annotations"):
            if name in params:
                assert "defaultValue" not in params[name], f"{filename}: {name}"


@pytest.mark.parametrize("filename", sorted(PIPELINES))
def test_tasks_with_dataloader_workers_mount_a_memory_backed_dev_shm(filename: str) -> None:
    spec, platform = _docs(filename)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in spec["deploymentSpec"]["executors"]:
        if name.startswith(("exec-train", "exec-evaluate")):
            (shm,) = executors[name]["emptyDirMounts"]
            limit = spec["deploymentSpec"]["executors"][name]["container"]["resources"]["memoryLimit"]
            assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory", name
            assert shm["sizeLimit"].endswith("G") and float(shm["sizeLimit"][:-1]) * 2 == limit, name  # memoryLimit is in GB
