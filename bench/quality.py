"""Quality scoring throughput per core vs raw fastText ``predict`` on the same texts (the limit).

Three measurements in one process (one core), same model, same real documents (the reST sources of the
Python 3.11 documentation from Debian's python3.11-doc, ~500 documents, ~11 MB, repeated ``--repeat`` times):

* ``raw``: ``fasttext_model.predict(lines, k=-1)`` on texts already made single-line: the C++ limit;
* ``score``: ``QualityModel.score(texts)`` in batches of 256: newline handling, P(label) extraction;
* ``stage``: ``QualityScoreStage.run_unit`` on the same documents as a pipeline unit: Parquet in, scores into
  JSON metadata, Parquet + score file out. What a pipeline worker does per core.

    python bench/quality.py [--model runs/quality-demo/model.bin] [--repeat 2] [--rounds 3]

Results go to bench/results/quality.json; docs/benchmarks.md records them with this command.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import QualityConfig  # noqa: E402
from pipeline.document import make_document, write_documents  # noqa: E402
from pipeline.quality.model import QualityModel, one_line  # noqa: E402
from pipeline.realdata import debian_package  # noqa: E402
from pipeline.sources.base import Unit  # noqa: E402
from pipeline.stages.quality import QualityScoreStage  # noqa: E402


class _Input:
    """The stage's input: a unit's Parquet file written beforehand."""

    name = "input"

    def __init__(self, path: Path):
        self.path = path

    def output_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.path


def documents(repeat: int) -> list[str]:
    sources = debian_package("python3.11-doc") / "root/usr/share/doc/python3.11/html/_sources"
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(sources.rglob("*.rst.txt"))]
    return texts * repeat


def best_of(rounds: int, fn) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs/quality-demo/model.bin",
                        help="a fastText classifier (`python -m pipeline quality train --config configs/quality/demo.yaml`)")
    parser.add_argument("--label", default="__label__hq")
    parser.add_argument("--repeat", type=int, default=2, help="copies of the document set")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best is reported")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/quality.json")
    args = parser.parse_args()

    model = QualityModel.load(args.model, args.label)
    texts = documents(args.repeat)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    lines = [one_line(t) for t in texts]
    raw_model = model.fasttext_model

    def raw() -> None:
        for i in range(0, len(lines), 256):
            raw_model.predict(lines[i:i + 256], k=-1, threshold=0.0, on_unicode_error="replace")

    def ours() -> None:
        for i in range(0, len(texts), 256):
            model.score(texts[i:i + 256])

    # The same answer both ways (the check that the two timed paths compute the same thing).
    labels, probs = raw_model.predict(lines[:50], k=-1)
    expected = [dict(zip(lab, p))[args.label] for lab, p in zip(labels, probs)]
    assert np.allclose(model.score(texts[:50]), expected, atol=1e-7)

    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work)
        unit_file = run_dir / "unit.parquet"
        write_documents(unit_file, (make_document(t, "docs", "web", f"doc-{i}") for i, t in enumerate(texts)))
        cfg = QualityConfig(enabled=True, models={"default": {"path": str(args.model), "label": args.label}},
                            policies={"default": {"mode": "keep"}})
        stage = QualityScoreStage(cfg, _Input(unit_file), {"docs": "web"})
        stage.warm()
        unit = Unit(id="bench", source="docs", kind="web")
        t_raw = best_of(args.rounds, raw)
        t_ours = best_of(args.rounds, ours)
        t_stage = best_of(args.rounds, lambda: stage.run_unit(unit, run_dir))
    result = {
        "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "model": str(args.model), "model_bytes": model.header.file_bytes, "documents": len(texts),
        "megabytes": round(mb, 2),
        "seconds": {"raw_predict": round(t_raw, 3), "quality_model_score": round(t_ours, 3),
                    "score_stage_unit": round(t_stage, 3)},
        "docs_per_second_per_core": {"raw_predict": round(len(texts) / t_raw), "quality_model_score":
                                     round(len(texts) / t_ours), "score_stage_unit": round(len(texts) / t_stage)},
        "mb_per_second_per_core": {"raw_predict": round(mb / t_raw, 2), "quality_model_score": round(mb / t_ours, 2),
                                   "score_stage_unit": round(mb / t_stage, 2)},
        "ratio_vs_raw": {"quality_model_score": round(t_raw / t_ours, 3), "score_stage_unit": round(t_raw / t_stage, 3)},
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
