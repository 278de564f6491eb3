"""Run one pipeline stage as a Ray job (Ray Jobs SDK) or, with no cluster configured, as a local subprocess.

Where the cluster is and how to authenticate come from Airflow, never from DAG code:

* address: the DAG param ``ray_address``, else the Airflow Variable ``jamba_ray_address``, else the
  Airflow connection ``jamba_ray`` (host/port of the Ray dashboard, which also serves the Jobs API);
* token (Ray token authentication): the password of the ``jamba_ray`` connection, else ``$RAY_AUTH_TOKEN``
  in the worker's environment. It travels only in the HTTP ``Authorization`` header.

Retries: every job carries metadata naming its run directory and stage. A retried Airflow task first
looks for a job of the same run and stage that is still running (the Airflow worker died, the Ray job did
not) and follows it instead of submitting a second driver onto the same run directory; otherwise it
submits a new job, which resumes the stage from the pipeline's per-unit completion markers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RAY_CONN_ID = "jamba_ray"
RAY_ADDRESS_VARIABLE = "jamba_ray_address"
EXIT_CONFIG = 2          # `python -m pipeline` exit status for a bad configuration: retrying cannot help
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class StageFailed(RuntimeError):
    """The stage's job failed; ``retryable`` is False when a rerun cannot succeed (bad configuration)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class RayTarget:
    address: str | None                 # Jobs API URL (http://host:8265); None = embedded local Ray
    token: str | None = None
    working_dir: str | None = None      # uploaded with the job when the cluster lacks the project

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def _http(address: str) -> str:
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def resolve_target(param_address: str | None = None, working_dir: str | None = None) -> RayTarget:
    """The cluster to submit to, from the DAG param, the Airflow Variable, or the Airflow connection."""
    from airflow.sdk import Connection, Variable

    conn = None
    try:
        conn = Connection.get(RAY_CONN_ID)
    except Exception:  # not defined: fine, the other sources or local mode apply
        conn = None
    address = param_address or Variable.get(RAY_ADDRESS_VARIABLE, default=None)
    if not address and conn is not None and conn.host:
        address = f"{conn.schema or 'http'}://{conn.host}:{conn.port or 8265}"
    token = (conn.password if conn is not None else None) or os.environ.get("RAY_AUTH_TOKEN") or None
    return RayTarget(_http(address) if address else None, token, working_dir or None)


def job_key(run_dir: str, stage: str) -> str:
    """Stable across retries and Airflow runs: the (run directory, stage) a job works on."""
    return hashlib.sha256(f"{run_dir}\0{stage}".encode()).hexdigest()[:16]


def run_stage(command: list[str], target: RayTarget, run_dir: str, stage: str, try_number: int = 1,
              emit: Callable[[str], None] = print, env: dict[str, str] | None = None) -> str:
    """Run ``command`` to completion, streaming its output through ``emit``; return the job id or 'local'."""
    if target.address is None:
        _run_local(command, emit, env)
        return "local"
    return _run_ray_job(command, target, run_dir, stage, try_number, emit, env)


# ---------------------------------------------------------------------------------------------- Ray
def _run_ray_job(command: list[str], target: RayTarget, run_dir: str, stage: str, try_number: int,
                 emit: Callable[[str], None], env: dict[str, str] | None) -> str:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(target.address, headers=target.headers)
    key = job_key(run_dir, stage)
    job_id = _running_job(client, key)
    if job_id is not None:
        emit(f"following job {job_id}, still running from an earlier attempt of this stage")
    else:
        runtime_env: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})}}
        if target.working_dir:
            runtime_env["working_dir"] = target.working_dir
        job_id = client.submit_job(
            entrypoint=shlex.join(command), runtime_env=runtime_env,
            submission_id=f"jamba-{stage}-{key}-try{try_number}-{secrets.token_hex(3)}",
            metadata={"jamba_job_key": key, "jamba_stage": stage, "jamba_run_dir": run_dir})
        emit(f"submitted Ray job {job_id} to {target.address}: {shlex.join(command)}")
    try:
        _follow(client, job_id, emit)
        status, info = _wait_terminal(client, job_id)
    except BaseException:
        # The Airflow task is being killed (timeout, marked failed, SIGTERM): take its job down with it, so a
        # retry never races a leftover driver on the same run directory.
        _stop_quietly(client, job_id)
        raise
    if status != "SUCCEEDED":
        code = getattr(info, "driver_exit_code", None)
        raise StageFailed(f"Ray job {job_id} {status} (exit code {code}): {info.message}",
                          retryable=code != EXIT_CONFIG)
    return job_id


def _running_job(client: Any, key: str) -> str | None:
    for job in client.list_jobs():
        if (job.metadata or {}).get("jamba_job_key") == key and str(job.status) not in TERMINAL:
            return job.submission_id
    return None


def _follow(client: Any, job_id: str, emit: Callable[[str], None]) -> None:
    async def tail() -> None:
        buffer = ""
        async for chunk in client.tail_job_logs(job_id):
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                emit(line)
        if buffer:
            emit(buffer)

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log socket closed early; the status poll below still decides
        emit(f"log stream of {job_id} ended: {exc}")


def _wait_terminal(client: Any, job_id: str, poll_s: float = 1.0) -> tuple[str, Any]:
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL:
            return str(info.status), info
        time.sleep(poll_s)


def _stop_quietly(client: Any, job_id: str) -> None:
    try:
        client.stop_job(job_id)
    except Exception as exc:  # best effort on the way out; the original exception matters more
        log.warning("could not stop Ray job %s: %s", job_id, exc)


# -------------------------------------------------------------------------------------------- local
def _run_local(command: list[str], emit: Callable[[str], None], env: dict[str, str] | None) -> None:
    """No cluster configured: the pipeline starts an embedded Ray in a subprocess of the Airflow worker."""
    if command and command[0] == "python":
        command = [sys.executable, *command[1:]]   # the worker's interpreter, which has the project
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            emit(line.rstrip("\n"))
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if code != 0:
        raise StageFailed(f"{shlex.join(command)} exited with {code}", retryable=code != EXIT_CONFIG)
