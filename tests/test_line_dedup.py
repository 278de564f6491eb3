"""Line dedup on real web pages: the Python 3.11 documentation (Debian's python3.11-doc), extracted by the
project's extractor with Resiliparse's main_content off, so that every page keeps Sphinx's real navigation
and footer ("© Copyright 2001-2026, Python Software Foundation.", "Navigation", "• modules |", ...).

The stages are checked against a plain-Python oracle (strings, no hashes: normalise each line, count the
documents containing it, remove those in >= min_documents documents), for layout independence (partitions
1 / 4 / 7, fan-in 2 with two merge levels), the reduce's resume task by task, and the accounting; one small
real pipeline run (a loopback crawl into a WARC) checks the wiring (--until line_dedup, resume, the shards
hold line dedup's output)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import AuditConfig, LineDedupConfig
from pipeline.dedup.lines import (
    count_words,
    document_line_hashes,
    hash_line,
    is_frequent,
    line_hashes,
    normalize_line,
    remove_lines,
)
from pipeline.document import make_document, write_documents
from pipeline.sources.base import Unit
from pipeline.stages.base import MapStage
from pipeline.stages.line_dedup import (
    EMPTIED,
    STAGE,
    TOO_SHORT,
    LineDedupApplyStage,
    LineHashStage,
    frequent_path,
    iter_frequent,
    run_line_reduce,
)
from tests.conftest import run_cli

UNITS = 6


# ------------------------------------------------------------------------------------------ pure functions
def test_normalisation_matches_footers_across_years_and_never_counts_blank_lines():
    assert normalize_line("  © Copyright 2001-2023,\tPython  Software Foundation. \r") == \
        "© copyright 0000-0000, python software foundation."
    assert hash_line("© Copyright 2001-2023, PSF.") == hash_line("©\u00a0COPYRIGHT 2001-2024,  psf.")
    assert hash_line("Page 1 of 3") == hash_line("page ٢ of ٣")                 # Unicode digits too
    assert hash_line("Navigation") != hash_line("Navigation »")
    text = "Navigation\n\n  \n\u3000\n© 2023 Example\n"
    lines, hashes, nonblank = line_hashes(text)
    assert lines == text.split("\n") and nonblank.tolist() == [True, False, False, False, True, False]
    assert len(document_line_hashes(text + "NAVIGATION\n")) == 2                 # one vote per document


def test_remove_lines_keeps_the_other_lines_their_order_and_newlines():
    text = "Skip to content\nReal line one.\r\n\n  Cookie banner  \nReal line two.\n© 2024 Site\n"
    frequent = {hash_line("skip to content"), hash_line("cookie banner"), hash_line("© 1999 site")}
    new, removed, nbytes = remove_lines(text, frequent)
    assert new == "Real line one.\r\n\nReal line two.\n"
    assert removed == 3 and nbytes == len(text.encode()) - len(new.encode())
    sorted_array = np.array(sorted(frequent), dtype=np.uint64)
    assert remove_lines(text, sorted_array) == (new, removed, nbytes)            # a set or a sorted array
    assert remove_lines(text, set()) == (text, 0, 0)
    assert remove_lines("only\nboiler", {hash_line("only"), hash_line("boiler")})[0] == ""
    hashes = np.array([hash_line("cookie banner"), 1, 2], dtype=np.uint64)
    assert is_frequent(hashes, sorted_array).tolist() == [True, False, False]


def test_words_left_count_unspaced_scripts_by_character():
    assert count_words("The quick brown fox, 2 times.") == 6
    assert count_words("日本語のテキスト") == 8 and count_words("한국어 문장") == 2
    assert count_words("a " * 1000, limit=50) == 50


# ------------------------------------------------------------------------------------------ real pages
def _norm(line: str) -> str:
    """The oracle's normalisation, written independently of pipeline.dedup.lines."""
    return " ".join(re.sub(r"\d", "0", line.lower()).split())


