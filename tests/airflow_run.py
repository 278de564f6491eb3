"""Run one DAG of airflow_dags/ with ``dag.test()`` and print its outcome as JSON on the last line.

    python -m tests.airflow_run DAG_ID LOGICAL_DATE_ISO '{"param": "value"}'

The tests call this in a subprocess with AIRFLOW_HOME (a migrated SQLite metadata DB),
AIRFLOW__CORE__DAGS_FOLDER and the Ray connection in the environment: Airflow's configuration is read at
import time, so each test run gets a fresh interpreter with exactly its own settings.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime


def main(argv: list[str]) -> int:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    dag_id, logical_date, conf = argv[0], datetime.fromisoformat(argv[1]), json.loads(argv[2])
    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        print(json.dumps({"import_errors": bag.import_errors}))
        return 2
    run = bag.get_dag(dag_id).test(logical_date=logical_date, run_conf=conf)
    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id,
                                                 TaskInstance.run_id == run.run_id).all()
        tasks = {ti.task_id: {"state": str(ti.state), "try_number": ti.try_number} for ti in tis}
        events = [{"asset": e.asset.name, "extra": e.extra} for e in session.query(AssetEvent).filter(
            AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == run.run_id)]
    print("DAG_TEST_RESULT " + json.dumps({"state": str(run.state), "run_id": run.run_id, "tasks": tasks,
                                           "asset_events": events}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
