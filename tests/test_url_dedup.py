"""URL dedup on real web pages re-crawled: CPython's HTML documentation (Debian's python3.11-doc) written
into three crawls (WARCs written with warcio, one per crawl date, each its own source): an old crawl of a
few pages, a full crawl, and a re-crawl in which pages changed (shorter or longer) and are addressed by
URL variants (host case, default port, fragment, https, www., escapes, dot segments), next to URLs that
only look alike (another query, another path case) and pages crawled once.

One real pipeline run (CLI, local Ray) checks the whole chain; the stages are then run unit by unit on
that run's real Parquet units (the reduce on a local Ray) for keep=longest, other layouts, an index run
and an interrupted reduce. Expected keepers are computed here from the crawls' construction, not with
the module's normalisation."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import run_cli, write_warc

pytestmark = pytest.mark.realdata

BASE = "http://docs.example.org/3.11/"
DATES = {"crawl-2022": "2022-05-01T08:00:00Z", "crawl-2023": "2023-01-01T00:00:00Z",
         "crawl-2024": "2024-06-01T12:00:00Z"}


# ------------------------------------------------------------------------------------------ the crawls
def _variant(i: int, rel: str) -> str:
    """The URL the 2024 re-crawl used for page i (0..9): the same page under another spelling."""
    host_path = f"docs.example.org/3.11/{rel}"
    return {0: f"HTTP://DOCS.Example.ORG/3.11/{rel}", 1: f"http://docs.example.org:80/3.11/{rel}#top",
            2: f"https://{host_path}", 3: f"http://www.{host_path}", 4: f"http://{host_path[:-5]}%2Ehtml",
            5: f"http://docs.example.org/3.11/./{rel}", 6: f"https://docs.example.org:443/3.11/{rel}"
            }.get(i, BASE + rel)


@pytest.fixture(scope="module")
def crawls(python_docs_html, tmp_path_factory):
    """Three WARCs and, per record URL, its page identity (what URL dedup must treat as one page)."""
    html_root = python_docs_html
    pages = []
    for p in sorted(html_root.glob("library/*.html")):
        html = p.read_text(encoding="utf-8")
        if 20_000 < len(html) < 60_000 and len(re.findall(r"<p>.*?</p>", html, re.S)) >= 8:
            pages.append((f"library/{p.name}", html))
    pages = pages[:: max(1, len(pages) // 30)][:24]
    assert len(pages) == 24
    extra = re.findall(r"<p>.*?</p>", pages[-1][1], re.S)[:6]

    def shorter(html: str) -> str:               # the page lost its second half of paragraphs
        paras = list(re.finditer(r"<p>.*?</p>", html, re.S))
        for m in reversed(paras[len(paras) // 2:]):
            html = html[: m.start()] + html[m.end():]
        return html

    def longer(html: str) -> str:                # the page gained paragraphs (in its main text)
        middle = list(re.finditer(r"<p>.*?</p>", html, re.S))[3].end()
        return html[:middle] + "".join(extra) + html[middle:]

    identity: dict[str, str] = {}
    records: dict[str, list[tuple[str, str, bytes]]] = {name: [] for name in DATES}

    def add(source: str, url: str, ident: str, html: str) -> None:
        records[source].append((url, DATES[source], html.encode("utf-8")))
        identity.setdefault(url, ident)
        assert identity[url] == ident

    for i, (rel, html) in enumerate(pages[:6]):
        add("crawl-2022", BASE + rel, str(i), html)
    for i, (rel, html) in enumerate(pages[:20]):
        add("crawl-2023", BASE + rel, str(i), html)
    for i, (rel, html) in enumerate(pages[:10]):
        add("crawl-2024", _variant(i, rel), str(i), shorter(html) if i < 5 else longer(html))
    add("crawl-2024", BASE + pages[10][0] + "?highlight=json", "10?", pages[10][1])   # another query: distinct
    add("crawl-2024", BASE + pages[11][0].upper(), "11U", pages[11][1])                # path case: distinct
    # page 12 twice in the same re-crawl, same date: the longer copy is kept under either rule
    records["crawl-2024"].append((BASE + pages[12][0] + "#a", DATES["crawl-2024"], longer(pages[12][1]).encode()))
    records["crawl-2024"].append((BASE + pages[12][0] + "#b", DATES["crawl-2024"], pages[12][1].encode()))
    identity[BASE + pages[12][0] + "#a"] = identity[BASE + pages[12][0] + "#b"] = "12"
    for i, (rel, html) in enumerate(pages[20:24], start=20):
        add("crawl-2024", BASE + rel, str(i), html)
    root = tmp_path_factory.mktemp("crawls")
    warcs = {}
    for source, recs in records.items():
        (root / source).mkdir()
        warcs[source] = root / source / f"{source}.warc.gz"
        write_warc(warcs[source], recs)
    return warcs, identity


def _config(tmp: Path, warcs: dict[str, Path], name: str, **url_dedup) -> Path:
    off = {"enabled": False}
    cfg = {"run": {"unit_target_mb": 0.1, "num_cpus": 2},
           "sources": [{"name": s, "kind": "web", "paths": [str(p.parent)]} for s, p in warcs.items()],
           # every page that extracts is kept: URL dedup is what this run is about
           "crawl_filter": {"web": {step: off for step in ("url", "language", "gopher_repetition", "gopher_quality",
                                                           "c4", "fineweb", "badwords")},
                            "pii": off},
           "url_dedup": {"partitions": 3, **url_dedup},
           "dedup": {"partitions": 2},
           "tokenize": {"train": {"vocab_size": 512, "sample_mb": 0.5}, "shard_target_mb": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _docs(run: Path, stage: str) -> dict[str, dict]:
    out = {}
    for path in sorted((run / "stages" / stage).glob("*.parquet")):
        for row in pq.read_table(path, columns=["id", "source", "text", "metadata"]).to_pylist():
            out[row["id"]] = {**row, **{k: json.loads(row["metadata"]).get(k) for k in ("url", "crawl_date")}}
    return out


def _expected(docs: dict[str, dict], identity: dict[str, str], keep: str, index_ids: frozenset = frozenset()) -> set:
    """The ids URL dedup keeps, from the construction: per page, index copies win (none of this run stays),
    else the newest (then longest) or the longest (then newest), then the smallest id."""
    groups: dict[str, list[dict]] = {}
    for doc in docs.values():
        groups.setdefault(identity[doc["url"]], []).append(doc)
    kept = set()
    for members in groups.values():
        if any(m["id"] in index_ids for m in members):
            continue
        def rank(m):
            newest, longest = m["crawl_date"], len(m["text"])
            return ((newest, longest) if keep == "newest" else (longest, newest), [-ord(c) for c in m["id"]])
        kept.add(max(members, key=rank)["id"])
    return kept


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.suffix in (".parquet", ".arrow")}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (as the CLI starts it): the pipeline runs in process on it, and the
    unit-level reduces use it too."""
    from pipeline.runner import init_ray, shutdown_ray

    init_ray(None, 2)
    yield
    shutdown_ray()


