import json
import math

import pytest

from imlt.trainer.config import (
    FIXED_SCALE_LOSSES,
    LOSS_DEFAULTS,
    ConfigError,
    LossName,
    config_diff,
    load_config,
)

BASE = {"output_dir": "/tmp/out"}


def test_reference_defaults() -> None:
    cfg = load_config(BASE)
    assert cfg.model.backbone == "resnet_50" and cfg.model.backbone_feature_dim == 2048
    assert cfg.loss.name == LossName.AMSOFTMAX and cfg.loss.margin == 0.4
    assert cfg.loss.auto_scale and cfg.loss.scale is None  # the class-count scale, not the reference 30
    assert cfg.compute.model_type.value == "data-parallel"
    assert cfg.train.max_hours == 24


@pytest.mark.parametrize("name", list(LossName))
def test_each_loss_gets_its_reference_margin_and_scale_without_auto_scale(name: LossName) -> None:
    mp = name.value.startswith("ModelParallel")
    compute = {"model_type": "model-parallel" if mp else "data-parallel"}
    cfg = load_config({**BASE, "loss": {"name": name.value}, "compute": compute})
    assert cfg.loss.margin == LOSS_DEFAULTS[name][0]
    assert cfg.loss.auto_scale == (name in FIXED_SCALE_LOSSES)
    assert cfg.loss.scale == (None if cfg.loss.auto_scale else LOSS_DEFAULTS[name][1])
    ref = load_config({**BASE, "loss": {"name": name.value, "auto_scale": False}, "compute": compute})
    assert (ref.loss.margin, ref.loss.scale) == LOSS_DEFAULTS[name]
    explicit = load_config({**BASE, "loss": {"name": name.value, "scale": 7.5}, "compute": compute})
    assert explicit.loss.scale == 7.5 and not explicit.loss.auto_scale


@pytest.mark.parametrize("name, centres", [("ArcFace", "pml"), ("AMSoftmax", None)])
def test_auto_scale_trains_at_the_class_count_scale(name: str, centres: str | None) -> None:
    """AdaCos's fixed scale sqrt(2) ln(C - 1): 5.77 for 60 classes, 16.05 for 85,000, never below 1."""
    from imlt.trainer.losses import build_loss

    cfg = load_config({**BASE, "loss": {"name": name}})  # the default
    assert cfg.loss.scale is None and cfg.loss.margin == LOSS_DEFAULTS[LossName(name)][0]
    for classes, scale in ((60, 5.7665), (85_000, 16.0519), (2, 1.0)):
        loss = build_loss(cfg.loss, classes, 8)
        assert (getattr(loss, centres) if centres else loss).scale == pytest.approx(scale, abs=1e-4)
    off = load_config({**BASE, "loss": {"auto_scale": False}}).loss
    assert math.isclose(build_loss(off, 60, 8).scale, 30.0)  # off: the reference scale


def test_explicit_margin_wins() -> None:
    assert load_config({**BASE, "loss": {"name": "ArcFace", "margin": 10}}).loss.margin == 10


@pytest.mark.parametrize(
    "raw, fragments",
    [
        ({"loss": {"name": "ModelParallelSoftmax"}}, ["loss.name=ModelParallelSoftmax", "model-parallel", "AMSoftmax"]),
        ({"compute": {"model_type": "model-parallel"}}, ["compute.model_type=model-parallel", "ModelParallel"]),
        ({"model": {"backbone": "resnet18", "backbone_feature_dim": 2048}}, ["backbone_feature_dim=2048", "512"]),
        ({"model": {"num_classes": 3}, "data": {"class_names": "a,b"}}, ["num_classes=3", "2 classes"]),
        ({"train": {"fp16": True, "device": "cpu"}}, ["fp16", "CUDA"]),
        ({"train": {"batch_size": 0}}, ["train.batch_size", "greater than 0"]),
        ({"train": {"amp_dtype": "half"}}, ["train.amp_dtype", "'float16'", "'bfloat16'"]),
        ({"loss": {"name": "LargeMarginSoftmax", "auto_scale": True}}, ["loss.auto_scale", "LargeMarginSoftmax", "SphereFace"]),
        ({"loss": {"name": "ArcFace", "auto_scale": True, "scale": 30}}, ["loss.auto_scale", "remove loss.scale=30"]),
        ({"train": {"max_hours": 30}}, ["train.max_hours", "24"]),
        ({"loss": {"name": "Triplet"}}, ["loss.name", "AMSoftmax", "'Triplet'"]),
        ({"trian": {"epochs": 3}}, ["trian", "not permitted"]),
        ({"compute": {"nnodes": 2}}, ["nnodes=2", "distributed"]),
        ({"compute": {"instance_type": "ecs.nope"}}, ["instance_type", "ecs.gn5-c8g1.2xlarge"]),
        ({"model": {"backbone": "no_such_net"}}, ["no_such_net", "resnet_50"]),
    ],
)
def test_bad_values_name_the_field_and_allowed_values(raw: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config({**BASE, **raw})
    for f in fragments:
        assert f in str(exc.value)


def test_backbone_dim_is_derived_for_any_timm_name() -> None:
    assert load_config({**BASE, "model": {"backbone": "resnet10t"}}).model.backbone_feature_dim == 512


def test_class_names_inline_or_path() -> None:
    assert load_config({**BASE, "data": {"class_names": "cat, dog ,bird"}}).data.class_names == ["cat", "dog", "bird"]
    assert load_config({**BASE, "data": {"class_names": "oss://b/classes.txt"}}).data.class_names == ["oss://b/classes.txt"]
    assert load_config({**BASE, "data": {"class_names": ["猫", "狗"]}}).data.class_names == ["猫", "狗"]


def test_hash_is_stable_and_content_based(tmp_path) -> None:
    a = load_config({**BASE, "train": {"epochs": 3}, "loss": {"name": "CosFace"}})
    b = load_config({"loss": {"name": "CosFace"}, "train": {"epochs": 3}, **BASE})
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != load_config({**BASE, "train": {"epochs": 4}}).config_hash()
    # a dumped config reloads to the same hash (the hash key itself is ignored on load)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(a.dump()))
    assert load_config(path).config_hash() == a.config_hash()


def test_yaml_file_and_dotted_overrides(tmp_path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("output_dir: /tmp/o\ntrain:\n  epochs: 5\nloss:\n  name: ArcFace\n")
    cfg = load_config(path, {"train.epochs": 7, "optim.lr": None, "model.backbone": "resnet18"})
    assert cfg.train.epochs == 7 and cfg.optim.lr == 0.1 and cfg.model.backbone_feature_dim == 512


def test_config_diff_names_changed_fields() -> None:
    a = load_config(BASE).dump()
    b = load_config({**BASE, "train": {"epochs": 3}, "optim": {"lr": 0.5}}).dump()
    diff = config_diff(a, b)
    assert any(d.startswith("train.epochs: 10 -> 3") for d in diff)
    assert any(d.startswith("optim.lr") for d in diff)
