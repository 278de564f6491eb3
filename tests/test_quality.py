"""Quality scoring: the classifier trained on real text separates reference prose from boilerplate, the
distributed percentile equals numpy's, selection is deterministic, bad models fail before any work."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import ConfigError, QualityConfig, parse_config
from pipeline.quality import select
from pipeline.quality.metrics import binary_metrics, roc_auc
from pipeline.quality.model import QualityModel, QualityModelError, check_model_file, inspect_fasttext_file
from pipeline.quality.train import chunk_text
from pipeline.sources.base import Unit
from pipeline.stages.quality import SCORES_SCHEMA, QualityScoreStage, compute_thresholds
from tests.conftest import run_cli, write_config


# --------------------------------------------------------------------------------- the classifier
@pytest.mark.realdata
def test_trained_classifier_card_reports_held_out_metrics(quality_model):
    card = json.loads((quality_model.parent / "card.json").read_text())
    assert card["sha256"] == QualityModel.load(quality_model, "__label__hq").sha256
    m = card["holdout"]["metrics"]
    assert m["roc_auc"] >= 0.9 and m["precision"] >= 0.8 and m["recall"] >= 0.8
    assert m["tp"] + m["fn"] == card["counts"]["holdout_positive"]
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == card["counts"]["holdout"]
    assert card["hyperparameters"]["wordNgrams"] == 2
    assert {s["name"] for s in card["sources"]} == {"books", "python-reference", "docs-index-pages", "ui-strings",
                                                    "changelogs"}
    assert card["versions"]["fasttext"] and card["versions"]["jamba-pretrain"]


@pytest.mark.realdata
def test_classifier_separates_unseen_reference_prose_from_unseen_boilerplate(quality_model, python_docs_html):
    """Texts the classifier never saw: the library reference's prose (it trained on the tutorial, HOWTOs and
    FAQ) against the Debian changelogs of packages it did not train on."""
    from pipeline.realdata import debian_package

    model = QualityModel.load(quality_model, "__label__hq")
    prose = []
    for path in sorted((python_docs_html / "_sources/library").glob("*.rst.txt"))[:60]:
        prose += [c for c in chunk_text(path.read_text(), 1200) if len(c) >= 400][:3]
    boilerplate = []
    for pkg in ("bible-kjv", "dict-devil", "r-cran-janeaustenr", "python3.11-doc", "debian-handbook", "base-files"):
        doc = debian_package(pkg) / "root/usr/share/doc"
        for changelog in [*doc.glob("*/changelog.Debian.gz"), *doc.glob("base-files/changelog.gz")]:
            boilerplate += [c for c in chunk_text(gzip.decompress(changelog.read_bytes()).decode(), 1200)
                            if len(c) >= 400][:40]
    assert len(prose) >= 100 and len(boilerplate) >= 40, (len(prose), len(boilerplate))
    scores = model.score(prose + boilerplate)
    labels = np.array([True] * len(prose) + [False] * len(boilerplate))
    assert roc_auc(labels, scores) >= 0.9


@pytest.mark.realdata
def test_empty_and_odd_documents_score_without_crashing(quality_model):
    model = QualityModel.load(quality_model, "__label__hq")
    scores = model.score(["", "\n\n", "\r\n", "word", "\ud800 lone surrogate", "x" * 200_000])
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert model.score([]).shape == (0,)


def test_roc_auc_equals_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=60).astype(float)       # many ties
    labels = rng.random(60) < 0.4
    pairs = [(p, n) for p in scores[labels] for n in scores[~labels]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    m = binary_metrics(labels, scores / 5, threshold=0.5)
    predicted = scores / 5 >= 0.5
    assert m["precision"] == pytest.approx((predicted & labels).sum() / predicted.sum())
    assert m["recall"] == pytest.approx((predicted & labels).sum() / labels.sum())


def test_chunks_follow_paragraphs_and_lose_no_text():
    text = "para one line a\npara one line b\n\n" + "long line " * 100 + "\n\nlast"
    chunks = list(chunk_text(text, 120))
    assert all(len(c) <= 120 for c in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert chunks[0] == "para one line a\npara one line b"


# ------------------------------------------------------------------------------------ model files
@pytest.mark.realdata
def test_corrupt_missing_or_mislabelled_models_are_clear_errors(quality_model, tmp_path, lid_model):
    good = quality_model.read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good[: len(good) // 2])
    flipped = tmp_path / "trailing.bin"
    flipped.write_bytes(good + b"\0" * 16)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a model" * 100)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    cases = {truncated: "not a complete fastText model", flipped: "unexpected trailing bytes",
             garbage: "not a fastText model", empty: "empty", tmp_path / "missing.bin": "not found"}
    for path, message in cases.items():
        with pytest.raises(QualityModelError, match=message):
            QualityModel.load(path, "__label__hq")
    with pytest.raises(QualityModelError, match="'__label__nope' is not one of the model's labels"):
        QualityModel.load(quality_model, "__label__nope")
    # An external model by path and label: fastText's language-ID model, P(__label__en).
    lid = QualityModel.load(lid_model, "__label__en")
    assert inspect_fasttext_file(lid_model).quantized
    english, french = lid.score(["The weather is lovely today.", "Il fait très beau aujourd'hui."])
    assert english > 0.5 > french
    # The same checks from the file layout alone (what the driver runs: it never loads the model)
    for path, message in cases.items():
        with pytest.raises(QualityModelError, match=message):
            check_model_file(path, "__label__hq")
    with pytest.raises(QualityModelError, match="'__label__nope' is not one of the model's labels"):
        check_model_file(quality_model, "__label__nope")
    assert set(check_model_file(quality_model, "__label__hq").label_names) == set(QualityModel.load(
        quality_model, "__label__hq").labels)
    assert len(check_model_file(lid_model, "__label__en").label_names) == 176


def test_the_driver_checks_models_without_loading_them_and_hashes_each_once(quality_model, tmp_path, monkeypatch):
    import fasttext

    from pipeline.stages import quality as quality_stage

    model = tmp_path / "model.bin"
    model.write_bytes(quality_model.read_bytes())
    cfg = QualityConfig.model_validate({"enabled": True, "models": {"default": {"path": str(model)}},
                                        "policies": {"default": {"mode": "keep"}}})
    monkeypatch.setattr(fasttext, "load_model", lambda *_: pytest.fail("the driver loaded a model"))
    assert set(quality_stage.check_models(cfg)) == {"default"}
    first = quality_stage.model_digests(cfg)["default"]
    assert first["bytes"] == model.stat().st_size and len(first["sha256"]) == 64
    hashed = []
    monkeypatch.setattr(quality_stage, "sha256_file", lambda path: hashed.append(path) or "recomputed")
    assert quality_stage.model_digests(cfg, {"default": first})["default"] == first and hashed == []
    model.write_bytes(model.read_bytes())  # rewritten: new mtime, so hashed again
    assert quality_stage.model_digests(cfg, {"default": first})["default"]["sha256"] == "recomputed"
    assert quality_stage.actor_memory(cfg) > model.stat().st_size  # what each scoring actor declares to Ray


@pytest.mark.realdata
@pytest.mark.slow
def test_a_bad_model_stops_the_run_before_any_work(corpus, quality_model, tmp_path):
    broken = tmp_path / "broken.bin"
    broken.write_bytes(quality_model.read_bytes()[:1000])
    config = write_config(corpus, tmp_path / "c.yaml", broken)
    run_dir = tmp_path / "run"
    proc = run_cli("run", str(config), "--output", str(run_dir), "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: quality.models.default: ")
    assert "not a complete fastText model" in proc.stderr
    assert not (run_dir / "stages").exists()
    proc = run_cli("validate", str(config))
    assert proc.returncode == 2 and "quality.models.default" in proc.stderr


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("quality, message", [
    ({"enabled": True}, "quality: Value error, enabled needs at least one model"),
    ({"enabled": True, "models": {"m": {"path": "x"}}, "policies": {"web": {"mode": "percentile"}}},
     "needs keep_percent"),
    ({"enabled": True, "models": {"m": {"path": "x"}}, "policies": {"default": {"model": "m", "mode": "keep"},
                                                                      "web": {"mode": "keep"}}},
     "policies.web.model: 'default' is not a key of quality.models"),
    ({"enabled": True, "models": {"default": {"path": "x"}}, "policies": {"nosuch": {"mode": "keep"}}},
     "quality.policies.nosuch: not a source name"),
    ({"policies": {"web": {"mode": "percentile", "keep_percent": 120}}}, "quality.policies.web.keep_percent"),
])
def test_quality_config_errors_name_the_key(quality, message, tmp_path):
    data = {"sources": [{"name": "w", "kind": "web", "paths": [str(tmp_path)]}], "quality": quality}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(data)


def test_policy_lookup_prefers_source_then_kind_then_default():
    cfg = QualityConfig(enabled=True, models={"default": {"path": "m"}, "code": {"path": "c"}},
                        policies={"default": {"mode": "keep"}, "web": {"mode": "threshold", "min_score": 0.3},
                                  "forum": {"mode": "pareto"}, "code": {"mode": "keep", "model": "code"}})
    assert cfg.policy_for("forum", "web").mode == "pareto"
    assert cfg.policy_for("crawl", "web").mode == "threshold"
    assert cfg.policy_for("books", "book").mode == "keep"
    assert cfg.policy_for("stdlib", "code").model == "code"   # code scored by its own classifier


# ------------------------------------------------------------------------------------- selection
def _write_scores(path: Path, sources: list[str], scores: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"source": pa.array(sources, pa.string()),
                      "score": pa.array(scores, pa.float32(), mask=np.isnan(scores))}, schema=SCORES_SCHEMA)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCORES_SCHEMA) as writer:
        writer.write_table(table)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_distributed_percentile_equals_numpy(tmp_path, local_ray):
    """Scores spread over 7 units and 3 Ray tasks, with ties, a one-document source, NaN (unscored) rows,
    and a source whose scores pile up at 1.0: every threshold equals numpy.percentile over all of them."""
    rng = np.random.default_rng(7)
    by_source = {"web": rng.beta(2, 5, 5003).astype(np.float32),
                 "ties": rng.choice(np.float32([0.1, 0.25, 0.5, 0.75]), 999),
                 "one": np.float32([0.3]),
                 "saturated": np.minimum(rng.random(2000) * 1.5, 1.0).astype(np.float32)}
    policies = {"web": 70.0, "ties": 33.0, "one": 50.0, "saturated": 10.0}
    rows = [(s, v) for s, values in by_source.items() for v in values] + [("web", np.nan)] * 11
    order = rng.permutation(len(rows))
    units = [Unit(id=f"u{i}", source="mixed", kind="web") for i in range(7)]
    stage = QualityScoreStage(QualityConfig(), None, {})
    for unit, part in zip(units, np.array_split(order, len(units))):
        _write_scores(stage.scores_path(tmp_path, unit), [rows[i][0] for i in part],
                      np.array([rows[i][1] for i in part], dtype=np.float32))
    cfg = QualityConfig(enabled=True, models={"default": {"path": "unused"}},
                        policies={s: {"mode": "percentile", "keep_percent": k} for s, k in policies.items()})
    # Every unit holds documents of every source: the threshold of each spans all units.
    units_all = [Unit(id=u.id, source=s, kind="web") for u in units for s in policies]
    result = compute_thresholds(tmp_path, stage, units_all, cfg, {s: "web" for s in policies}, tasks=3)
    for source, keep in policies.items():
        expected = np.percentile(by_source[source].astype(np.float64), 100 - keep)
        got = result["thresholds"][source]
        assert got["threshold"] == pytest.approx(float(expected), rel=0, abs=1e-15), source
        assert got["scored"] == by_source[source].size
        # numpy's linear interpolation lands between two order statistics: at least (n - 1) * X% are kept.
        n = by_source[source].size
        assert (by_source[source] >= got["threshold"]).sum() >= np.ceil((n - 1) * keep / 100 - 1e-9)


def test_radix_select_finds_every_order_statistic():
    values = np.float32([0.0, -0.0, 1.0, 0.5, 0.5, 1e-30, 0.3333, 0.99999994])
    keys = select.score_keys(values)
    hist = select.dense([select.high_counts(keys)])
    for rank, expected in enumerate(np.sort(values.astype(np.float64))):
        bucket, inner = select.locate(hist, rank)
        low, _ = select.locate(select.dense([select.low_counts(keys, bucket)]), inner)
        assert select.key_value(bucket, low) == abs(expected)


def test_pareto_selection_is_deterministic_and_placement_free():
    ids = [f"doc-{i}" for i in range(20000)]
    scores = np.full(len(ids), 0.5)
    a = select.pareto_keep(scores, ids, seed=3, alpha=9.0)
    assert np.array_equal(a, select.pareto_keep(scores, ids, seed=3, alpha=9.0))
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = select.pareto_keep(scores[perm], [ids[i] for i in perm], seed=3, alpha=9.0)
    assert np.array_equal(shuffled, a[perm])                      # a decision follows the document
    assert not np.array_equal(a, select.pareto_keep(scores, ids, seed=4, alpha=9.0))
    # P(Lomax(alpha) > 1 - s) = (2 - s)^-alpha: 1.5^-9 = 2.60% at s = 0.5 (numpy's pareto semantics).
    assert a.mean() == pytest.approx(1.5 ** -9, abs=0.005)
    assert select.pareto_keep(np.ones(len(ids)), ids, 3, 9.0).all()   # score 1: kept whatever the draw



@pytest.mark.realdata
def test_training_is_reproducible(quality_model, corpus, tmp_path):
    """The same data, seed and settings (one fastText thread) give a byte-identical model."""
    from pipeline.quality.train import load_train_config, train_classifier
    from tests.conftest import write_quality_train_config

    config = write_quality_train_config(corpus, tmp_path / "train.yaml", tmp_path / "again")
    card = train_classifier(load_train_config(config), tmp_path / "again")
    first = json.loads((quality_model.parent / "card.json").read_text())
    assert card["sha256"] == first["sha256"]
    assert card["training_attempts"] == [{"lr": 0.1, "error": None}]


@pytest.mark.parametrize("text, message", [
    (None, "cannot read config"),
    ("positive: [\n", "invalid YAML at line 2"),
    ("positive: []\nnegative: []\n", "positive: List should have at least 1 item"),
    ("positive: [{name: a, paths: [/no/such/dir]}]\nnegative: [{name: b, paths: [/tmp]}]\n",
     "positive[0].paths[0]: /no/such/dir does not exist"),
])
def test_quality_train_config_errors_are_one_line(text, message, tmp_path):
    config = tmp_path / "train.yaml"
    if text is not None:
        config.write_text(text)
    proc = run_cli("quality", "train", "--config", str(config))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


class _Input:
    """Stands for the stage before quality: where a unit's documents are."""

    def __init__(self, path: Path):
        self.path = path

    def output_path(self, run_dir: Path, unit: Unit) -> Path:
        return self.path


