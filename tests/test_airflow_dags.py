"""The Airflow adapters: DAG parsing, the OSS connection hook, and whole DAG runs with dag.test().

Every Airflow process runs in a subprocess with its own AIRFLOW_HOME and SQLite database (set up
once per session): Airflow reads its configuration at import time, so setting it in this process
would leak into other tests. dag.test() runs the tasks in that subprocess, so the task logs are
its output.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("airflow.sdk")

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
RUNNER = Path(__file__).with_name("airflow_dag_run.py")
SECRET = "imlt-test-secret-Zq8pW3"
OSS_CONN = json.dumps({
    "conn_type": "oss",
    "extra": {
        "auth_type": "AK",
        "access_key_id": "LTAI-test-key-id",
        "access_key_secret": SECRET,
        "region": "cn-hangzhou",
        "endpoint": "http://127.0.0.1:9",
    },
})


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of a throwaway Airflow: home, SQLite metadata DB (migrated once), our dags/."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    })
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True, timeout=600
    )
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    return env


def run_python(code: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


# --- DAG parsing ------------------------------------------------------------------------------


PARSE = """
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1] if len(sys.argv) > 1 else {dags!r})
print(json.dumps({{
    "seconds": time.perf_counter() - t0,
    "errors": {{k: str(v) for k, v in bag.import_errors.items()}},
    "heavy": sorted(m for m in ("torch", "timm", "torchvision", "faiss", "pytorch_metric_learning") if m in sys.modules),
    "dags": {{
        d.dag_id: {{
            "schedule": d.schedule, "catchup": d.catchup, "max_active_runs": d.max_active_runs,
            "params": sorted(d.params.keys()), "tasks": sorted(d.task_ids),
            "downstream": {{t.task_id: sorted(t.downstream_task_ids) for t in d.tasks}},
        }} for d in bag.dags.values()
    }},
}}))
"""


def test_dagbag_imports_every_dag_fast_and_without_torch(airflow_env: dict[str, str]) -> None:
    proc = run_python(PARSE.format(dags=str(DAGS)), airflow_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    assert out["heavy"] == [], f"DAG parsing imported {out['heavy']}"
    # Parse speed is guarded by what gets imported (no torch & co. above), not by a timed assertion.
    assert set(out["dags"]) == {"imlt_retraining", "imlt_evaluation"}

    retrain = out["dags"]["imlt_retraining"]
    assert retrain["catchup"] is False and retrain["max_active_runs"] == 1
    assert retrain["schedule"] is None  # no data settings in the packaged DAG: triggered by hand
    for p in ("train_annotations", "val_annotations", "output_root", "destination", "backbone", "epochs",
              "image_size", "min_recall_at_1"):
        assert p in retrain["params"]
    down = retrain["downstream"]
    assert down["validate_train"] == ["train"] and down["validate_val"] == ["train"]
    assert "publish" in down["better_than_published"] and down["publish"] == []
    assert out["dags"]["imlt_evaluation"]["schedule"] is None  # triggered by hand


FACTORY = """
import json
from imlt.components.airflow.dag_factory import retraining_dag
try:
    retraining_dag("unset_daily", "@daily")
except ValueError as e:
    print("refused:", e)
dag = retraining_dag("products_daily", "@daily", train_annotations="oss://b/t.txt", val_annotations="oss://b/v.txt",
                     destination="oss://b/models", output_root="oss://b/runs", epochs=3, backbone="resnet18")
print(json.dumps({"schedule": dag.schedule if isinstance(dag.schedule, str) else str(dag.timetable.summary),
                  "defaults": {k: dag.params[k] for k in ("train_annotations", "epochs", "backbone", "lr", "batch_size")}}))
