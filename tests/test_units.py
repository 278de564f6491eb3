"""Bounded units: one large file cut into ranges at record boundaries reads as exactly the same documents,
with the same accounting, as the file read whole (real books, a real wget-made WARC.gz)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_config
from pipeline.ledger import Ledger
from pipeline.sources import plan_fingerprint, plan_units, reader_for
from pipeline.sources.base import InputFile
from pipeline.sources.ranges import _window
from tests.test_warc import member_offsets  # one helper for both WARC test files

pytestmark = pytest.mark.realdata
SMALL_MB = 0.1          # the split plans; 1 GB: the same file read whole
TARGET = int(SMALL_MB * 1024 * 1024)


def plan(path: Path, fmt: str, kind: str, target_mb: float, **extra):
    config = parse_config({"run": {"unit_target_mb": target_mb},
                           "sources": [{"name": "s", "kind": kind, "format": fmt, "paths": [str(path)], **extra}]})
    return config, plan_units(config)


def read_units(config, units) -> tuple[list[tuple], dict]:
    """Every unit read on its own (as the workers do); documents in plan order, ledgers merged."""
    reader = reader_for(config.sources[0])
    docs, total = [], Ledger()
    for unit in units:
        ledger = Ledger()
        for file in unit.files:
            for d in reader.read(file, ledger):
                docs.append((d.id, d.text, d.metadata, getattr(d, "body", None)))
        total.merge(ledger)
    stats = total.stats(["read"])
    assert stats["invariant_ok"], stats["violations"]
    entry = dict(stats["stages"]["read"]["s"])
    entry.pop("seconds")
    return docs, entry


def split_and_whole(path: Path, fmt: str, kind: str, **extra):
    config, units = plan(path, fmt, kind, SMALL_MB, **extra)
    whole_config, whole = plan(path, fmt, kind, 1024, **extra)
    assert len(whole) == 1 and whole[0].files[0].whole
    assert plan_fingerprint(units) != plan_fingerprint(whole)
    return units, read_units(config, units), read_units(whole_config, whole)


def paragraphs(corpus) -> list[str]:
    out = []
    for name in ("austen-northangerabbey.txt", "austen-persuasion.txt"):
        text = (corpus.root / "books" / name).read_text()
        out += [p.strip() for p in text.split("\n\n") if p.strip()]
    return out


# ------------------------------------------------------------------------------------------------ JSONL
@pytest.fixture(scope="module")
def big_jsonl(corpus, tmp_path_factory) -> tuple[Path, list[int]]:
    """~1 MB of real paragraphs, one per line, with the bad lines a real dump has, a record longer than
    the unit target and one over ``max_document_mb``; returns the path and every line's start offset."""
    paras = paragraphs(corpus)
    lines: list[bytes] = []
    for i, p in enumerate(paras):
        lines.append(json.dumps({"text": p, "n": i}).encode() + b"\n")
        if i % 97 == 5:
            lines += [b"\n", b"{not json\n", b'["an", "array"]\n', b'{"title": "no text"}\n', b'{"text": ""}\n']
        if i == len(paras) // 3:
            lines.append(json.dumps({"text": " ".join(paras[:400])[:150_000], "n": "long"}).encode() + b"\n")
        if i == 2 * len(paras) // 3:
            lines.append(json.dumps({"text": "x" * 700_000}).encode() + b"\n")
    path = tmp_path_factory.mktemp("jsonl") / "dump.jsonl"
    path.write_bytes(b"".join(lines))
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line)
    return path, starts


def test_jsonl_split_reads_the_same_documents_as_whole(big_jsonl):
    path, starts = big_jsonl
    units, (docs, entry), (whole_docs, whole_entry) = split_and_whole(path, "jsonl", "book", max_document_mb=0.5)
    assert len(units) >= 3
    assert docs == whole_docs and entry == whole_entry
    assert entry["dropped"]["record_too_large"] == 1 and entry["errored"]["invalid_json"] >= 3
    assert entry["kept"] == len(docs) > 1000
    # Locators are byte offsets of the line: the same for a split and an unsplit file.
    assert all(d[2]["locator"].startswith("dump.jsonl#B") for d in docs)
    assert {int(d[2]["locator"].split("#B")[1]) for d in docs} <= set(starts)


