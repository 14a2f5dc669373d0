"""The retraining DAG under Airflow's real scheduler, not dag.test().

`airflow standalone` (SQLite, loopback only, free ports) parses a small DAG file of a deployment's
own, built with the DAG factory; the runs are triggered through the REST API, once with a logical
date and once without (Airflow 3's null logical_date), side by side, and every task runs in the executor's own
process, as in production. Data, runs and models live on the OSS test server and the credentials
only in the `oss_default` connection (no OSS_* variables in Airflow's environment).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("airflow.sdk")

from tests.support.airflow_standalone import AirflowStandalone, StandaloneUnavailable  # noqa: E402
from tests.support.oss_server import OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET  # noqa: E402
from tests.test_airflow_dags import conf_for  # noqa: E402

DAG_ID = "products_retraining"
DAG_FILE = f"""
from imlt.components.airflow.dag_factory import retraining_dag

# A deployment's own DAG file: tiny settings as its defaults, the data given when triggering.
dag = retraining_dag({DAG_ID!r}, schedule=None, backbone="test_resnet", pretrained=None, feature_dim=8, image_size=16,
                     epochs=1, batch_size=8, lr=0.01, reader_threads=0, device="cpu")
dag.max_active_runs = 2  # the test's two runs side by side (the factory allows one at a time)
"""


@pytest.mark.slow
def test_retraining_dag_under_the_real_scheduler_on_oss(tmp_path: Path, oss_server) -> None:
    from imlt.trainer import storage

    local = conf_for(tmp_path)
    for split in ("train", "val"):  # the annotation files and their images, uploaded as they are
        storage.upload_dir(tmp_path / "data" / split, oss_server.url(f"data/{split}"))
        storage.write_text(oss_server.url(f"data/{split}.txt"), Path(local[f"{split}_annotations"]).read_text())
    reads_before = oss_server.count("GetObject")
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "products_retraining.py").write_text(DAG_FILE)
    conn = json.dumps({"conn_type": "oss", "extra": {"auth_type": "AK", "access_key_id": OSS_TEST_ACCESS_KEY_ID,
                                                     "access_key_secret": OSS_TEST_ACCESS_KEY_SECRET,
                                                     "region": "cn-hangzhou", "endpoint": oss_server.endpoint}})
    # torch at one thread in the task processes: the machine is shared
    af = AirflowStandalone(tmp_path / "airflow_home", dags, {"AIRFLOW_CONN_OSS_DEFAULT": conn, "OMP_NUM_THREADS": "1"})
    try:
        try:
            af.start()
        except StandaloneUnavailable as e:
            pytest.skip(f"airflow standalone cannot start here: {e}")
        assert af.wait_for_dag(DAG_ID)["is_paused"] is True  # created paused: nothing runs before a trigger
        af.unpause(DAG_ID)

        def conf(name: str) -> dict[str, str]:
            return {"train_annotations": oss_server.url("data/train.txt"), "val_annotations": oss_server.url("data/val.txt"),
                    "output_root": oss_server.url(f"runs/{name}"), "destination": oss_server.url(f"models/{name}")}

        dated = af.trigger(DAG_ID, conf("dated"), logical_date="2026-01-02T03:04:05Z")
        undated = af.trigger(DAG_ID, conf("undated"), logical_date=None)
        assert dated["logical_date"].startswith("2026-01-02") and undated["logical_date"] is None
        runs = af.wait_for_runs(DAG_ID, [dated["dag_run_id"], undated["dag_run_id"]])
        logs = af.task_logs()
        for run_id, run in runs.items():
            states = af.task_states(DAG_ID, run_id)
            assert run["state"] == "success" and set(states.values()) == {"success"}, (run_id, states, logs[-6000:])
    finally:
        af.stop()

    keys = oss_server.keys()
    for name in ("dated", "undated"):
        assert f"models/{name}/latest" in keys and f"models/{name}/v1/model_card.json" in keys, keys
        assert any(k.startswith(f"runs/{name}/") for k in keys), keys  # datasets, model and metrics on OSS
    assert oss_server.count("GetObject") > reads_before  # the tasks read the data from OSS
    # credentials came from the connection, in every task process, and never reached a log
    assert logs.count("OSS credentials from connection 'oss_default'") >= 2
    assert OSS_TEST_ACCESS_KEY_SECRET not in logs and OSS_TEST_ACCESS_KEY_SECRET not in af.log_tail(10**9)