class _Given(MapStage):
    """The stage before line dedup: its outputs are the unit files the test writes."""

    name = "dedup"

    def run_unit(self, unit, run_dir):  # pragma: no cover - inputs are written by the test
        raise NotImplementedError


@pytest.fixture(scope="module")
def pages(python_docs_html) -> list[tuple[str, str]]:
    from pipeline.extract.html import ExtractSettings, HtmlToText

    extract = HtmlToText(ExtractSettings(resiliparse={"main_content": False}))
    found = sorted(p for p in python_docs_html.rglob("*.html") if p.is_file() and not p.is_symlink())
    out = []
    for path in found[::3]:
        result = extract(path.read_bytes(), None)
        if result.outcome == "kept":
            out.append((str(path.relative_to(python_docs_html)), result.text))
    assert len(out) > 150
    return out


@pytest.fixture(scope="module")
def corpus(pages):
    """The web documents (real pages, plus two pages cut down to their boilerplate: real pages whose every
    line is site chrome) and a book unit whose documents repeat real lines (other kinds are not touched)."""
    votes = Counter(line for _, text in pages for line in {_norm(x) for x in text.split("\n")} - {""})
    chrome = [(f"{rel}#chrome", "\n".join(x for x in text.split("\n") if votes[_norm(x)] >= 3))
              for rel, text in pages[:2]]
    web = [make_document(text, "pydocs", "web", rel) for rel, text in pages + chrome]
    unique = next(x for _, text in pages for x in text.split("\n") if votes[_norm(x)] == 1 and len(x) > 40)
    footer = next(x for x in pages[0][1].split("\n") if x.startswith("© Copyright"))
    books = [make_document(f"Chapter {i}\n{footer}\n{unique}\nIt is a truth universally acknowledged.", "books",
                           "book", f"b{i}") for i in range(3)]
    return {"web": web, "books": books, "unique": unique, "footer": footer}


@pytest.fixture(scope="module")
def ray_local():
    from pipeline.runner import init_ray, shutdown_ray

    init_ray(None, 2)
    yield
    shutdown_ray()


def _stage_run(run: Path, corpus, **cfg) -> dict:
    from pipeline.runner import _execute_unit

    config = LineDedupConfig(**cfg)
    units = [Unit(f"pydocs-{k:05d}", "pydocs", "web") for k in range(UNITS)] + [Unit("books-00000", "books", "book")]
    for k, unit in enumerate(units[:UNITS]):
        write_documents(_Given().output_path(run, unit), corpus["web"][k::UNITS])
    write_documents(_Given().output_path(run, units[-1]), corpus["books"])
    timings = {}
    started = time.perf_counter()
    hashed = {u.id: _execute_unit(LineHashStage(config, _Given()), u, str(run)) for u in units}
    timings["hashes"] = time.perf_counter() - started
    started = time.perf_counter()
    summary = run_line_reduce(run, units, config)
    timings["reduce"] = time.perf_counter() - started
    apply = LineDedupApplyStage(config, _Given(), AuditConfig(dropped_per_reason=4))
    started = time.perf_counter()
    results = {u.id: _execute_unit(apply, u, str(run)) for u in units}
    timings["apply"] = time.perf_counter() - started
    return {"run": run, "units": units, "config": config, "summary": summary, "hashed": hashed,
            "results": results, "apply": apply, "timings": timings}


def _outputs(done: dict) -> dict[str, str]:
    texts = {}
    for unit in done["units"]:
        table = pq.read_table(done["apply"].output_path(done["run"], unit), columns=["id", "text"]).to_pydict()
        texts.update(zip(table["id"], table["text"]))
    return texts