def test_jsonl_cuts_are_line_starts_and_units_stay_near_the_target(big_jsonl):
    path, starts = big_jsonl
    data = path.read_bytes()
    _, units = plan(path, "jsonl", "book", SMALL_MB, max_document_mb=0.5)
    ranges = [u.files[0] for u in units]
    assert all(len(u.files) == 1 for u in units)
    assert ranges[0].start == 0 and ranges[-1].end is None
    assert [r.end for r in ranges[:-1]] == [r.start for r in ranges[1:]]   # contiguous, no gap, no overlap
    line_starts = set(starts)
    for r in ranges[1:]:
        assert r.start in line_starts and data[r.start - 1:r.start] == b"\n"
    lengths = dict(zip(starts, [b - a for a, b in zip(starts, starts[1:] + [len(data)])]))
    for r in ranges:
        inside = [lengths[s] for s in starts if r.start <= s < (r.end or len(data))]
        longest = max(inside)
        # the target plus the record it ends with; a record longer than the planner's window may push the
        # cut by about twice its length
        slack = 2 * longest + _window(TARGET) if longest > _window(TARGET) else longest
        assert r.nbytes <= TARGET + slack, (r, longest)


# ---------------------------------------------------------------------------------------------- Parquet
def test_parquet_split_by_row_groups_reads_the_same_rows(corpus, tmp_path):
    paras = paragraphs(corpus)
    texts = [None if i % 101 == 7 else "" if i % 103 == 9 else p for i, p in enumerate(paras)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), path, row_group_size=64)
    md = pq.ParquetFile(path).metadata
    assert md.num_row_groups > 20
    units, (docs, entry), (whole_docs, whole_entry) = split_and_whole(path, "parquet", "book")
    assert len(units) >= 3 and docs == whole_docs and entry == whole_entry
    assert entry["dropped"]["missing_text_field"] >= 1 and entry["dropped"]["empty_text"] >= 1
    spans = [u.files[0].row_groups for u in units]
    assert spans[0][0] == 0 and spans[-1][1] == md.num_row_groups
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))
    group_bytes = [sum(md.row_group(g).column(c).total_compressed_size for c in range(md.num_columns))
                   for g in range(md.num_row_groups)]
    for first, stop in spans:
        assert sum(group_bytes[first:stop]) <= TARGET + max(group_bytes[first:stop])
    # Locators are absolute row numbers, whatever the range.
    assert [d[2]["locator"] for d in docs[:2]] == ["rows.parquet#R0", "rows.parquet#R1"]
    assert docs[-1][2]["locator"] == f"rows.parquet#R{len(texts) - 1}"


