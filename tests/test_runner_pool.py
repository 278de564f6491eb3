"""The actor pool of an actor stage follows the cluster as it grows (an autoscaled cluster starts with the
head alone): a real local Ray with 2 CPUs whose reported size is 1 CPU when the stage starts and 2 a
few seconds later (what ``ray.cluster_resources`` says when a node joins); the stage ends with two actors,
both of which ran units."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from pipeline.config import parse_config
from pipeline.ledger import Ledger
from pipeline.runner import PipelineRun, init_ray, shutdown_ray
from pipeline.sources.base import Unit
from pipeline.stages.base import MapStage

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers need not import the tests package


class SlowActorStage(MapStage):
    """An actor stage whose units take a moment and say which worker process ran them."""

    name = "slow_actor"
    uses_actors = True

    def actor_memory(self) -> int:
        return 64 * 2**20

    def run_unit(self, unit: Unit, run_dir: Path) -> dict:
        time.sleep(0.25)
        return {"ledger": Ledger().to_json(), "pid": os.getpid()}


@pytest.mark.slow
def test_the_actor_pool_grows_when_the_cluster_does(tmp_path, monkeypatch):
    import ray

    (tmp_path / "b.txt").write_text("a book")
    config = parse_config({"sources": [{"name": "b", "kind": "book", "paths": [str(tmp_path / "b.txt")]}]})
    run = PipelineRun(config, tmp_path / "run", progress=False)
    run.run_dir.mkdir()
    run.units = [Unit(id=f"b-{i:05d}", source="b", kind="book") for i in range(48)]
    run.resumed, run.wall_seconds, run.actors = {}, {}, {}
    init_ray(None, 2)
    try:
        started = time.monotonic()
        real = ray.cluster_resources

        def growing_cluster() -> dict:
            resources = dict(real())
            resources["CPU"] = 1.0 if time.monotonic() - started < 2.0 else 2.0   # a node joins after 2 s
            return resources

        monkeypatch.setattr(ray, "cluster_resources", growing_cluster)
        results = run.map_stage(SlowActorStage())
    finally:
        shutdown_ray()
    assert len(results) == 48
    assert run.actors["slow_actor"] == 2
    assert len({r["pid"] for r in results.values()}) == 2       # the new actor took units too


def test_local_workers_get_one_thread_each_and_the_driver_keeps_its_environment(monkeypatch):
    """The embedded Ray's workers run with RAYON_NUM_THREADS=1 (one core per task: the tokenizers library's
    threads would oversubscribe the node) inherited from the driver while Ray starts; the driver's own
    environment is as it was (it trains no tokenizer in one thread)."""
    import ray

    monkeypatch.setenv("RAYON_NUM_THREADS", "7")
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    init_ray(None, 2)
    try:
        def worker_env() -> tuple[str | None, str | None]:
            return os.environ.get("RAYON_NUM_THREADS"), os.environ.get("TOKENIZERS_PARALLELISM")

        seen = set(ray.get([ray.remote(worker_env).remote() for _ in range(8)]))
    finally:
        shutdown_ray()
    assert seen == {("1", "false")}
    assert os.environ["RAYON_NUM_THREADS"] == "7" and "TOKENIZERS_PARALLELISM" not in os.environ