"""


def test_dag_factory_refuses_a_schedule_without_data_settings(airflow_env: dict[str, str]) -> None:
    """Unpausing never starts a run on placeholder settings: a scheduled DAG must be given the data."""
    proc = run_python(FACTORY, airflow_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: DAG 'unset_daily': a scheduled DAG needs train_annotations, val_annotations, destination, output_root" \
        in proc.stdout
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # lr None: the optimiser's own default (RunConfig resolves it)
    assert out["defaults"] == {"train_annotations": "oss://b/t.txt", "epochs": 3, "backbone": "resnet18", "lr": None,
                               "batch_size": 32}


# --- the OSS connection -------------------------------------------------------------------------


HOOK = """
import json
from imlt.components.airflow.hooks.oss import ImltOssHook
from imlt.trainer.storage import OssSettings
s = ImltOssHook().settings
print(json.dumps({
    "type": type(s).__name__ == OssSettings.__name__,
    "key_id": s.access_key_id.get_secret_value(), "region": s.region, "endpoint": s.endpoint,
    "secret_ok": s.access_key_secret.get_secret_value() == %r,
    "repr": repr(s) + str(s) + s.model_dump_json(),
}))
"""


def test_hook_builds_oss_settings_from_the_oss_default_connection(airflow_env: dict[str, str]) -> None:
    proc = run_python(HOOK % SECRET, {**airflow_env, "AIRFLOW_CONN_OSS_DEFAULT": OSS_CONN})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["type"] and out["secret_ok"]
    assert (out["key_id"], out["region"], out["endpoint"]) == ("LTAI-test-key-id", "cn-hangzhou", "http://127.0.0.1:9")
    assert SECRET not in proc.stdout + proc.stderr  # the printed repr/str/JSON dump included


MISSING = """
from airflow.sdk.exceptions import AirflowException, AirflowNotFoundException
from imlt.components.airflow.hooks.oss import ImltOssHook
assert ImltOssHook().configure_storage() is False  # no connection: environment credentials apply
try:
    ImltOssHook(oss_conn_id="team_oss").configure_storage(required=True)
except AirflowNotFoundException as e:
    print("missing:", e)
try:
    ImltOssHook(oss_conn_id="bad").settings
except AirflowException as e:
    print("bad:", e)
"""


def test_hook_without_connection_and_with_unsupported_auth(airflow_env: dict[str, str]) -> None:
    bad = json.dumps({"conn_type": "oss", "extra": {"auth_type": "STS", "region": "cn-hangzhou"}})
    proc = run_python(MISSING, {**airflow_env, "AIRFLOW_CONN_BAD": bad})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "missing: The conn_id `team_oss` isn't defined" in proc.stdout
    assert "bad: connection 'bad': auth_type 'STS' is not supported" in proc.stdout


NO_CONNECTION = """
from airflow.sdk.exceptions import AirflowFailException
from imlt.components.airflow.hooks.oss import ImltOssHook
ImltOssHook.use_connection("oss_default", ["/local/only"])  # nothing on OSS: no credentials needed
try:
    ImltOssHook.use_connection("oss_default", [None, "oss://bkt/data/train.txt"])
except AirflowFailException as e:
    print("refused:", e)
