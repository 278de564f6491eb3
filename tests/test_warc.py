"""WARC reading with exact accounting on a real wget-made WARC, damaged in every way a download can be."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import pytest

from pipeline.config import SourceConfig
from pipeline.ledger import Ledger
from pipeline.sources import reader_for
from pipeline.sources.base import InputFile

pytestmark = pytest.mark.realdata


def read(path: Path) -> tuple[list, dict]:
    reader = reader_for(SourceConfig(name="s", kind="web", paths=[str(path)]))
    ledger = Ledger()
    pages = list(reader.read(InputFile(str(path), path.name, path.stat().st_size), ledger))
    stats = ledger.stats(["read"])
    assert stats["invariant_ok"], stats["violations"]
    return pages, stats["stages"]["read"]["s"]


def urls(pages) -> list[str]:
    return [p.metadata["url"] for p in pages]


def member_offsets(raw: bytes) -> list[int]:
    offsets, pos = [], 0
    while pos < len(raw):
        offsets.append(pos)
        inflater = zlib.decompressobj(31)
        inflater.decompress(raw[pos:])
        pos = len(raw) - len(inflater.unused_data)
    return offsets


@pytest.fixture(scope="module")
def real_warc(corpus) -> tuple[bytes, list[int], list, dict]:
    path = corpus.root / "web/python-docs/python-docs.warc.gz"
    raw = path.read_bytes()
    pages, entry = read(path)
    return raw, member_offsets(raw), pages, entry


def test_clean_file_every_record_counted(real_warc):
    raw, members, pages, entry = real_warc
    assert entry["in"] == len(members)  # one record per gzip member, as wget writes them
    assert entry["errored"] == {} and entry["kept"] == len(pages) >= 20


def test_gzip_cut_inside_its_last_member_books_the_cut_record_once(real_warc, tmp_path):
    raw, members, pages, _ = real_warc
    cut_member = len(members) * 2 // 3
    cut = members[cut_member] + (members[cut_member + 1] - members[cut_member]) // 2
    (tmp_path / "t.warc.gz").write_bytes(raw[:cut])
    got, entry = read(tmp_path / "t.warc.gz")
    # the complete records before the cut, plus the cut one booked as errored: no phantom record
    assert entry["in"] == cut_member + 1 and entry["errored"] == {"truncated_record": 1}
    assert urls(got) == urls(pages[: len(got)])
    assert all(len(p.body) == p.metadata["html_bytes"] for p in got)


def test_plain_warc_cut_mid_record_keeps_nothing_partial(real_warc, tmp_path):
    raw, members, pages, _ = real_warc
    plain = gzip.decompress(raw)
    last_response = plain.rindex(b"WARC-Type: response")
    (tmp_path / "t.warc").write_bytes(plain[: last_response + 2000])  # inside the last response's body
    got, entry = read(tmp_path / "t.warc")
    assert entry["errored"] == {"truncated_record": 1}
    assert len(got) == len(pages) - 1 and urls(got) == urls(pages[:-1])


def test_corrupt_gzip_member_resynchronises_and_reads_the_rest(real_warc, tmp_path):
    raw, members, pages, entry_clean = real_warc
    k = len(members) // 2
    damaged = raw[: members[k] + 20] + bytes(40) + raw[members[k] + 60:]
    (tmp_path / "c.warc.gz").write_bytes(damaged)
    got, entry = read(tmp_path / "c.warc.gz")
    assert entry["in"] == len(members) and entry["errored"] == {"corrupt_gzip_member": 1}
    lost = set(urls(pages)) - set(urls(got))
    assert len(lost) <= 1 and len(got) >= len(pages) - 1
    assert urls(got)[-1] == urls(pages)[-1]  # the records after the damage were read


def test_garbage_instead_of_a_record_header_costs_that_record_only(real_warc, tmp_path):
    raw, members, pages, entry_clean = real_warc
    plain = gzip.decompress(raw)
    cut = plain.index(b"WARC/1.0", len(plain) // 2)
    (tmp_path / "g.warc").write_bytes(plain[:cut] + b"GARBAGE/9.9\r\nnot a header\r\n\r\n" + plain[cut + 8:])
    got, entry = read(tmp_path / "g.warc")
    assert entry["in"] == len(members) and entry["errored"] == {"corrupt_record": 1}
    assert len(got) >= len(pages) - 1 and urls(got)[-1] == urls(pages)[-1]


def test_any_exception_of_the_warc_library_is_that_records_error(real_warc, tmp_path, monkeypatch):
    """Records FastWARC rejects (a version it does not know, an HTTP header over its 32 KiB limit) and any
    other exception it raises on one record are that record's error; the unit reads on."""
    raw, members, pages, _ = real_warc
    huge_http = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-Junk: " + b"a" * 100_000 + b"\r\n\r\n<p>x</p>")
    bad = [b"WARC/1.0\r\nWARC-Type: response\r\nContent-Type: application/http; msgtype=response\r\n"
           b"Content-Length: %d\r\n\r\n" % len(huge_http) + huge_http + b"\r\n\r\n",
           b"WARC/9.9\r\nWARC-Type: response\r\nContent-Length: 4\r\n\r\nbody\r\n\r\n"]
    damaged = raw[: members[5]] + b"".join(gzip.compress(b) for b in bad) + raw[members[5]:]
    (tmp_path / "x.warc.gz").write_bytes(damaged)
    got, entry = read(tmp_path / "x.warc.gz")
    assert entry["in"] == len(members) + 2 and entry["errored"] == {"corrupt_record:OSError": 2}, entry
    assert urls(got) == urls(pages)

    from fastwarc.warc import WarcRecord

    real_from_bytes = WarcRecord.from_bytes
    target = pages[3].metadata["url"].encode()

    def flaky(data: bytes):
        if target in data and b"WARC-Type: response" in data:
            raise MemoryError("simulated")
        return real_from_bytes(data)

    monkeypatch.setattr(WarcRecord, "from_bytes", staticmethod(flaky))
    got, entry = read(tmp_path / "x.warc.gz")
    assert entry["errored"] == {"corrupt_record:OSError": 2, "corrupt_record:MemoryError": 1}
    assert urls(got) == [u for u in urls(pages) if u != target.decode()]


def test_trailing_zero_padding_is_not_a_record(real_warc, tmp_path):
    raw, members, pages, _ = real_warc
    (tmp_path / "z.warc.gz").write_bytes(raw + bytes(512))
    got, entry = read(tmp_path / "z.warc.gz")
    assert entry["in"] == len(members) and entry["errored"] == {} and len(got) == len(pages)


def test_fastwarc_and_warcio_see_the_same_pages(corpus):
    """Parity with warcio, the previous reader: the same HTML responses with the same bodies."""
    from warcio.archiveiterator import ArchiveIterator

    for path in sorted((corpus.root / "web").rglob("*.warc.gz")):
        with open(path, "rb") as fh:
            expected = [(r.rec_headers.get_header("WARC-Target-URI"), r.content_stream().read())
                        for r in ArchiveIterator(fh) if r.rec_type == "response"
                        and r.http_headers.get_statuscode() == "200"
                        and (r.http_headers.get_header("Content-Type") or "").startswith("text/html")]
        pages, _ = read(path)
        assert [(p.metadata["url"], p.body) for p in pages] == expected
