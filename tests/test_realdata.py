"""The real-data cache under concurrency: Ray workers of several units extract the language-id model at the
same time on a fresh machine, and every one of them gets the verified file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT


def test_concurrent_lid_model_extraction_all_succeed(lid_model, tmp_path):
    from pipeline.realdata import LID_MODEL_SHA256, LID_WHEEL, cache_root, sha256_of

    wheel_dir = cache_root() / "pypi" / LID_WHEEL.replace("==", "-")
    fresh = tmp_path / "cache"
    shutil.copytree(wheel_dir, fresh / "pypi" / wheel_dir.name)   # the wheel cached, the model not yet extracted
    code = "from pipeline.realdata import lid_model_path; print(lid_model_path())"
    env = {**os.environ, "JAMBA_PRETRAIN_CACHE": str(fresh), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in results]
    target = fresh / "models" / "lid.176.ftz"
    assert {out.strip() for out, _ in results} == {str(target)}
    assert sha256_of(target) == LID_MODEL_SHA256
    assert sorted(p.name for p in target.parent.iterdir()) == ["lid.176.ftz"]   # no staging file left behind
