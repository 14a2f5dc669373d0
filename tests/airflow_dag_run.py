"""Run one DAG of dags/ with dag.test() and print its outcome as JSON (used by test_airflow_dags.py).

Runs in a subprocess whose environment points Airflow at a throwaway home and SQLite database,
so Airflow's import-time configuration never leaks into the pytest process.
Usage: python airflow_dag_run.py DAG_ID CONF_JSON OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys


def main(dag_id: str, conf: dict, out_path: str) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    assert not bag.import_errors, bag.import_errors
    dr = bag.dags[dag_id].test(run_conf=conf)
    with create_session() as session:
        states = {ti.task_id: getattr(ti.state, "value", ti.state) for ti in dr.get_task_instances(session=session)}
        rows = session.scalars(XComModel.get_many(run_id=dr.run_id, dag_ids=dag_id, key="return_value")).all()
        xcoms = {row.task_id: XComModel.deserialize_value(row) for row in rows}
    from imlt.trainer.storage import current_oss_settings  # tasks ran in this process: what did they set?

    oss = current_oss_settings()
    result = {
        "run_state": getattr(dr.state, "value", dr.state),
        "states": states,
        "xcoms": xcoms,
        "oss": {"region": oss.region, "endpoint": oss.endpoint},
    }
    with open(out_path, "w") as f:
        json.dump(result, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])