def _pipeline(config: Path, out: Path, until: str | None = None):
    from pipeline.config import load_config
    from pipeline.runner import PipelineRun

    return PipelineRun(load_config(config), out, progress=False, until=until).run()


@pytest.fixture(scope="module")
def pipeline_run(crawls, local_ray, tmp_path_factory):
    """The one full pipeline run: read -> crawl_filter -> url_dedup -> dedup -> tokenize -> pack."""
    warcs, identity = crawls
    tmp = tmp_path_factory.mktemp("url-run")
    config = _config(tmp, warcs, "run")
    report = _pipeline(config, tmp / "run")
    assert report.manifest is not None
    return config, tmp / "run", report


# ------------------------------------------------------------------------------------------ the pipeline
def test_recrawls_collapse_to_the_newest_url_variants_too(crawls, pipeline_run):
    warcs, identity = crawls
    config, run, _ = pipeline_run
    entered, kept = _docs(run, "crawl_filter"), _docs(run, "url_dedup")
    assert len(entered) == 44, "every crawled page should pass the (disabled) crawl filters"
    assert set(kept) == _expected(entered, identity, "newest")
    by_ident = {identity[d["url"]]: d for d in kept.values()}
    assert len(by_ident) == len(kept) == 26                         # 24 pages + the two look-alike URLs
    for i in range(10):                                              # re-crawled, under any URL spelling
        assert by_ident[str(i)]["crawl_date"] == DATES["crawl-2024"], i
    assert by_ident["12"]["url"].endswith("#a")                      # same date: the longer copy
    assert by_ident["10?"]["url"].endswith("?highlight=json") and by_ident["11U"]["source"] == "crawl-2024"
    for i in (13, 19):
        assert by_ident[str(i)]["source"] == "crawl-2023"           # crawled once: untouched

    stats = json.loads((run / "stats.json").read_text())
    assert stats["invariant_ok"], stats["violations"]
    assert list(stats["stages"]) == ["read", "crawl_filter", "url_dedup", "dedup", "line_dedup", "tokenize"]
    stage = stats["stages"]["url_dedup"]
    assert {s: (e["in"], e["kept"], e["dropped"]) for s, e in stage.items()} == {
        "crawl-2022": (6, 0, {"url_duplicate": 6}), "crawl-2023": (20, 9, {"url_duplicate": 11}),
        "crawl-2024": (18, 17, {"url_duplicate": 1})}
    for source, e in stage.items():       # the chain: crawl_filter -> url_dedup -> dedup
        assert stats["stages"]["crawl_filter"][source]["kept"] == e["in"]
        assert stats["stages"]["dedup"].get(source, {"in": 0})["in"] == e["kept"]
    summary = stats["url_dedup"]
    assert (summary["documents"], summary["with_url"], summary["without_url"]) == (44, 44, 0)
    assert (summary["urls"], summary["duplicate_groups"], summary["removed"], summary["removed_index"]) == \
        (26, 11, 18, 0)
    assert summary["group_size_histogram"] == {"2": 4, "3": 7}
    # the audit sample: each dropped copy with its URL and the id of the copy that was kept
    sample = pq.read_table(run / "stages/url_dedup/dropped").to_pylist()
    assert sample and all(r["reason"] == "url_duplicate" for r in sample)
    for row in sample:
        meta = json.loads(row["metadata"])
        assert meta["kept_id"] in kept and row["id"] not in kept
        assert identity[kept[meta["kept_id"]]["url"]] == identity[meta["url"]]
        assert meta["normalized_url"].startswith("http://docs.example.org/3.11/")


