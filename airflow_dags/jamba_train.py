"""Airflow DAG ``jamba_train``: plan the memory of a DeepSpeed launch, refuse it if it does not fit, launch.

    resolve_data -> plan -> launch

Scheduled on the ``jamba_pretrain_shards`` asset (an event per dataset version that
``jamba_data_pipeline`` publishes) and triggerable by hand with ``params.data_runs``.

* ``resolve_data``: the run directories to train on: ``params.data_runs``, else the directories named by
  the asset events that triggered this run; each must carry ``_READY.json``;
* ``plan``: ``python -m train plan --config C --gpus N --gpu-memory M``; exit status 3 (does not fit) fails
  the task without retries, so nothing is launched;
* ``launch``: the DeepSpeed command on the training hosts through the chosen launcher (jamba_ops/launch.py:
  ``local`` subprocess or ``ssh`` to the launch host; Kubernetes via a pod operator, docs/operations.md).
  A retried launch resumes from the checkpoint directory's ``latest`` tag (the trainer's own resume).
"""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parent.parent
SHARDS = Asset(name=SHARDS_ASSET_NAME, uri=SHARDS_ASSET_URI)


def _tool(name: str) -> str:
    """A bare tool name means the one installed next to this worker's Python (the project's venv)."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.exists() else name


@dag(
    dag_id="jamba_train",
    schedule=[SHARDS],
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "training", "retries": 1, "retry_delay": timedelta(minutes=5)},
    tags=["jamba", "train"],
    doc_md=__doc__,
    params={
        "train_config": Param("configs/train/jamba-v0.1-h100.yaml", type="string",
                              description="trainer YAML, relative to workdir"),
        "gpus": Param(128, type="integer", minimum=1, description="total ranks, for the memory plan"),
        "gpus_per_node": Param(8, type="integer", minimum=1),
        "gpu_memory": Param("80GB", type="string", description="per GPU, e.g. 80GB or 80GiB"),
        "hostfile": Param(None, type=["null", "string"],
                          description="DeepSpeed hostfile on the launch host (multi-node); none = one node"),
        "launcher": Param("local", enum=["local", "ssh"], description="see jamba_ops/launch.py"),
        "launch_host": Param(None, type=["null", "string"], description="ssh launcher: the host to run on"),
        "workdir": Param(str(REPO), type="string", description="project checkout on the launch host"),
        "master_port": Param(None, type=["null", "integer"], description="rendezvous port (default: DeepSpeed's 29500)"),
        "data_runs": Param([], type="array", description="run directories; default: the triggering events'"),
        "extra_sets": Param([], type="array", description="more trainer --set KEY=VALUE overrides"),
    },
)
def jamba_train():
    @task
    def resolve_data(params: dict | None = None) -> list[str]:
        from jamba_ops.launch import ready_runs

        runs = list(params["data_runs"])
        if not runs:
            events = get_current_context().get("triggering_asset_events") or {}
            runs = [e.extra["run_dir"] for evs in events.values() for e in evs if e.extra.get("run_dir")]
        if not runs:
            raise AirflowFailException("no data to train on: trigger with params.data_runs or via the asset")
        try:
            return ready_runs(runs)
        except RuntimeError as exc:
            raise AirflowFailException(str(exc)) from exc

    @task(retries=0)
    def plan(data_runs: list[str], params: dict | None = None) -> str:
        from jamba_ops.launch import PlanRefused, check_plan, plan_command

        command = plan_command(sys.executable, params["train_config"], params["gpus"], params["gpu_memory"],
                               data_runs, params["extra_sets"])
        try:
            return check_plan(command, cwd=params["workdir"])
        except PlanRefused as exc:
            raise AirflowFailException(str(exc)) from exc

    @task
    def launch(data_runs: list[str], params: dict | None = None) -> None:
        from jamba_ops.launch import launch as run_launcher
        from jamba_ops.launch import train_command

        deepspeed = _tool("deepspeed") if params["launcher"] == "local" else "deepspeed"
        command = train_command(deepspeed, params["train_config"], params["gpus_per_node"], params["hostfile"],
                                data_runs, params["extra_sets"], params["master_port"])
        run_launcher(params["launcher"], command, params["workdir"], params["launch_host"])

    data = resolve_data()
    chain(data, plan(data), launch(data))


jamba_train()