"""


def test_a_task_touching_oss_without_the_connection_fails_naming_it(airflow_env: dict[str, str]) -> None:
    env = {k: v for k, v in airflow_env.items() if not k.startswith("OSS_")}
    proc = run_python(NO_CONNECTION, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: oss://bkt/data/train.txt needs OSS credentials: Airflow connection 'oss_default' is not defined" \
        in proc.stdout, proc.stdout


# --- whole DAG runs -------------------------------------------------------------------------------


def write_images(root: Path, split: str, classes: int, per_class: int, rng: random.Random, signal: bool) -> Path:
    """Tiny PNGs: a class colour plus noise (signal) or noise with arbitrary labels (no signal)."""
    lines = []
    for c in range(classes):
        for i in range(per_class):
            base = (60 * c + 30, 200 - 40 * c, 40 + 50 * (c % 2)) if signal else (128, 128, 128)
            img = Image.new("RGB", (16, 16))
            img.putdata([tuple(min(255, max(0, v + rng.randint(-60, 60))) for v in base) for _ in range(256)])
            rel = f"{split}/c{c}/{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / rel)
            lines.append(f"{rel} class{c}")
    ann = root / f"{split}.txt"
    ann.write_text("\n".join(lines) + "\n")
    return ann


def conf_for(tmp_path: Path, *, val_signal: bool = True, **extra: object) -> dict[str, object]:
    rng = random.Random(0)
    data = tmp_path / "data"
    train = write_images(data, "train", 4, 4, rng, signal=True)
    val = write_images(data, "val", 4, 4, rng, signal=val_signal)
    return {
        "train_annotations": str(train),
        "val_annotations": str(val),
        "output_root": str(tmp_path / "runs"),
        "destination": str(tmp_path / "dest"),
        "backbone": "resnet18",
        "feature_dim": 32,
        "image_size": 32,
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.01,
        "reader_threads": 0,
        "device": "cpu",
        "pretrained": None,  # the DAG's default (ImageNet weights) needs the Hub; tests never touch the network
        **extra,
    }


def run_dag(env: dict[str, str], dag_id: str, conf: dict[str, object], tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / f"{dag_id}-result.json"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), dag_id, json.dumps(conf), str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and out.exists(), log[-5000:]
    return json.loads(out.read_text()), log


@pytest.mark.slow
def test_retraining_dag_publishes_and_evaluation_dag_scores_it(airflow_env: dict[str, str], tmp_path: Path) -> None:
    conf = conf_for(tmp_path)
    env = {**airflow_env, "AIRFLOW_CONN_OSS_DEFAULT": OSS_CONN}
    result, log = run_dag(env, "imlt_retraining", conf, tmp_path)
    assert result["run_state"] == "success", log[-5000:]
    assert set(result["states"].values()) == {"success"}, result["states"]

    xcoms = result["xcoms"]
    metrics = xcoms["evaluate"]["metrics"]
    assert 0.0 <= metrics["recall_at_1"] <= 1.0 and "map_at_r" in metrics
    assert json.loads((Path(xcoms["evaluate"]["metrics_dir"]) / "metrics.json").read_text())["recall_at_1"] == metrics["recall_at_1"]
    assert xcoms["read_train"]["num_samples"] == 16 and xcoms["read_train"]["num_classes"] == 4
    assert "classes" not in xcoms["read_train"] and "history" not in xcoms["train"]  # data stays in files
    assert xcoms["train"]["epochs_completed"] == 1

    dest = Path(conf["destination"])
    assert xcoms["publish"]["published"] is True and xcoms["publish"]["version"] == 1
    assert (dest / "v1").is_dir() and (dest / "latest").exists()
    card = json.loads((dest / "v1" / "model_card.json").read_text())
    assert card["metrics"]["recall_at_1"] == metrics["recall_at_1"]
    # every path a task wrote is under this run's folder of output_root
    assert xcoms["train"]["model_dir"].startswith(conf["output_root"] + "/manual__")

    # the gate of the next run compares with this published model (read through DEST/latest)
    from imlt.trainer.publish import publish_decision

    r = metrics["recall_at_1"]
    assert publish_decision({"recall_at_1": r}, str(dest), 0.0)[0] is False  # equal is not better
    assert publish_decision({"recall_at_1": r + 0.01}, str(dest), 0.0)[0] is True
    assert publish_decision({"recall_at_1": r + 0.01}, str(dest), r + 0.02)[0] is False  # below the floor
    assert publish_decision({"recall_at_1": 0.0}, str(tmp_path / "empty"), 0.0)[0] is True  # nothing published

    # credentials came from the connection and never reached the log or XCom
    assert "OSS credentials from connection 'oss_default'" in log
    assert result["oss"] == {"region": "cn-hangzhou", "endpoint": "http://127.0.0.1:9"}
    assert SECRET not in log and SECRET not in json.dumps(result)

    evaluation, log = run_dag(airflow_env, "imlt_evaluation", {
        "model_dir": str(dest / "v1"), "val_annotations": conf["val_annotations"],
        "output_root": str(tmp_path / "eval-runs"), "batch_size": 8, "reader_threads": 0, "ks": [1, 2],
    }, tmp_path)
    assert set(evaluation["states"].values()) == {"success"}, log[-5000:]
    assert evaluation["xcoms"]["evaluate"]["metrics"]["recall_at_1"] == pytest.approx(metrics["recall_at_1"], abs=1e-6)


@pytest.mark.slow
def test_publish_is_skipped_when_recall_is_below_the_floor(airflow_env: dict[str, str], tmp_path: Path) -> None:
    # The val images carry no class signal, so Recall@1 stays below a floor of 1.0.
    conf = conf_for(tmp_path, val_signal=False, min_recall_at_1=1.0)
    result, log = run_dag(airflow_env, "imlt_retraining", conf, tmp_path)
    recall = result["xcoms"]["evaluate"]["metrics"]["recall_at_1"]
    assert recall < 1.0, "test precondition: noise val images must not be retrieved perfectly"
    states = result["states"]
    assert states["evaluate"] == "success" and states["better_than_published"] == "success"
    assert states["publish"] == "skipped", states
    assert "is below the gate" in log
    dest = Path(conf["destination"])
    assert not dest.exists() or not any(dest.iterdir())


@pytest.mark.slow
def test_bad_image_fails_validate_with_file_and_line_and_stops_the_run(airflow_env: dict[str, str], tmp_path: Path) -> None:
    conf = conf_for(tmp_path)
    train = Path(conf["train_annotations"])
    broken = train.parent / "train" / "broken.png"
    broken.write_bytes(b"this is not a png")
    lines = train.read_text().splitlines()
    lines.insert(2, "train/broken.png class0")  # becomes line 3
    train.write_text("\n".join(lines) + "\n")

    # This time the connection lives in the metadata DB, added with the command docs/airflow.md gives.
    airflow = [sys.executable, "-m", "airflow", "connections"]
    extra = json.loads(OSS_CONN)["extra"]
    added = subprocess.run([*airflow, "add", "oss_default", "--conn-type", "oss", "--conn-extra", json.dumps(extra)],
                           env=airflow_env, capture_output=True, text=True, timeout=300)
    assert added.returncode == 0, added.stderr[-3000:]
    assert SECRET not in added.stdout + added.stderr
    try:
        result, log = run_dag(airflow_env, "imlt_retraining", conf, tmp_path)
    finally:
        subprocess.run([*airflow, "delete", "oss_default"], env=airflow_env, capture_output=True, timeout=300)
    assert "OSS credentials from connection 'oss_default'" in log and SECRET not in log
    assert result["oss"]["region"] == "cn-hangzhou"
    states = result["states"]
    assert result["run_state"] == "failed"
    assert states["read_train"] == "success" and states["validate_train"] == "failed", states
    assert f"{train}:3" in log, log[-5000:]
    for downstream in ("train", "evaluate", "better_than_published", "publish"):
        assert states[downstream] == "upstream_failed", states
    assert not Path(conf["destination"]).exists()


@pytest.mark.slow
def test_retraining_dag_on_oss_with_credentials_only_in_the_connection(airflow_env: dict[str, str], tmp_path: Path,
                                                                        oss_server) -> None:
    """The documented set-up: data, runs and models on OSS, credentials only in `oss_default`.
    Every storage-touching task, the better_than_published gate included, must reach OSS."""
    from imlt.trainer import storage
    from tests.conftest import OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET

    local = conf_for(tmp_path)
    for split in ("train", "val"):  # the annotation files and their images, uploaded as they are
        storage.upload_dir(tmp_path / "data" / split, oss_server.url(f"data/{split}"))
        storage.write_text(oss_server.url(f"data/{split}.txt"), Path(local[f"{split}_annotations"]).read_text())
    conf = {**local, "train_annotations": oss_server.url("data/train.txt"), "val_annotations": oss_server.url("data/val.txt"),
            "output_root": oss_server.url("runs"), "destination": oss_server.url("models")}
    conn = json.dumps({"conn_type": "oss", "extra": {"auth_type": "AK", "access_key_id": OSS_TEST_ACCESS_KEY_ID,
                                                     "access_key_secret": OSS_TEST_ACCESS_KEY_SECRET,
                                                     "region": "cn-hangzhou", "endpoint": oss_server.endpoint}})
    env = {k: v for k, v in airflow_env.items() if not k.startswith("OSS_")}
    result, log = run_dag({**env, "AIRFLOW_CONN_OSS_DEFAULT": conn}, "imlt_retraining", conf, tmp_path)
    assert result["run_state"] == "success" and set(result["states"].values()) == {"success"}, \
        (result["states"], log[-5000:])
    assert result["xcoms"]["publish"]["version"] == 1
    keys = oss_server.keys()
    assert "models/latest" in keys and "models/v1/model_card.json" in keys, keys
    assert OSS_TEST_ACCESS_KEY_SECRET not in log