def test_a_rerun_does_no_work_and_changes_no_byte(crawls, pipeline_run):
    config, run, _ = pipeline_run
    before = _digests(run / "stages") | _digests(run / "shards")
    reduce_marker = (run / "stages/url_dedup/reduce.done.json").read_text()
    stats = _pipeline(config, run).stats
    units = stats["units"]
    assert stats["resumed_units"]["url_dedup_keys"] == stats["resumed_units"]["url_dedup"] == units
    assert "url_dedup_reduce" in stats["wall_seconds"] and "url_dedup" not in stats["wall_seconds"]
    assert (run / "stages/url_dedup/reduce.done.json").read_text() == reduce_marker
    assert _digests(run / "stages") | _digests(run / "shards") == before


def test_until_url_dedup_stops_after_it(crawls, pipeline_run, tmp_path):
    warcs, _ = crawls
    config, run, _ = pipeline_run
    out = tmp_path / "until"
    shutil.copytree(run / "stages/crawl_filter", out / "stages/crawl_filter")   # resume after crawl_filter
    shutil.copy(run / "run.json", out / "run.json")
    report = _pipeline(config, out, until="url_dedup")
    assert report.manifest is None and report.stats["stopped_after"] == "url_dedup"
    assert report.resumed_units == {"crawl_filter": report.units, "url_dedup_keys": 0, "url_dedup": 0}
    assert not (out / "stats.json").exists()
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["crawl_filter", "url_dedup", "url_dedup_keys"]
    assert _digests(out / "stages/url_dedup") == _digests(run / "stages/url_dedup")