@pytest.mark.realdata
@pytest.mark.parametrize("mode", [{"mode": "pareto"}, {"mode": "threshold", "min_score": 0.5}])
def test_score_and_select_stream_a_unit_in_batches(quality_model, corpus, tmp_path, mode):
    """Both stages read and write a unit batch by batch, and give what deciding on the whole table gives."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.document import make_document, write_documents
    from pipeline.stages.quality import QualitySelectStage

    text = (corpus.root / "books/austen-persuasion.txt").read_text()
    paras = [p.strip() for p in text.split("\n\n") if p.strip()][:700] + ["", "   "]
    docs = [make_document(p, "books", "book", f"persuasion#{i}") for i, p in enumerate(paras)]
    write_documents(tmp_path / "in.parquet", docs)
    cfg = QualityConfig(enabled=True, models={"default": {"path": str(quality_model)}}, batch_size=64,
                        policies={"default": mode})
    unit = Unit(id="books-00000", source="books", kind="book")
    score = QualityScoreStage(cfg, _Input(tmp_path / "in.parquet"), {"books": "book"})
    result = score.run_unit(unit, tmp_path)
    scored = pq.ParquetFile(score.output_path(tmp_path, unit))
    assert scored.metadata.num_row_groups > 1                       # written batch by batch
    table = scored.read()
    model = QualityModel.load(str(quality_model), cfg.models["default"].label, cfg.models["default"].max_chars)
    expected = model.score(paras)
    scores = pa.ipc.open_file(pa.memory_map(str(score.scores_path(tmp_path, unit)))).read_all()
    assert scores.column("source").to_pylist() == ["books"] * len(paras)
    np.testing.assert_array_equal(scores.column("score").to_numpy(zero_copy_only=False), expected)
    assert table.column("id").to_pylist() == [d.id for d in docs] and result["documents"] == len(paras)
    assert [json.loads(m)["quality_score"] for m in table.column("metadata").to_pylist()] == \
        [round(float(s), 7) for s in expected]

    select_stage = QualitySelectStage(cfg, score, {"books": "book"}, {})
    result = select_stage.run_unit(unit, tmp_path)
    if mode["mode"] == "pareto":
        keep = select.pareto_keep(expected.astype(np.float64), table.column("id").to_pylist(),
                                  cfg.policies["default"].seed, cfg.policies["default"].alpha)
    else:
        keep = expected.astype(np.float64) >= 0.5
    selected = pq.read_table(select_stage.output_path(tmp_path, unit))
    assert selected.equals(table.filter(pa.array(keep))) and result["kept"] == int(keep.sum()) > 0
    from pipeline.ledger import Ledger

    booked = Ledger.from_json(result["ledger"]).stats(["quality"])["stages"]["quality"]["books"]
    assert booked["in"] == len(paras) and booked["kept"] == int(keep.sum())
    assert booked["bytes_in"] == sum(pc.binary_length(table.column("text")).to_pylist())
