"""Pretrained weights from timm tags, `default`, hf-hub repos and files; import-weights; never the network.

Hub weights come from a Hugging Face cache folder each test builds itself (HF_HOME in a temp dir,
HF_HUB_OFFLINE=1) holding seeded weights of timm's tiny `test_resnet`; timm and huggingface_hub
read it exactly as they read a real cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save

from imlt.trainer import storage
from imlt.trainer.config import BACKBONES, ConfigError, ModelConfig, validate_config
from imlt.trainer.engine import run_training
from imlt.trainer.model import build_model
from imlt.trainer.steps import ImportWeightsInput, TrainInput, import_weights
from imlt.trainer.model_files import PRETRAINED as PRETRAINED_RECORD
from imlt.trainer.weights import PretrainedError, WeightsUnavailableError, resolve, timm_tag
from tests.support.images import write_colour_dataset

REPO = Path(__file__).resolve().parents[1]
ARCH, TAG = "test_resnet", "test_resnet.r160_in1k"
HUB_REPO = f"timm/{TAG}"
REV = "0123456789abcdef0123456789abcdef01234567"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class HubCache:
    """A Hugging Face hub cache folder: hub/models--ORG--NAME/{refs/main, snapshots/REV/FILE}."""

    def __init__(self, home: Path) -> None:
        self.home, self.hub = home, home / "hub"

    def put(self, repo: str, files: dict[str, bytes], rev: str = REV) -> None:
        folder = self.hub / ("models--" + repo.replace("/", "--"))
        (folder / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(rev)
        for name, data in files.items():
            (folder / "snapshots" / rev / name).write_bytes(data)

    def env(self) -> dict[str, str]:
        return {"HF_HOME": str(self.home), "HF_HUB_CACHE": str(self.hub), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCache:
    import huggingface_hub.constants as hf

    cache = HubCache(tmp_path / "hf-home")
    cache.hub.mkdir(parents=True)
    for key, value in cache.env().items():
        monkeypatch.setenv(key, value)
    # huggingface_hub reads these variables once, at import; this process imported it long ago.
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache.hub))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def seeded() -> dict[str, torch.Tensor]:
    """test_resnet weights with its 1000-class head, as the Hub holds them."""
    torch.manual_seed(123)
    return {k: v.contiguous() for k, v in timm.create_model(ARCH, pretrained=False, zero_init_last=False).state_dict().items()}


@pytest.fixture
def cached(hub: HubCache, seeded: dict[str, torch.Tensor]) -> bytes:
    data = save(seeded)
    hub.put(HUB_REPO, {"model.safetensors": data, "config.json": json.dumps({"architecture": ARCH, "num_classes": 1000}).encode()})
    return data


def _build(pretrained: str | None, image_size: int = 32):
    return build_model(ModelConfig(backbone=ARCH, feature_dim=8, pretrained=pretrained), image_size)


def _assert_loaded(model: Any, seeded: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor is the file's; the classifier was dropped; only the neck is random."""
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, seeded[name]), name
    report = model.pretrained.report
    assert sorted(report.matched) == sorted(f"backbone.{k}" for k in model.backbone.state_dict())
    assert sorted(report.ignored_classifier) == ["backbone.fc.bias", "backbone.fc.weight"]
    assert report.unexpected == []
    assert report.missing and all(k.startswith("neck.") for k in report.missing)
    assert model.pretrained.dump()["load"]["random_init"] == ["neck"]


# --- the reference's backbones ------------------------------------------------------------------


def test_every_reference_backbone_has_the_default_tag_the_docs_list() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `([\w.]+)` \| `([\w.]+)` \| `([\w./]+)` \|", (REPO / "docs" / "pretrained.md").read_text(), re.M)
    documented = {backbone: (model, tag, repo) for backbone, model, tag, repo in rows}
    assert set(documented) == set(BACKBONES)
    for backbone, (model, tag, repo) in documented.items():
        assert model == BACKBONES[backbone][0]
        assert timm_tag("default", backbone) == tag, backbone  # timm's registry, offline
        assert tag in timm.list_pretrained(f"{model}.*")
        assert timm.models.get_pretrained_cfg(tag).hf_hub_id == repo
        ModelConfig(backbone=backbone, pretrained="default")  # validates without the network


# --- each way of naming weights -----------------------------------------------------------------


