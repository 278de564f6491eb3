"""Bounded work per page: extraction in a child process with a per-page time limit.

Neither extractor can be interrupted from inside: Resiliparse parses in C (lexbor) and trafilatura spends
its time in lxml, so a signal-based alarm would fire only after the parse returns. The page function
therefore runs in a long-lived child (one per worker, started on first use) that takes pages in batches
over a pipe and answers page by page. The parent waits for each answer with ``select`` up to ``timeout_s``; a page that runs over is booked
``extract_timeout``, the child is killed and a fresh one takes the rest of the batch. A page that kills the child
(a segfault, an out-of-memory kill) is booked ``extract_crashed``. The overhead is measured in
docs/benchmarks.md. With ``timeout_s <= 0`` the function runs in-process.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from pathlib import Path

from pipeline.extract.frames import read_frame, write_frame
from pipeline.extract.html import ExtractResult, ExtractSettings, HtmlToText

_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
STARTUP_TIMEOUT_S = 120.0


class PageExtractor:
    """``extractor(body, header_charset) -> ExtractResult``, each call bounded by ``timeout_s``."""

    def __init__(self, settings: ExtractSettings, timeout_s: float):
        self.settings = settings
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._local = HtmlToText(settings) if timeout_s <= 0 else None
        self.restarts = 0

    def __call__(self, body: bytes, header_label: str | None) -> ExtractResult:
        return self.extract_many([(body, header_label)])[0]

    def extract_many(self, pages: list[tuple[bytes, str | None]]) -> list[ExtractResult]:
        """One result per page, in order. Pages go to the child in one batch; it answers page by page, and
        each answer must arrive within ``timeout_s`` of the previous one (or of the send)."""
        if self._local is not None:
            return [self._local(body, label) for body, label in pages]
        results: list[ExtractResult] = []
        while len(results) < len(pages):
            pending = pages[len(results):]
            proc = self._child()
            try:
                write_frame(proc.stdin.fileno(), pending)
            except OSError:  # the child died between batches
                self._discard()
                results.append(ExtractResult("errored", reason="extract_crashed"))
                continue
            for _ in pending:
                ready, _, _ = select.select([proc.stdout.fileno()], [], [], self.timeout_s)
                if not ready:
                    self._discard()
                    results.append(ExtractResult("dropped", reason="extract_timeout"))
                    break
                result = read_frame(proc.stdout.fileno())
                if not isinstance(result, ExtractResult):
                    self._discard()
                    results.append(ExtractResult("errored", reason="extract_crashed"))
                    break
                results.append(result)
        return results

    def _child(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:
            self._discard()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_PROJECT_ROOT, os.environ.get("PYTHONPATH"))
                                                            if p)}
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.extract.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, cwd=_PROJECT_ROOT, close_fds=True)
        write_frame(proc.stdin.fileno(), self.settings)
        ready, _, _ = select.select([proc.stdout.fileno()], [], [], STARTUP_TIMEOUT_S)
        if not ready or read_frame(proc.stdout.fileno()) != "ready":
            proc.kill()
            proc.wait()
            raise RuntimeError("the extraction child process did not start (see the worker's stderr)")
        self._proc = proc
        return proc

    def _discard(self) -> None:
        """Kill the child after a timeout or crash; the next page starts a fresh one."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self.restarts += 1
        _stop(proc)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop(proc)

    def __del__(self):  # a worker process ending takes its child with it (the child also exits on stdin EOF)
        with contextlib.suppress(Exception):
            self.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            stream.close()