def _digests(done: dict) -> dict[str, str]:
    stage_dir = done["run"] / "stages" / STAGE
    files = sorted(stage_dir.glob("*.parquet")) + sorted(stage_dir.glob("dropped/*.parquet"))
    return {str(p.relative_to(stage_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _oracle(docs, min_documents: int, min_words_left: int):
    votes = Counter(line for doc in docs for line in {_norm(x) for x in doc.text.split("\n")} - {""})
    frequent = {line for line, n in votes.items() if n >= min_documents}
    outcome = {}
    for doc in docs:
        lines = doc.text.split("\n")
        kept = [x for x in lines if _norm(x) not in frequent]
        new = "\n".join(kept)
        if len(kept) == len(lines):
            outcome[doc.id] = ("kept", doc.text, 0)
        elif not new.strip():
            outcome[doc.id] = (EMPTIED, new, len(lines) - len(kept))
        elif count_words(new) < min_words_left:
            outcome[doc.id] = (TOO_SHORT, new, len(lines) - len(kept))
        else:
            outcome[doc.id] = ("kept", new, len(lines) - len(kept))
    return votes, frequent, outcome


@pytest.fixture(scope="module")
def reference(corpus, ray_local, tmp_path_factory):
    return _stage_run(tmp_path_factory.mktemp("ld") / "p4", corpus, partitions=4)


@pytest.fixture(scope="module")
def oracle(corpus):
    return _oracle(corpus["web"], 3, 50)


def test_real_footer_and_navigation_lines_leave_every_page_and_unique_text_stays(corpus, reference, oracle):
    web = corpus["web"]
    votes, frequent, outcome = oracle
    out = _outputs(reference)
    footer = corpus["footer"]
    assert re.fullmatch(r"© Copyright 2001-20\d\d, Python Software Foundation\.", footer)
    chrome = [footer, "Navigation", "• modules |", "Created using Sphinx 5.3.0.",
              "This page is licensed under the Python Software Foundation License Version 2."]
    def stripped(text: str) -> set[str]:
        return {x.strip() for x in text.split("\n")}

    for line in chrome:
        having = [d for d in web if line in stripped(d.text)]
        assert len(having) > 0.9 * len(web), line                      # the real chrome of (nearly) every page
        assert not any(line in stripped(out[d.id]) for d in having if d.id in out), line
    # every document ends exactly as the oracle says: the same text, or dropped for the same reason
    kept_ids = {i for i, (what, _, _) in outcome.items() if what == "kept"}
    assert set(out) - {d.id for d in corpus["books"]} == kept_ids
    assert all(out[i] == outcome[i][1] for i in kept_ids)
    # each page's own lines (in no other document) are all still there, in their order
    for doc in web:
        if doc.id in out:
            own = [x for x in doc.text.split("\n") if votes[_norm(x)] == 1]
            assert [x for x in out[doc.id].split("\n") if votes[_norm(x)] == 1] == own
    # a real line in two pages stays in both; one in exactly three (min_documents) leaves all three
    twice = next(line for line, n in votes.items() if n == 2 and len(line) > 30)
    thrice = next(line for line, n in votes.items() if n == 3 and len(line) > 30)
    for line, expect in ((twice, True), (thrice, False)):
        docs = [d for d in web if line in {_norm(x) for x in d.text.split("\n")} and d.id in out]
        assert docs and all((line in {_norm(x) for x in out[d.id].split("\n")}) == expect for d in docs)
    summary = reference["summary"]
    assert summary["distinct_lines"] == len(votes) and summary["frequent_lines"] == len(frequent)
    assert summary["line_votes"] == sum(votes.values())
    assert summary["count_histogram"]["1"] == sum(n == 1 for n in votes.values())


def test_other_kinds_are_neither_counted_nor_edited(corpus, reference):
    out = _outputs(reference)
    assert all(out[d.id] == d.text for d in corpus["books"])               # the footer stays in books
    unique_in = [d for d in corpus["web"] if corpus["unique"] in d.text.split("\n")]
    assert len(unique_in) == 1                                            # 1 web page + 3 books: not frequent
    assert corpus["unique"] in out[unique_in[0].id].split("\n")
    assert reference["hashed"]["books-00000"]["documents"] == 0


def test_emptied_and_too_short_documents_are_dropped_counted_and_sampled(corpus, reference, oracle):
    _, _, outcome = oracle
    reasons = Counter(what for what, _, _ in outcome.values() if what != "kept")
    assert reasons[EMPTIED] >= 2 and reasons[TOO_SHORT] >= 1              # the chrome-only pages, short pages
    ledger = _ledger(reference)
    assert ledger["dropped"] == dict(reasons)
    sampled = [r for u in reference["units"] if (p := reference["apply"].dropped_path(reference["run"], u)).exists()
               for r in pq.read_table(p).to_pylist()]
    assert {r["reason"] for r in sampled} == {EMPTIED, TOO_SHORT}
    originals = {d.id: d.text for d in corpus["web"]}
    for row in sampled:                                    # the text as it came in, with what was removed
        assert outcome[row["id"]][0] == row["reason"] and row["text"] == originals[row["id"]][:20_000]
        assert json.loads(row["metadata"])["lines_removed"] == outcome[row["id"]][2]


def _ledger(done: dict) -> dict:
    from pipeline.ledger import Ledger

    ledger = Ledger()
    for result in done["results"].values():
        ledger.merge(Ledger.from_json(result["ledger"]))
    return ledger.stats(["line_dedup"])["stages"]["line_dedup"]["pydocs"]


def test_accounting_every_document_and_byte(corpus, reference, oracle):
    _, _, outcome = oracle
    e = _ledger(reference)
    tallies = e["line_dedup"]
    assert e["invariant_ok"] and e["in"] == len(corpus["web"]) == e["kept"] + sum(e["dropped"].values())
    assert e["bytes_in"] == sum(len(d.text.encode()) for d in corpus["web"])
    assert e["bytes_in"] == e["bytes_kept"] + tallies["bytes_removed"] + tallies["bytes_dropped"]
    assert e["bytes_kept"] == sum(len(t.encode()) for i, (what, t, _) in outcome.items() if what == "kept")
    assert tallies["lines_removed"] == sum(n for _, _, n in outcome.values())
    assert tallies["documents_edited"] == sum(n > 0 for _, _, n in outcome.values())
    assert sum(r["documents"] for u, r in reference["results"].items() if u.startswith("pydocs")) == e["kept"]
    # bounded: an apply task maps at most `partitions` frequent files, and releases them
    assert all(r["max_frequent_maps"] <= 4 and r["max_maps"] <= 4 for r in reference["results"].values())


def test_partitions_and_fan_in_change_the_layout_not_the_result(corpus, reference, tmp_path):
    one = _stage_run(tmp_path / "p1", corpus, partitions=1)
    narrow = _stage_run(tmp_path / "p7", corpus, partitions=7, fan_in=2)
    assert narrow["summary"]["shuffle"]["merge_levels"] == 2                 # 7 unit files -> 4 -> 2
    assert narrow["summary"]["shuffle"]["max_maps_per_task"] <= 2 + 1        # fan-in, plus the file written
    frequent = sorted(iter_frequent(reference["run"], 4))
    for other in (one, narrow):
        assert _digests(other) == _digests(reference)                       # byte for byte
        assert sorted(iter_frequent(other["run"], other["config"].partitions)) == frequent
        for key in ("distinct_lines", "frequent_lines", "line_votes", "frequent_votes", "count_histogram"):
            assert other["summary"][key] == reference["summary"][key]
    # the reduce resumes task by task: a unit's hash file lost mid-shuffle fails its merge only; the
    # finished merges are kept, and the same call afterwards gives the same frequent set, byte for byte
    run = tmp_path / "resume"
    shutil.copytree(narrow["run"] / "stages" / "line_dedup_hashes", run / "stages" / "line_dedup_hashes")
    damaged = run / "stages/line_dedup_hashes/pydocs-00005.arrow"        # the last merge group's file
    intact = damaged.read_bytes()
    damaged.write_bytes(b"\0" * len(intact))
    with pytest.raises(Exception, match="Arrow"):
        run_line_reduce(run, narrow["units"], narrow["config"])
    finished = run / "stages/line_dedup/graph/hashes/merge-1/task-00000.done.json"
    deadline = time.monotonic() + 30
    while not finished.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (run / "stages/line_dedup/reduce.done.json").exists()
    damaged.write_bytes(intact)
    summary = run_line_reduce(run, narrow["units"], narrow["config"])
    assert summary["shuffle"]["resumed_tasks"] >= 1
    for k in range(7):
        assert frequent_path(run, k).read_bytes() == frequent_path(narrow["run"], k).read_bytes()
    assert not (run / "stages/line_dedup/graph").exists()                   # consumed, then deleted
    assert run_line_reduce(run, narrow["units"], narrow["config"]) == summary   # done: no work


# ------------------------------------------------------------------------------------------ one real run
def test_pipeline_runs_line_dedup_between_dedup_and_tokenize_and_resumes(python_docs_html, tmp_path):
    from pipeline.realdata import crawl_to_warc
    from pipeline.shards import Manifest, ShardReader
    from pipeline.tokenizer import load_tokenizer

    rels = sorted(str(p.relative_to(python_docs_html)) for p in (python_docs_html / "library").glob("*.html"))[::8]
    crawl_to_warc(python_docs_html, rels, tmp_path / "crawl/pydocs.warc.gz")
    off = {"enabled": False}
    config = {"run": {"unit_target_mb": 0.25, "num_cpus": 2},
              "sources": [{"name": "pydocs", "kind": "web", "paths": [str(tmp_path / "crawl")]}],
              "crawl_filter": {"web": {"extraction": {"resiliparse": {"main_content": False}}, "language": off,
                                       "gopher_repetition": off, "gopher_quality": off, "c4": off,
                                       "fineweb": off, "badwords": off}},
              "dedup": {"partitions": 2}, "line_dedup": {"partitions": 3},
              "tokenize": {"train": {"vocab_size": 300, "sample_mb": 0.2}, "shard_target_mb": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    args = ["run", str(tmp_path / "c.yaml"), "--output", str(run_dir), "--no-progress"]
    first = run_cli(*args, "--until", "line_dedup")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "stopped after stage line_dedup" in first.stdout and not (run_dir / "stages/tokenize").exists()
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted((run_dir / "stages/line_dedup").rglob("*")) if p.is_file()}
    assert (run_dir / "stages/line_dedup/reduce.done.json").name in digests
    second = run_cli(*args)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    stats = json.loads((run_dir / "stats.json").read_text())
    units = stats["units"]
    assert units >= 3 and stats["resumed_units"]["line_dedup"] == stats["resumed_units"]["line_dedup_hashes"] == units
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest()            # resumed, not redone: the same bytes
            for p in sorted((run_dir / "stages/line_dedup").rglob("*")) if p.is_file()} == digests
    assert stats["invariant_ok"], stats["violations"]
    assert list(stats["stages"]) == ["read", "crawl_filter", "url_dedup", "dedup", "line_dedup", "tokenize"]
    entry = stats["stages"]["line_dedup"]["pydocs"]
    assert entry["line_dedup"]["lines_removed"] > 20 * entry["in"] and stats["line_dedup"]["frequent_lines"] > 20
    assert stats["stages"]["tokenize"]["pydocs"]["in"] == entry["kept"]
    # the shards hold line dedup's output: no page's footer or navigation reached them
    kept = {}
    for path in sorted((run_dir / "stages/line_dedup").glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "text"]).to_pydict()
        kept.update(zip(table["id"], table["text"]))
    manifest = Manifest.load(run_dir)
    tokenizer = load_tokenizer(run_dir / manifest.tokenizer["path"])
    seen = {}
    for shard in manifest.shard_paths(run_dir):
        with ShardReader(shard) as reader:
            for doc_id, _kind, tokens in reader.documents():
                seen[doc_id] = tokenizer.decode(tokens[:-1].tolist(), skip_special_tokens=False)
    assert seen == kept and len(seen) >= 5
    chrome = {"Navigation", "• modules |", "Created using Sphinx 5.3.0."}
    assert not any(chrome & {x.strip() for x in t.split("\n")} or "\n© Copyright 2001-" in t for t in seen.values())
