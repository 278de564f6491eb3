"""The scale rehearsal's smallest size as a test (bench/scale.py has the sweep): 1,000 real units through
crawl_filter and dedup on a real local Ray, with 64 partitions at fan-in 16. What must not grow with the
units or the partitions is asserted: the files one graph task holds mapped and open (at most the fan-in,
plus the one it writes), the object references the driver holds (one per task of a step, not P² per
round), and the documents come out deduplicated."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from bench.scale import book_chunks, build_units, scale_config
from tests.conftest import ROOT, real_data_unavailable

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
UNITS, PARTITIONS, FAN_IN = 1000, 64, 16


def test_a_thousand_units_hold_bounded_maps_and_driver_objects(tmp_path):
    from pipeline.realdata import FetchError

    try:
        chunks = book_chunks()[:300]          # 2,000 documents: 400 texts, each 5 times (4 near-duplicates)
    except FetchError as exc:
        real_data_unavailable(str(exc))
    data = build_units(tmp_path / "in", UNITS, chunks)
    config = scale_config(data, PARTITIONS, FAN_IN, full=False)
    config["url_dedup"] = {"enabled": False}   # the books carry no URLs: 2,000 tasks that would find nothing
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out, result = tmp_path / "run", tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/scale.py"), "--one", "--config", str(tmp_path / "c.yaml"),
                           "--out", str(out), "--result", str(result), "--until", "dedup"],
                          cwd=ROOT, env={**os.environ, "JAMBA_RAY_DASHBOARD": "0"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(result.read_text())
    shuffle = measured["shuffle"]
    print(json.dumps(measured))
    assert measured["units"] == UNITS and measured["documents"] == 2 * UNITS
    # every passage is kept once; its four replicas (their own first line) are near-duplicates
    assert measured["removed"] >= 0.75 * 2 * UNITS
    # 1,000 band files -> 63 -> 4 at fan-in 16: no graph task mapped more than its fan-in
    assert shuffle["band_merge_levels"] == 2
    assert 1 <= shuffle["max_maps_per_task"] <= FAN_IN
    assert shuffle["max_open_files_per_task"] <= FAN_IN + 1
    # the driver: one reference per task of the widest step (P = 64 here), never P^2 = 4,096
    assert shuffle["max_driver_refs"] <= max(PARTITIONS, math.ceil(UNITS / FAN_IN))
    assert measured["driver_peak_refs"] <= 2 * PARTITIONS + 64