@pytest.mark.parametrize("spec", [TAG, "default", ARCH, f"hf-hub:{HUB_REPO}"])
def test_tag_default_and_hub_repo_load_from_the_hub_cache(spec: str, cached: bytes, seeded: dict[str, torch.Tensor]) -> None:
    model = _build(spec)
    _assert_loaded(model, seeded)
    source = model.pretrained.source
    assert (source.repo, source.revision, source.filename) == (HUB_REPO, REV, "model.safetensors")
    assert source.sha256 == hashlib.sha256(cached).hexdigest()
    assert source.kind == ("hf-hub" if spec.startswith("hf-hub:") else "timm")
    if source.kind == "timm":
        assert source.tag == TAG


def test_a_hub_repo_without_config_and_a_pinned_revision(hub: HubCache, seeded: dict[str, torch.Tensor]) -> None:
    hub.put("org/plain", {"model.safetensors": save(seeded)})  # no config.json: nothing to check but the load
    model = _build(f"hf-hub:org/plain@{REV}")
    _assert_loaded(model, seeded)
    assert (model.pretrained.source.repo, model.pretrained.source.revision) == ("org/plain", REV)


def test_local_and_oss_files(tmp_path: Path, oss_server, seeded: dict[str, torch.Tensor]) -> None:
    data = save(seeded)
    local = tmp_path / "w.safetensors"
    local.write_bytes(data)
    url = oss_server.url("weights/w.safetensors")
    storage.write_bytes(url, data)
    for spec in (str(local), url):
        model = _build(spec)
        _assert_loaded(model, seeded)
        assert model.pretrained.source.kind == "file" and model.pretrained.source.url == spec
        assert model.pretrained.source.sha256 == hashlib.sha256(data).hexdigest()