def test_parquet_without_the_text_column_is_not_cut(corpus, tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": paragraphs(corpus)}), path, row_group_size=64)
    config, units = plan(path, "parquet", "book", SMALL_MB)
    assert len(units) == 1 and units[0].files[0].whole
    _, entry = read_units(config, units)
    assert entry["errored"] == {"missing_text_column": 1}


# ------------------------------------------------------------------------------------------------- WARC
@pytest.fixture(scope="module")
def crawl(corpus, tmp_path_factory) -> tuple[Path, bytes, list[int]]:
    """The test corpus's real WARC.gz files (wget: one gzip member per record) concatenated into one."""
    raw = b"".join(p.read_bytes() for p in sorted((corpus.root / "web").rglob("*.warc.gz")))
    path = tmp_path_factory.mktemp("warc") / "crawl.warc.gz"
    path.write_bytes(raw)
    return path, raw, member_offsets(raw)


def test_warc_gz_split_at_members_reads_the_same_pages(crawl):
    path, raw, members = crawl
    units, (docs, entry), (whole_docs, whole_entry) = split_and_whole(path, "warc", "web")
    assert len(units) >= 3 and docs == whole_docs and entry == whole_entry
    assert entry["in"] == len(members) and entry["errored"] == {} and entry["kept"] == len(docs) > 20
    ranges = [u.files[0] for u in units]
    assert [r.end for r in ranges[:-1]] == [r.start for r in ranges[1:]] and ranges[-1].end is None
    assert {r.start for r in ranges} <= set(members)                       # every cut is a member start
    sizes = dict(zip(members, [b - a for a, b in zip(members, members[1:] + [len(raw)])]))
    for r in ranges:
        inside = [sizes[m] for m in members if r.start <= m < (r.end or len(raw))]
        assert r.nbytes <= TARGET + 2 * max(inside) + _window(TARGET)
    # Locators are the record's member offset: the same split or not.
    assert all(d[2]["locator"] == f"crawl.warc.gz#B{d[2]['warc_offset']}" for d in docs)


@pytest.mark.parametrize("where", ["member_before_cut", "head_of_cut_member", "body_of_cut_member"])
def test_a_damaged_member_near_a_cut_is_booked_exactly_once(crawl, tmp_path, where):
    path, raw, members = crawl
    _, units = plan(path, "warc", "web", SMALL_MB)
    cut = units[2].files[0].start
    k = members.index(cut)
    if where == "member_before_cut":
        at = members[k - 1] + 20
    elif where == "head_of_cut_member":
        at = cut + 20                 # its header no longer inflates: the planner cuts at the next member
    else:
        at = cut + (members[k + 1] - cut) // 2
    damaged = raw[:at] + bytes(40) + raw[at + 40:]
    target = tmp_path / "crawl.warc.gz"
    target.write_bytes(damaged)
    units, (docs, entry), (whole_docs, whole_entry) = split_and_whole(target, "warc", "web")
    assert len(units) >= 3
    if where == "head_of_cut_member":
        assert cut not in {u.files[0].start for u in units}
    else:
        assert cut in {u.files[0].start for u in units}
    assert entry == whole_entry and docs == whole_docs
    assert entry["errored"] == {"corrupt_gzip_member": 1} and entry["in"] == len(members)


def test_a_range_end_off_the_member_chain_is_reported(crawl):
    path, raw, members = crawl
    config, _ = plan(path, "warc", "web", SMALL_MB)
    inside = members[10] + 5          # not a member start: as if the planner had been fooled
    ledger = Ledger()
    first = InputFile(str(path), path.name, len(raw), start=0, end=inside)
    pages = list(reader_for(config.sources[0]).read(first, ledger))
    assert pages and ledger.tallies[("read", "s", "split", "boundary_missed")] == 1


def test_single_stream_gzip_and_plain_warc_stay_whole(crawl, big_jsonl, tmp_path):
    path, raw, _ = crawl
    plain = tmp_path / "crawl.warc"
    plain.write_bytes(gzip.decompress(raw))          # gzip.decompress reads every member
    one_stream = tmp_path / "one.warc.gz"
    one_stream.write_bytes(gzip.compress(gzip.decompress(raw)))
    jsonl_gz = tmp_path / "dump.jsonl.gz"
    jsonl_gz.write_bytes(gzip.compress(big_jsonl[0].read_bytes()))
    for p, fmt, kind in ((plain, "warc", "web"), (one_stream, "warc", "web"), (jsonl_gz, "jsonl", "book")):
        _, units = plan(p, fmt, kind, SMALL_MB)
        assert len(units) == 1 and units[0].files[0].whole, p


# ---------------------------------------------------------------------------------- a run over split files
def _no_clock(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if "seconds" not in k}


@pytest.mark.slow
def test_a_run_over_split_files_books_what_the_unsplit_files_book(crawl, big_jsonl, lid_model, tmp_path):
    """The real CLI on a real local Ray over one WARC.gz and one JSONL, each cut into several units: the
    accounting invariant holds, and read and crawl-filter book what one unsplit unit per file books."""
    import yaml

    from pipeline.stages.crawl_filter import CrawlFilterStage
    from tests.conftest import run_cli

    sources = [{"name": "crawl", "kind": "web", "paths": [str(crawl[0])]},
               {"name": "dump", "kind": "book", "format": "jsonl", "paths": [str(big_jsonl[0])],
                "max_document_mb": 0.5}]
    data = {"run": {"unit_target_mb": SMALL_MB, "num_cpus": 2}, "sources": sources,
            "crawl_filter": {"web": {"gopher_quality": {"params": {"max_non_alpha_words_ratio": 0.5}}},
                             "book": {"min_words": 20}},
            "tokenize": {"train": {"vocab_size": 1024, "sample_mb": 1}, "shard_target_mb": 0.25}}
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(data))
    proc = run_cli("run", str(tmp_path / "split.yaml"), "--output", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "run/stats.json").read_text())
    assert stats["invariant_ok"], stats["violations"]
    split_units = plan_units(parse_config(data))
    assert {s["name"]: sum(u.source == s["name"] for u in split_units) for s in sources} == \
        {"crawl": 5, "dump": 8}

    whole_config = parse_config({**data, "run": {"unit_target_mb": 1024}})
    stage = CrawlFilterStage(whole_config)
    ledger = Ledger()
    for unit in plan_units(whole_config):
        ledger.merge(Ledger.from_json(stage.run_unit(unit, tmp_path / "whole")["ledger"]))
    whole = ledger.stats(["read", "crawl_filter"])["stages"]
    for step in ("read", "crawl_filter"):
        for source in ("crawl", "dump"):
            assert _no_clock(stats["stages"][step][source]) == _no_clock(whole[step][source]), (step, source)

    def kept(run_dir: Path) -> dict[str, str]:
        out = {}
        for p in sorted((run_dir / "stages/crawl_filter").glob("*.parquet")):
            t = pq.read_table(p, columns=["id", "metadata"]).to_pydict()
            out.update(zip(t["id"], (json.loads(m)["locator"] for m in t["metadata"])))
        return out

    got, expected = kept(tmp_path / "run"), kept(tmp_path / "whole")
    assert got == expected and len(got) > 100
    # The workers ran this tree's readers: byte-offset locators.
    assert all("#B" in loc for loc in got.values())
