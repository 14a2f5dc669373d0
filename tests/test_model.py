"""The embedding model: every named backbone builds, pretrained loading, the model folder round trip."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from imlt.trainer.config import BACKBONES, DataConfig, ModelConfig, RunConfig
from imlt.trainer.model import EmbeddingModel, build_model, load_embedding_model, load_pretrained, save_embedding_model
from imlt.trainer.weights import PretrainedError

CHEAP = ["resnet18", "vit_tiny", "xcit_tiny"]


def _cfg(backbone: str = "resnet18", feature_dim: int = 16, pretrained: str | None = None, zero_init_last: bool | None = False) -> ModelConfig:
    return ModelConfig(backbone=backbone, feature_dim=feature_dim, pretrained=pretrained, zero_init_last=zero_init_last)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_named_backbone_builds_with_its_table_width(backbone: str) -> None:
    with torch.device("meta"):  # shapes only: the base models would take seconds and GBs each
        model = build_model(_cfg(backbone, feature_dim=24), 224)
    assert model.backbone.num_features == BACKBONES[backbone][1]
    assert model.neck[0].in_features == BACKBONES[backbone][1]
    assert model.feature_dim == 24


@pytest.mark.parametrize("backbone", CHEAP)
def test_cheap_backbones_forward_and_backward_at_32px(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(backbone), 32)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    out.sum().backward()
    assert model.neck[0].weight.grad is not None and model.neck[0].weight.grad.abs().sum() > 0


def test_vit_gets_the_image_size() -> None:
    model = build_model(_cfg("vit_tiny"), 32)
    assert model.backbone.patch_embed.img_size == (32, 32)
    with pytest.raises(Exception):
        model(torch.randn(1, 3, 64, 64))  # a fixed-size ViT refuses other sizes: img_size was really passed


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "resnet18.a1_in1k", "convnext_atto"])
def test_other_timm_names_build_with_the_kwargs_they_take(name: str) -> None:
    model = build_model(_cfg(name, feature_dim=8), 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_zero_init_last_is_passed_to_resnets_only() -> None:
    torch.manual_seed(0)
    zero = build_model(_cfg(zero_init_last=True), 32)
    torch.manual_seed(0)
    live = build_model(_cfg(), 32)
    last_bns = [n for n, _ in zero.backbone.named_modules() if n.endswith("bn2") and n.startswith("layer")]
    assert last_bns
    for name in last_bns:
        assert torch.all(zero.backbone.get_submodule(name).weight == 0)
        assert torch.all(live.backbone.get_submodule(name).weight == 1)
    build_model(_cfg("vit_tiny", zero_init_last=True), 32)  # not a ViT kwarg: must be dropped, not passed


def test_zero_init_last_false_spreads_untrained_embeddings() -> None:
    # On glyph images (mostly flat background, as in the demo) timm's zero-initialised residual
    # blocks map everything to nearly one point, a poor start for a metric; our default leaves them live.
    import random

    from imlt.trainer.data.synthetic import FONT_FILES, font_dir, render_glyph
    from imlt.trainer.data.transforms import build_eval_transform

    rng, to_tensor = random.Random(0), build_eval_transform(32)
    x = torch.stack([
        to_tensor(render_glyph(c, font_dir() / FONT_FILES[i % len(FONT_FILES)], 32, rng).convert("RGB"))
        for i, c in enumerate("ABCDEFGHIJKLMNOP")
    ])
    nn_cos = {}
    for z in (True, False):
        torch.manual_seed(0)
        model = build_model(_cfg(zero_init_last=z), 32).eval()
        with torch.no_grad():
            e = model(x)
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        nn_cos[z] = sim.max(dim=1).values.mean().item()
    assert nn_cos[True] > 0.995, nn_cos
    assert nn_cos[False] < 0.99, nn_cos


# --- pretrained weights ---------------------------------------------------------------------


def _embed(model: EmbeddingModel, seed: int = 0) -> torch.Tensor:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_pretrained_from_our_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_model(_cfg(), 32)
    path = tmp_path / "emb.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = build_model(_cfg(pretrained=str(path)), 32)
    assert torch.equal(_embed(source), _embed(loaded))


def test_pretrained_from_a_timm_state_dict_saved_with_torch_save(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(3)
    timm_model = timm.create_model("resnet18", pretrained=False, num_classes=7)  # with its fc head
    path = tmp_path / "resnet18.pth"
    torch.save(timm_model.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="imlt.trainer.model"):
        model = build_model(_cfg(pretrained=str(path)), 32)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, timm_model.state_dict()[name]), name
    assert "dropped 2 classifier tensors" in caplog.text  # fc.weight, fc.bias
    assert "match nothing" not in caplog.text
    assert model.pretrained.report.ignored_classifier == ["backbone.fc.weight", "backbone.fc.bias"]
    assert model.pretrained.source.sha256 and model.pretrained.source.kind == "file"


def test_pretrained_from_oss(oss_server) -> None:
    from safetensors.torch import save

    from imlt.trainer import storage

    torch.manual_seed(6)
    source = build_model(_cfg(), 32)
    url = oss_server.url("weights/emb.safetensors")
    storage.write_bytes(url, save({k: v.contiguous() for k, v in source.state_dict().items()}))
    loaded = build_model(_cfg(pretrained=url), 32)
    assert torch.equal(_embed(source), _embed(loaded))


def test_pretrained_wrapped_and_ddp_prefixed_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(4)
    source = build_model(_cfg(), 32)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = build_model(_cfg(pretrained=str(path)), 32)
    assert torch.equal(_embed(source), _embed(loaded))


def test_a_backbone_checkpoint_loads_strictly_naming_missing_and_extra_keys(tmp_path: Path) -> None:
    # Nothing silently random: a backbone checkpoint must fill every backbone tensor.
    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    del state["layer4.1.bn2.running_var"]
    state["extra.proj.weight"] = torch.zeros(2, 2)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(PretrainedError, match=r"partial.safetensors: does not fit backbone resnet18.*layer4\.1\.bn2\.running_var.*extra\.proj\.weight"):
        build_model(_cfg(pretrained=str(path)), 32)


def test_our_own_model_loads_non_strictly_with_a_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A previous run's model (backbone.* / neck.*) may lack its neck: reported and logged, not fatal.
    state = {k: v for k, v in build_model(_cfg(), 32).state_dict().items() if not k.startswith("neck.")}
    state["backbone.extra.proj.weight"] = torch.zeros(2, 2)
    path = tmp_path / "ours.safetensors"
    save_file(state, str(path))
    model = build_model(_cfg(), 32)
    with caplog.at_level(logging.INFO, logger="imlt.trainer.model"):
        report = load_pretrained(model, str(path))
    assert report.missing and all(k.startswith("neck.") for k in report.missing)
    assert report.unexpected == ["backbone.extra.proj.weight"]
    built = build_model(_cfg(pretrained=str(path)), 32)
    assert built.pretrained.report.unexpected == ["backbone.extra.proj.weight"]
    assert "backbone.extra.proj.weight" in caplog.text


def test_wrong_shapes_and_foreign_files_are_errors(tmp_path: Path) -> None:
    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    bad_shape = tmp_path / "bad_shape.safetensors"
    save_file(state, str(bad_shape))
    with pytest.raises(PretrainedError, match=r"bad_shape.safetensors: does not fit.*size mismatch for conv1\.weight"):
        build_model(_cfg(pretrained=str(bad_shape)), 32)

    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.w": torch.zeros(3)}, str(unrelated))
    with pytest.raises(PretrainedError, match="unrelated.safetensors: does not fit backbone resnet18: Missing key"):
        build_model(_cfg(pretrained=str(unrelated)), 32)

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"definitely not weights")
    with pytest.raises(ValueError, match="garbage.bin: not a safetensors file or torch checkpoint"):
        build_model(_cfg(pretrained=str(garbage)), 32)


def test_pickle_bearing_files_are_refused(tmp_path: Path) -> None:
    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    with_object = tmp_path / "with_args.pth"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, with_object)
    with pytest.raises(ValueError, match="refusing to load.*argparse.Namespace"):
        build_model(_cfg(pretrained=str(with_object)), 32)

    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"state_dict": {k: v.numpy() for k, v in state.items()}}))
    with pytest.raises(ValueError, match="refusing to load"):
        build_model(_cfg(pretrained=str(raw_pickle)), 32)


# --- the model folder -----------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_embeddings(tmp_path: Path) -> None:
    weights = tmp_path / "init.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(weights))
    cfg = RunConfig(
        output_dir=str(tmp_path / "run"),
        data=DataConfig(image_size=32),
        model=_cfg(pretrained=str(weights)),
    )
    torch.manual_seed(5)
    model = build_model(cfg.model, cfg.data.image_size)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))  # move BatchNorm running stats off their init
    model_dir = str(tmp_path / "model")
    save_embedding_model(model, cfg, model_dir, ["cat", "dog"])
    weights.unlink()  # the saved weights replace `pretrained`: loading must not need it

    loaded, loaded_cfg = load_embedding_model(model_dir)
    assert not loaded.training
    assert loaded_cfg == cfg
    assert torch.equal(_embed(model), _embed(loaded))
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["config_hash"] == cfg.config_hash()
    assert (tmp_path / "model" / "classes.txt").read_text() == "cat\ndog\n"


def test_load_refuses_weights_of_another_shape(tmp_path: Path) -> None:
    cfg = RunConfig(output_dir=str(tmp_path / "run"), data=DataConfig(image_size=32), model=_cfg())
    save_embedding_model(build_model(cfg.model, 32), cfg, str(tmp_path / "m"), ["a", "b"])
    other = cfg.model_copy(update={"model": _cfg(feature_dim=8)})
    (tmp_path / "m" / "config.json").write_text(json.dumps(other.dump()))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_embedding_model(str(tmp_path / "m"))