def test_a_vit_tag_loads_at_another_image_size(hub: HubCache) -> None:
    # timm's own checkpoint filter resamples the position embedding: 160 px weights, 32 px model.
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False).state_dict()
    hub.put("timm/test_vit.r160_in1k", {"model.safetensors": save({k: v.contiguous() for k, v in vit.items()})})
    model = build_model(ModelConfig(backbone="test_vit", feature_dim=8, pretrained="default"), 32)
    assert model.backbone.pos_embed.shape[1] == 1 + (32 // 16) ** 2 < vit["pos_embed"].shape[1]
    assert torch.equal(model.backbone.patch_embed.proj.weight, vit["patch_embed.proj.weight"])
    assert model.pretrained.report.ignored_classifier == ["backbone.head.weight", "backbone.head.bias"]


# --- clear errors, before anything is written ---------------------------------------------------


def test_neither_cached_nor_reachable_names_tag_cache_and_the_two_ways_out(hub: HubCache, tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as e:
        _build("default")
    message = str(e.value)
    assert TAG in message and str(hub.hub) in message
    assert "HF_ENDPOINT" in message and f"imlt import-weights {TAG} --to oss://" in message
    assert message.count("\n") == 0  # one message, not a traceback of retries

    # as a training run: the error comes before anything is written
    dataset = write_colour_dataset(tmp_path / "data", ["red", "green"], 3, size=16)
    cfg = validate_config({"output_dir": str(tmp_path / "run"), "data": {"image_size": 16, "reader_threads": 0},
                           "model": {"backbone": ARCH, "feature_dim": 8, "pretrained": "default"},
                           "train": {"batch_size": 2, "epochs": 1, "device": "cpu"}})
    with pytest.raises(WeightsUnavailableError):
        run_training(TrainInput(config=cfg, train_dataset=dataset))
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]  # (a released lease may leave the folder)


@pytest.mark.parametrize("spec,match", [
    (f"{ARCH}.no_such_tag", r"test_resnet has no pretrained tag 'no_such_tag'; its tags: test_resnet\.r160_in1k"),
    ("resnet50.a1_in1k", r"a tag of resnet50, but model.backbone='test_resnet' is test_resnet"),
    ("no_such_model.tag", r"not a file and not a timm pretrained tag"),
    ("hf-hub:just-a-name", r"expected hf-hub:ORG/REPO"),
])
def test_bad_tags_are_config_errors_naming_the_tag(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_config({"output_dir": "/tmp/never", "model": {"backbone": ARCH, "pretrained": spec}})


def test_a_hub_repo_of_another_architecture_is_refused(hub: HubCache) -> None:
    hub.put("org/other", {"config.json": json.dumps({"architecture": "resnet18"}).encode(),
                          "model.safetensors": save({"conv1.weight": torch.zeros(64, 3, 7, 7)})})
    with pytest.raises(PretrainedError, match=r"hf-hub:org/other.*holds weights for resnet18, not for model.backbone='test_resnet'"):
        _build("hf-hub:org/other")


def test_weights_whose_shapes_do_not_fit_name_the_key(hub: HubCache, seeded: dict[str, torch.Tensor]) -> None:
    bad = dict(seeded)
    bad["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    hub.put(HUB_REPO, {"model.safetensors": save(bad)})
    with pytest.raises(PretrainedError, match=rf"{TAG}: does not fit backbone test_resnet: size mismatch for conv1\.0\.weight"):
        _build("default")


# --- import-weights: once into the model store, then train from it -----------------------------


def test_import_weights_to_oss_then_train_one_epoch_from_it(
    cached: bytes, seeded: dict[str, torch.Tensor], oss_server, tmp_path: Path
) -> None:
    dest = oss_server.url("weights/test_resnet")
    out = import_weights(ImportWeightsInput(name=ARCH, destination=dest))
    assert (out.tag, out.repo, out.revision, out.reused) == (TAG, HUB_REPO, REV, False)
    stored = storage.read_bytes(out.weights_url)
    assert stored == cached and out.sha256 == hashlib.sha256(cached).hexdigest()  # the Hub's bytes, verbatim
    note = json.loads(storage.read_text(out.note_url))
    assert (note["tag"], note["sha256"], note["kind"]) == (TAG, out.sha256, "timm")
    again = import_weights(ImportWeightsInput(name=TAG, destination=dest))
    assert again.reused and again.sha256 == out.sha256

    # a cluster without the Hub: an empty cache, offline; the model store is all it has
    import huggingface_hub.constants as hf

    empty = tmp_path / "empty-hub"
    empty.mkdir()
    hf.HF_HUB_CACHE = str(empty)  # restored by the hub fixture's monkeypatch
    dataset = write_colour_dataset(tmp_path / "data", ["red", "green", "blue"], 4, size=16)
    cfg = validate_config({"output_dir": str(tmp_path / "run"), "data": {"image_size": 16, "reader_threads": 0},
                           "model": {"backbone": ARCH, "feature_dim": 8, "pretrained": out.pretrained},
                           "train": {"batch_size": 4, "epochs": 1, "device": "cpu"}})
    result = run_training(TrainInput(config=cfg, train_dataset=dataset))
    assert result.epochs_completed == 1
    record = json.loads((tmp_path / "run" / PRETRAINED_RECORD).read_text())
    assert record["source"]["kind"] == "file" and record["source"]["url"] == f"{dest}/model.safetensors"
    assert record["source"]["sha256"] == out.sha256
    assert record["source"]["imported_from"]["tag"] == TAG
    assert record["load"] == {"matched": len(_build(None).backbone.state_dict()), "backbone_missing": [], "unexpected": [],
                              "ignored_classifier": ["backbone.fc.weight", "backbone.fc.bias"], "random_init": ["neck"]}

    from imlt.trainer.steps import PublishInput, publish

    published = publish(PublishInput(model_dir=str(tmp_path / "run"), destination=str(tmp_path / "pub"),
                                     export_onnx=False, export_torchscript=False))
    card = json.loads((Path(published.version_dir) / "model_card.json").read_text())
    assert card["pretrained"]["source"]["imported_from"]["tag"] == TAG  # the model card says where it started


def test_import_refuses_a_folder_holding_other_weights(cached: bytes, hub: HubCache, seeded: dict[str, torch.Tensor], tmp_path: Path) -> None:
    other = {k: v + 1 if v.is_floating_point() else v for k, v in seeded.items()}
    hub.put("org/other", {"config.json": json.dumps({"architecture": ARCH}).encode(), "model.safetensors": save(other)})
    dest = str(tmp_path / "store")
    first = import_weights(ImportWeightsInput(name=TAG, destination=dest))
    with pytest.raises(PretrainedError, match=rf"already holds {TAG} \(sha256 {first.sha256}\), not org/other"):
        import_weights(ImportWeightsInput(name="hf-hub:org/other", destination=dest))
    assert (tmp_path / "store" / "model.safetensors").read_bytes() == cached  # nothing overwritten


@pytest.mark.slow  # a fresh process importing torch
def test_import_weights_cli_reads_the_environment(hub: HubCache, cached: bytes, tmp_path: Path) -> None:
    """HF_HOME and HF_HUB_OFFLINE as a user sets them, in a fresh process: no constants patched."""
    env = {**os.environ, **hub.env()}
    env.pop("HF_HUB_CACHE")  # derived from HF_HOME, as for a user
    ok = subprocess.run([sys.executable, "-m", "imlt.trainer.cli", "import-weights", TAG, "--to", str(tmp_path / "w")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["sha256"] == hashlib.sha256(cached).hexdigest()


def test_import_weights_cli_errors(hub: HubCache, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imlt.trainer.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["import-weights", "resnet_50", "--to", str(tmp_path / "r50")], env={"COLUMNS": "1000"})
    assert missing.exit_code == 1
    flat = "".join(missing.output.split())  # the console may wrap a long path anywhere
    assert "resnet50.a1_in1k" in flat and str(hub.hub) in flat and "HF_ENDPOINT" in flat
    assert not (tmp_path / "r50").exists()

    bad = runner.invoke(app, ["import-weights", "resnet50.nope", "--to", str(tmp_path / "x")], env={"COLUMNS": "1000"})
    assert bad.exit_code == 2 and "resnet50 has no pretrained tag 'nope'" in " ".join(bad.output.split())


# --- distributed: one download per node ---------------------------------------------------------


def test_resolve_reads_only_the_cache_when_asked(cached: bytes, hub: HubCache) -> None:
    # what ranks other than a node's first do after the barrier
    weights = resolve("default", ARCH, local_files_only=True)
    assert weights.source.sha256 == hashlib.sha256(cached).hexdigest()


WORKER = r"""
import json, sys, time
import huggingface_hub.constants as hf
from imlt.trainer import process_group as D, weights

calls = []
real = weights.resolve
def recorded(spec, backbone, *, local_files_only=False):
    start = time.time()
    try:
        return real(spec, backbone, local_files_only=local_files_only)
    finally:
        calls.append({"start": start, "end": time.time(), "local_files_only": local_files_only})
weights.resolve = recorded  # the real resolve, timed

env = D.init_process_group("cpu")
result = {"rank": env.rank, "cached": weights.resolve_once_per_node("default", "test_resnet").source.sha256}
result["calls"] = list(calls)
hf.HF_HUB_CACHE = sys.argv[2]  # an empty cache: one launch tests both cases (starting torch costs seconds)
try:
    weights.resolve_once_per_node("default", "test_resnet")
except weights.WeightsUnavailableError as e:
    result["error"] = str(e)
with open(f"{sys.argv[1]}/rank{env.rank}.json", "w") as f:
    json.dump(result, f)
D.destroy_process_group()
"""


@pytest.mark.slow  # two processes starting torch: about 20 s on a quiet machine
def test_distributed_ranks_wait_for_the_first_and_read_the_cache(cached: bytes, hub: HubCache, tmp_path: Path) -> None:
    script, out, empty = tmp_path / "worker.py", tmp_path / "out", tmp_path / "empty"
    script.write_text(WORKER)
    out.mkdir()
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(out), str(empty)], env={**os.environ, **hub.env(), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    leader, follower = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert leader["cached"] == follower["cached"] == hashlib.sha256(cached).hexdigest()
    assert [c["local_files_only"] for c in leader["calls"]] == [False]
    assert [c["local_files_only"] for c in follower["calls"]] == [True]  # never the network
    assert follower["calls"][0]["start"] >= leader["calls"][0]["end"]  # after the leader's download
    # the leader cannot get them: every rank gets the clear error, none is left at the barrier
    assert all(TAG in r["error"] and str(empty) in r["error"] for r in (leader, follower))


# --- the adapters over the import step ----------------------------------------------------------


def test_airflow_operator_imports_weights(cached: bytes, tmp_path: Path) -> None:
    from imlt.components.airflow.operators import ImportPretrainedWeightsOperator

    op = ImportPretrainedWeightsOperator(task_id="import", weights=ARCH, destination=str(tmp_path / "w"), oss_conn_id=None)
    assert set(op.template_fields) == {"weights", "destination", "backbone"}
    xcom = op.execute({})
    assert xcom["pretrained"] == str(tmp_path / "w") and xcom["tag"] == TAG
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == cached


@pytest.mark.slow  # kfp.local starts a process that imports torch
@pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")
def test_kfp_component_imports_weights(cached: bytes, tmp_path: Path) -> None:
    from kfp import local

    from imlt.components.kfp import import_weights as component

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    task = component(name=TAG, destination=str(tmp_path / "w"))
    assert task.output == str(tmp_path / "w")
    assert json.loads((tmp_path / "w" / "weights.json").read_text())["sha256"] == hashlib.sha256(cached).hexdigest()
