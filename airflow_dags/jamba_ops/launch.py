"""Training launches from Airflow: check the memory plan, then start the DeepSpeed launcher.

Launchers (the DAG param ``launcher``; an operator's choice, see docs/operations.md):

* ``local``: the ``deepspeed`` launcher as a subprocess of the Airflow worker (a GPU box that is also the
  worker, and the tests: 2 CPU ranks);
* ``ssh``: ``ssh <launch_host> 'cd <workdir> && deepspeed --hostfile ...'``; the launcher host then reaches
  the other hosts of the hostfile over its own passwordless SSH, as DeepSpeed's pdsh/ssh runner does. Keys
  come from the worker's SSH agent / ~/.ssh, never from the DAG;
* Kubernetes: not a launcher here; replace the ``launch`` task with a KubernetesPodOperator (or a
  Kubeflow PyTorchJob) running the same ``train_command`` in the training image (docs/operations.md).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

EXIT_DOES_NOT_FIT = 3   # `python -m train plan` when the plan exceeds the GPU memory
LAUNCHERS = ("local", "ssh")


class PlanRefused(RuntimeError):
    """The memory plan does not fit: launching would only die with an out-of-memory error later."""


def _sets(data_runs: list[str], extra_sets: list[str]) -> list[str]:
    args: list[str] = []
    if data_runs:
        args += ["--set", "data.runs=" + json.dumps([str(r) for r in data_runs])]
    for item in extra_sets:
        args += ["--set", item]
    return args


def plan_command(python: str, config: str, gpus: int, gpu_memory: str, data_runs: list[str],
                 extra_sets: list[str]) -> list[str]:
    return [python, "-m", "train", "plan", "--config", config, "--gpus", str(gpus), "--gpu-memory", gpu_memory,
            *_sets(data_runs, extra_sets)]


def train_command(deepspeed: str, config: str, gpus_per_node: int, hostfile: str | None, data_runs: list[str],
                  extra_sets: list[str], master_port: int | None = None) -> list[str]:
    where = ["--hostfile", hostfile] if hostfile else ["--num_gpus", str(gpus_per_node)]
    # DeepSpeed's default rendezvous port is 29500: two launches sharing a host need different ones.
    port = ["--master_port", str(master_port)] if master_port else []
    return [deepspeed, *where, *port, "--module", "train", "--config", config, *_sets(data_runs, extra_sets)]


def check_plan(command: list[str], cwd: str, emit: Callable[[str], None] = print) -> str:
    """Run the plan; raise PlanRefused on exit 3 and RuntimeError on any other failure."""
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    for line in (proc.stdout + proc.stderr).splitlines():
        emit(line)
    if proc.returncode == EXIT_DOES_NOT_FIT:
        raise PlanRefused(f"the training plan does not fit: {shlex.join(command)}")
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} exited with {proc.returncode}")
    return proc.stdout


def ready_runs(run_dirs: list[str]) -> list[str]:
    """Only published dataset versions (``_READY.json``) may be trained on."""
    missing = [r for r in run_dirs if not (Path(r) / "_READY.json").exists()]
    if missing:
        raise RuntimeError(f"not published (no _READY.json): {', '.join(missing)}")
    return run_dirs


def launch(launcher: str, command: list[str], workdir: str, launch_host: str | None = None,
           emit: Callable[[str], None] = print, timeout_s: float | None = None) -> None:
    """Run the DeepSpeed launcher to completion, streaming its output."""
    if launcher == "local":
        argv, cwd = command, workdir
    elif launcher == "ssh":
        if not launch_host:
            raise ValueError("launcher ssh needs launch_host")
        remote = f"cd {shlex.quote(workdir)} && {shlex.join(command)}"
        argv, cwd = ["ssh", "-o", "BatchMode=yes", launch_host, remote], None
    else:
        raise ValueError(f"launcher {launcher!r}: one of {', '.join(LAUNCHERS)} (Kubernetes: see docs/operations.md)")
    emit(f"launching ({launcher}): {shlex.join(argv)}")
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            emit(line.rstrip("\n"))
        code = proc.wait(timeout=timeout_s)
    except BaseException:
        proc.kill()   # the task is being killed: do not leave a launcher (and its ranks) behind
        proc.wait()
        raise
    if code != 0:
        raise RuntimeError(f"training launcher exited with {code}")
