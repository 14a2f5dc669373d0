"""Case 3: configs that must not run are refused by `imlt train` / `imlt run` with exit code 2,
before any data is read: the datasets and outputs live on the OSS test server, and it must see
zero requests. A resumed run whose parameters changed is refused naming every changed field.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import BACKBONE, checkpoints, imlt, train_args
from tests.support.images import write_text

# (rule, flags, words of the message)
CROSS_FIELD = [
    ("model-parallel-loss-without-model-parallel", ["--loss", "ModelParallelAMSoftmax"],
     "loss.name=ModelParallelAMSoftmax needs compute.model_type=model-parallel"),
    ("model-parallel-mode-without-its-loss", ["--model-type", "model-parallel", "--loss", "ArcFace"],
     "compute.model_type=model-parallel needs loss.name in"),
    ("backbone-dim-mismatch", ["--backbone", "resnet18", "--backbone-feature-dim", "2048"],
     "model.backbone_feature_dim=2048 but backbone 'resnet18' outputs 512 features"),
    ("classes-mismatch", ["--num-classes", "5", "--set", "data.class_names=[cat, dog, owl]"],
     "model.num_classes=5 but data.class_names lists 3 classes"),
    ("fp16-without-gpu", ["--fp16"], "train.fp16=true needs a CUDA device"),
    ("several-nodes-in-standalone-mode", ["--nnodes", "2"], "compute.nnodes=2 needs compute.mode=distributed"),
    ("several-nodes-in-standalone-mode-set", ["--set", "compute.nnodes=2"], "compute.nnodes=2 needs compute.mode=distributed"),
    ("unknown-instance-type", ["--set", "compute.instance_type=ecs.nope"], "compute.instance_type='ecs.nope' is unknown"),
]


@pytest.mark.parametrize(("flags", "words"), [c[1:] for c in CROSS_FIELD], ids=[c[0] for c in CROSS_FIELD])
def test_cross_field_rule_refused_before_any_data_is_read(oss_server, flags: list[str], words: str) -> None:
    if "--fp16" in flags:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present: fp16 is allowed here")
    ran = imlt("train", "--train-dataset", oss_server.url("datasets/train"), "--output-dir", oss_server.url("model"),
               "--backbone", BACKBONE, "--device", "cpu", *flags)
    assert ran.exit_code == 2, ran.output
    assert ran.exception is None and "Traceback" not in ran.output
    assert "invalid config" in ran.output and words in ran.output, ran.output
    assert oss_server.calls == []  # not one request: no data read, nothing written


def test_run_file_with_a_bad_rule_is_refused_before_reading_annotations(oss_server, tmp_path: Path) -> None:
    run_file = write_text(tmp_path / "run.yaml", f"""
workdir: {oss_server.url("work")}
publish: {{destination: {oss_server.url("published")}}}
data: {{train_annotations: {oss_server.url("train.txt")}, image_size: 16}}
model: {{backbone: resnet18, backbone_feature_dim: 2048}}
""")
    ran = imlt("run", run_file)
    assert ran.exit_code == 2, ran.output
    assert "model.backbone_feature_dim=2048" in ran.output
    assert oss_server.calls == []


def test_num_classes_against_the_dataset_is_refused_before_any_image_is_read(oss_server, dataset: str) -> None:
    from imlt.trainer import storage

    storage.upload_dir(dataset, oss_server.url("datasets/train"))  # classes.txt lists 4 classes
    oss_server.calls.clear()
    ran = imlt(*train_args(oss_server.url("datasets/train"), oss_server.url("model"), 1, "--num-classes", "7"))
    assert ran.exit_code == 2, ran.output
    assert "model.num_classes=7 but the train dataset's oss://test-bucket/datasets/train/classes.txt lists 4 classes" in ran.output
    read = {c.key for c in oss_server.calls}
    assert read <= {"datasets/train/manifest.jsonl", "datasets/train/classes.txt"}, read  # no image, no output
    assert all(c.op in ("HeadObject", "GetObject", "ListObjects") for c in oss_server.calls)


def test_resume_with_a_changed_config_is_refused_naming_the_fields(dataset: str, tmp_path: Path) -> None:
    out = tmp_path / "model"
    first = imlt(*train_args(dataset, out, 1))
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    ran = imlt(*train_args(dataset, out, 3, "--lr", "0.01", "--feature-dim", "32"))
    assert ran.exit_code == 2, ran.output
    for field in ("optim.lr: 0.05 -> 0.01", "train.epochs: 1 -> 3", "model.feature_dim: 16 -> 32"):
        assert field in ran.output, ran.output
    assert "cannot resume from" in ran.output and "epoch-0001.ckpt" in ran.output
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    assert checkpoints(out) == ["epoch-0001.ckpt"]


# (case, run file text, words of the message): each exits 2 naming the field in plain words
RUN_FILE_ERRORS = [
    ("no-publish", "workdir: w\ndata: {train_annotations: t.txt}\n", "`publish` is missing; add a top-level `publish:`"),
    ("no-workdir", "publish: {destination: p}\n", "`workdir` is missing"),
    ("publish-is-a-path", "workdir: w\npublish: /models\n", "publish: expected a section with `destination:`"),
    ("publish-without-destination", "workdir: w\npublish: {min_recall_at_1: 0.5}\n", "publish.destination: Field required"),
    ("gate-above-one", "workdir: w\npublish: {destination: p, min_recall_at_1: 2}\n", "publish.min_recall_at_1"),
    ("unknown-section", "workdir: w\npublish: {destination: p}\ntrian: {epochs: 1}\n", "trian: Extra inputs are not permitted"),
    ("not-yaml", "workdir: w\npublish: {destination: p\n", "not valid YAML"),
    ("a-list", "- workdir\n", "a run file is a mapping of sections"),
]


@pytest.mark.parametrize("case,text,words", RUN_FILE_ERRORS, ids=[c[0] for c in RUN_FILE_ERRORS])
def test_run_file_errors_exit_2_naming_the_field(tmp_path: Path, case: str, text: str, words: str) -> None:
    run_file = write_text(tmp_path / "run.yaml", text)
    ran = imlt("run", run_file)
    assert ran.exit_code == 2, ran.output
    assert ran.exception is None and "Traceback" not in ran.output
    assert str(run_file) in ran.output and words in ran.output, ran.output
    assert "pydantic" not in ran.output and "errors.pydantic.dev" not in ran.output
