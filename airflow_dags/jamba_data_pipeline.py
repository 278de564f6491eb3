"""Airflow DAG ``jamba_data_pipeline``: raw crawl -> tokenized shards, one Ray job per pipeline stage.

    prepare -> crawl_filter -> quality -> dedup -> tokenize -> publish

* ``prepare`` resolves the dataset version (params.snapshot, else the logical date), the run directory
  ``<output_root>/<config name>/<version>`` and the resolved config beside it. Same interval, same
  directory: a rerun resumes instead of duplicating shards.
* each stage task runs ``python -m pipeline run CONFIG --output DIR --until STAGE`` as a Ray job on the
  configured cluster (see jamba_ops/rayjobs.py for where the address and token come from), streams the
  job's logs into the task log and fails when the job fails; with no cluster configured it runs the same
  command locally on an embedded Ray. A retried task resumes the stage from its per-unit markers.
* ``publish`` verifies every shard against the manifest, writes ``_READY.json`` (atomic, with the
  manifest's sha256) and emits an event on the ``jamba_pretrain_shards`` asset, which schedules
  ``jamba_train``.

Knobs read from the scheduler's environment at parse time (not secrets): JAMBA_DATA_SCHEDULE (default
``@weekly``; ``none`` for manual runs only), JAMBA_AIRFLOW_RETRIES (3), JAMBA_AIRFLOW_RETRY_DELAY_S (60).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, chain, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

# Airflow's bundle DagBag puts the DAG folder on sys.path, a plain DagBag (tests, `airflow dags test` of one
# file) does not: make the helper package beside this file importable either way.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from jamba_ops import SHARDS_ASSET_NAME, SHARDS_ASSET_URI  # noqa: E402
from jamba_ops.runs import STAGES  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARDS = Asset(name=SHARDS_ASSET_NAME, uri=SHARDS_ASSET_URI)
_schedule = os.environ.get("JAMBA_DATA_SCHEDULE", "@weekly")

DEFAULT_ARGS = {
    "owner": "data",
    "retries": int(os.environ.get("JAMBA_AIRFLOW_RETRIES", "3")),
    # Lost nodes and preempted workers are transient: back off 1, 2, 4 ... min (capped), then resume.
    "retry_delay": timedelta(seconds=float(os.environ.get("JAMBA_AIRFLOW_RETRY_DELAY_S", "60"))),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
}


@dag(
    dag_id="jamba_data_pipeline",
    schedule=None if _schedule.lower() == "none" else _schedule,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["jamba", "data"],
    doc_md=__doc__,
    params={
        "config": Param(str(REPO / "configs/pipeline/web-books-code.yaml"), type="string",
                        description="pipeline YAML (on storage the Ray cluster can read)"),
        "snapshot": Param(None, type=["null", "string"],
                          description="crawl snapshot id (e.g. CC-MAIN-2024-10): names the dataset version and "
                                      "replaces ${JAMBA_SNAPSHOT} in source paths; default: the logical date"),
        "input_paths": Param({}, type="object",
                             description="optional {source name: [paths]} overriding the config's inputs"),
        "output_root": Param(os.environ.get("JAMBA_OUTPUT_ROOT", str(REPO / "runs/airflow")), type="string",
                             description="shared storage root; runs land in <root>/<config name>/<version>"),
        "ray_address": Param(None, type=["null", "string"],
                             description="Ray Jobs API URL; default: Variable jamba_ray_address, connection "
                                         "jamba_ray, else an embedded local Ray"),
        "ray_working_dir": Param(None, type=["null", "string"],
                                 description="upload this directory with each job (clusters without the "
                                             "project installed)"),
    },
)
def jamba_data_pipeline():
    @task
    def prepare(params: dict | None = None, logical_date: datetime | None = None) -> dict:
        from dataclasses import asdict

        from jamba_ops.runs import plan_run

        try:
            run = plan_run(params["config"], params["output_root"], params["snapshot"], logical_date,
                           params["input_paths"] or None)
        except (OSError, ValueError) as exc:
            raise AirflowFailException(str(exc)) from exc   # a bad parameter: retrying will not help
        print(f"dataset version {run.version}: run dir {run.run_dir}, config {run.config}")
        return asdict(run)

    @task
    def stage(run: dict, name: str) -> str:
        from jamba_ops.rayjobs import StageFailed, resolve_target, run_stage
        from jamba_ops.runs import stage_command

        context = get_current_context()
        params = context["params"]
        target = resolve_target(params["ray_address"], params["ray_working_dir"])
        try:
            return run_stage(stage_command(run, name), target, run["run_dir"], name,
                             try_number=context["ti"].try_number)
        except StageFailed as exc:
            if not exc.retryable:
                raise AirflowFailException(str(exc)) from exc
            raise

    @task(outlets=[SHARDS])
    def publish(run: dict) -> dict:
        from jamba_ops.runs import publish as publish_run

        try:
            ready = publish_run(run["run_dir"], run["version"])
        except RuntimeError as exc:
            raise AirflowFailException(str(exc)) from exc   # corrupt output: a human must look
        get_current_context()["outlet_events"][SHARDS].extra = ready
        print(f"published {ready['version']}: {ready['shards']} shards, {ready['tokens']:,} tokens, "
              f"manifest sha256 {ready['manifest_sha256']}")
        return ready

    run = prepare()
    stages = [stage.override(task_id=name)(run, name) for name in STAGES]
    chain(run, *stages, publish(run))


jamba_data_pipeline()