def test_an_unusable_index_is_refused_before_any_work(crawls, pipeline_run, tmp_path):
    warcs, _ = crawls
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    config = _config(tmp_path, warcs, "bad-index", index=[str(empty)])
    proc = run_cli("run", str(config), "--output", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: url_dedup.index: {empty}: no URL keys there")
    assert not (tmp_path / "out" / "stages").exists()


# ------------------------------------------------------------------------------------------ unit level
@pytest.fixture(scope="module")
def units(pipeline_run):
    from pipeline.config import load_config
    from pipeline.sources import plan_units

    config, run, _ = pipeline_run
    return plan_units(load_config(config)), run


class _Input:
    """The crawl filter's output as the input stage (only its paths are used)."""

    name = "crawl_filter"

    def output_path(self, run_dir: Path, unit) -> Path:
        return run_dir / "stages" / self.name / f"{unit.id}.parquet"


def _phases(run_dir: Path, units, source_run: Path, **cfg):
    """The three phases on real Parquet units copied from the pipeline run: the maps unit by unit in
    process, the reduce on Ray."""
    from pipeline.config import AuditConfig, URLDedupConfig
    from pipeline.stages.url_dedup import URLDedupApplyStage, URLKeyStage, run_url_reduce, write_key_params

    config = URLDedupConfig(**cfg)
    if not (run_dir / "stages/crawl_filter").exists():
        (run_dir / "stages/crawl_filter").mkdir(parents=True)
        for unit in units:
            shutil.copy(_Input().output_path(source_run, unit), _Input().output_path(run_dir, unit))
    index = {u.id: i for i, u in enumerate(sorted(units, key=lambda u: u.id))}
    keys = URLKeyStage(config, _Input(), index)
    keyed = {u.id: keys.run_unit(u, run_dir) for u in units}
    write_key_params(run_dir, config, sum(r["with_url"] for r in keyed.values()))
    summary = run_url_reduce(run_dir, units, config, None, documents=keyed)
    apply = URLDedupApplyStage(config, _Input(), index, AuditConfig())      # the pipeline run's audit
    results = {u.id: apply.run_unit(u, run_dir) for u in units}
    return summary, results


def test_keep_longest(crawls, units, local_ray, tmp_path):
    _, identity = crawls
    plan, run = units
    _phases(tmp_path, plan, run, keep="longest")
    entered, kept = _docs(run, "crawl_filter"), _docs(tmp_path, "url_dedup")
    want = _expected(entered, identity, "longest")
    assert set(kept) == want and want != _expected(entered, identity, "newest")
    by_ident = {identity[d["url"]]: d for d in kept.values()}
    for i in range(5):   # the re-crawl lost text: the full 2023 copy stays (2022's is as long, but older)
        assert by_ident[str(i)]["source"] == "crawl-2023", i
    for i in range(5, 10):
        assert by_ident[str(i)]["source"] == "crawl-2024", i


def test_layout_does_not_change_the_result(crawls, units, pipeline_run, local_ray, tmp_path):
    """1 partition vs 7 partitions at fan-in 2 (keys and removals go through merge levels, several units
    per removal file): byte-identical documents and dropped samples, equal to the pipeline run's."""
    plan, run = units
    one, _ = _phases(tmp_path / "one", plan, run, partitions=1)
    seven, _ = _phases(tmp_path / "seven", plan, run, partitions=7, fan_in=2)
    assert seven["shuffle"]["key_merge_levels"] >= 2 and len(plan) >= 5
    assert 1 <= seven["shuffle"]["max_maps_per_task"] <= 2 + 1       # fan-in, plus the file being written
    assert seven["shuffle"]["max_driver_refs"] <= max(7, len(plan))
    strip = ("params", "shuffle", "seconds")
    assert {k: v for k, v in one.items() if k not in strip} == {k: v for k, v in seven.items() if k not in strip}
    reference = _digests(run / "stages/url_dedup")
    reference = {k: v for k, v in reference.items() if not k.startswith("removals/")}
    for layout in ("one", "seven"):
        got = {k: v for k, v in _digests(tmp_path / layout / "stages/url_dedup").items()
               if not k.startswith("removals/")}
        assert got == reference, layout
    assert not (tmp_path / "seven/stages/url_dedup/reduce").exists()   # intermediate files deleted


def test_an_index_run_removes_this_runs_copies_and_is_never_removed(crawls, units, local_ray, tmp_path):
    """The 2022 crawl as an earlier run (its keys kept); the 2023 + 2024 crawls as this run, with that run
    as index: every copy of the 2022 URLs goes (however new), the index's files are untouched."""
    from pipeline.config import ConfigError, URLDedupConfig
    from pipeline.stages.url_dedup import check_url_index

    _, identity = crawls
    plan, run = units
    old = [u for u in plan if u.source == "crawl-2022"]
    new = [u for u in plan if u.source != "crawl-2022"]
    _phases(tmp_path / "old", old, run)
    before = _digests(tmp_path / "old")
    summary, _ = _phases(tmp_path / "new", new, run, index=[str(tmp_path / "old")])
    assert _digests(tmp_path / "old") == before
    entered = _docs(tmp_path / "new", "crawl_filter")
    index_ids = frozenset(_docs(tmp_path / "old", "crawl_filter"))
    indexed = {identity[d["url"]] for d in _docs(tmp_path / "old", "crawl_filter").values()}
    assert indexed == {str(i) for i in range(6)}
    kept = _docs(tmp_path / "new", "url_dedup")
    everything = {**entered, **_docs(tmp_path / "old", "crawl_filter")}
    assert set(kept) == _expected(everything, identity, "newest", index_ids)
    assert not {identity[d["url"]] for d in kept.values()} & indexed
    # 2023's and 2024's copies of pages 0-5 against the index; 6-9 (2023's) and 12 (two of three) within the run
    assert (summary["removed_index"], summary["removed"], summary["index_rows"]) == (12, 12 + 4 + 2, 6)
    sample = pq.read_table(tmp_path / "new/stages/url_dedup/dropped").to_pylist()
    against = [r for r in sample if r["reason"] == "url_duplicate:index"]
    assert against and all(json.loads(r["metadata"])["kept_id"] in index_ids for r in against)
    # an index of other parameters, or not an index at all: one line naming it
    with pytest.raises(ConfigError, match=r"^url_dedup.index: .*old: built with partitions=16, this run uses 5 "):
        check_url_index(URLDedupConfig(partitions=5, index=[str(tmp_path / "old")]))
    params = tmp_path / "old/stages/url_dedup_keys/params.json"
    params.write_text(params.read_text().replace('"key_version": 1', '"key_version": 0'))
    with pytest.raises(ConfigError, match=r"built with key_version=0, this run uses 1"):
        check_url_index(URLDedupConfig(index=[str(tmp_path / "old")]))


def test_an_interrupted_reduce_resumes_to_the_same_removals(units, local_ray, tmp_path):
    """The collect step of removal file 0 fails (its path is taken by a directory): the reduce stops after
    its keys merges and reduce tasks wrote their markers; once the path is free the same call resumes
    them and writes the same removals as an uninterrupted reduce."""
    plan, run = units
    reference, _ = _phases(tmp_path / "clean", plan, run, partitions=4, fan_in=2)
    blocked = tmp_path / "resumed/stages/url_dedup/removals/part-00000.arrow"
    blocked.mkdir(parents=True)
    with pytest.raises(Exception, match="part-00000"):
        _phases(tmp_path / "resumed", plan, run, partitions=4, fan_in=2)
    assert not (tmp_path / "resumed/stages/url_dedup/reduce.done.json").exists()
    assert list((tmp_path / "resumed/stages/url_dedup/reduce/reduce").glob("task-*.done.json"))
    blocked.rmdir()
    resumed, _ = _phases(tmp_path / "resumed", plan, run, partitions=4, fan_in=2)
    assert resumed["shuffle"]["resumed_tasks"] >= 4 + 1
    assert resumed["removed"] == reference["removed"]
    assert _digests(tmp_path / "resumed/stages/url_dedup") == _digests(tmp_path / "clean/stages/url_dedup")


# ------------------------------------------------------------------------------------------ pure functions
def test_normalisation_decisions():
    from pipeline.dedup.urls import normalize_url, url_key

    same = ["http://Example.COM/a/b/", "HTTP://www.example.com:80/a/./c/../b#x", "https://example.com:443/a/b",
            "http://example.com/%61/b", "http://example.com/a/b?"]
    assert len({normalize_url(u) for u in same}) == 1
    distinct = ["http://example.com/a/B", "http://example.com/a/b?x=1", "http://example.com:8080/a/b",
                "http://sub.example.com/a/b", "ftp://example.com/a/b", "http://example.com/a%2Fb"]
    assert len({normalize_url(u) for u in [same[0], *distinct]}) == len(distinct) + 1
    assert normalize_url("http://e.com/p?b=2&a=1&&a=0") == "http://e.com/p?a=0&a=1&b=2"
    assert normalize_url("http://e.com/caf\u00e9 x") == "http://e.com/caf%C3%A9%20x" == normalize_url(
        "http://e.com/caf%c3%a9%20x")
    assert normalize_url("http://M\u00fcnchen.de/") == "http://xn--mnchen-3ya.de/"
    assert normalize_url("http://www.com/") == "http://www.com/"            # nothing left to be a host
    assert normalize_url("") is normalize_url("  ") is normalize_url(None) is None
    assert url_key("http://e.com/") == url_key("http://e.com/") != url_key("http://e.com/x")
    digest = hashlib.blake2b(b"http://example.com/", digest_size=8).digest()
    assert url_key("http://example.com/") == int.from_bytes(digest, "little")     # never Python's hash()


def test_crawl_dates_and_keeper_order():
    from pipeline.dedup.urls import MISSING_DATE, id_parts, keeper_order, parse_crawl_date

    assert parse_crawl_date("2024-03-01T12:34:56Z") == parse_crawl_date("2024-03-01T13:34:56+01:00") \
        == parse_crawl_date("20240301123456") == 1709296496 * 10**6
    assert parse_crawl_date("2024-03-01T12:34:56.123456789Z") == 1709296496123456
    assert parse_crawl_date("") == parse_crawl_date("yesterday") == parse_crawl_date(None) == MISSING_DATE
    ids = ["0" * 23 + "2", "0" * 23 + "1", "f" * 24, "0" * 23 + "3"]
    hi, lo = id_parts(ids)
    date = np.array([5, 5, MISSING_DATE, 5], np.int64)
    chars = np.array([10, 10, 99, 11], np.int64)
    key = np.zeros(4, np.uint64)
    loc = np.arange(4, dtype=np.int64)
    no_index = np.zeros(4, bool)
    # newest: the three dated ones, then longest (3), then the smaller id (1 before 0); the undated last
    assert keeper_order("newest", key, no_index, date, chars, hi, lo, loc).tolist() == [3, 1, 0, 2]
    assert keeper_order("longest", key, no_index, date, chars, hi, lo, loc).tolist() == [2, 3, 1, 0]
    index = np.array([False, True, False, False])
    assert keeper_order("longest", key, index, date, chars, hi, lo, loc)[0] == 1   # an index copy first
