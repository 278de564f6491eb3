"""HTML bytes to text: charsets on real re-encoded and real legacy pages, both extractors, the per-page time
limit on hostile HTML, a crashed extraction child."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from pipeline.config import SourceConfig, parse_config
from pipeline.extract import ExtractSettings, HtmlToText, PageExtractor
from pipeline.extract.charset import decode_html, header_charset, meta_charset, whatwg_label
from pipeline.ledger import Ledger
from pipeline.sources import reader_for
from pipeline.sources.base import InputFile, Unit

pytestmark = pytest.mark.realdata


def pages_of(warc: Path):
    reader = reader_for(SourceConfig(name="s", kind="web", paths=[str(warc)]))
    return list(reader.read(InputFile(str(warc), warc.name, warc.stat().st_size), Ledger()))


def test_labels_map_as_browsers_map_them():
    assert whatwg_label("ISO-8859-1") == whatwg_label("latin1") == whatwg_label("us-ascii") == "cp1252"
    assert whatwg_label("gb2312") == "gbk" and whatwg_label("x-sjis") == "shift_jis"
    assert whatwg_label("no-such-charset") is None
    assert header_charset('text/html; charset="ISO-8859-1"') == "iso-8859-1" and header_charset("text/html") is None
    assert meta_charset(b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=EUC-KR">') == "euc-kr"


def test_real_pages_served_with_missing_or_wrong_labels_decode_to_their_text(web_corpus):
    """Real handbook pages re-encoded (cp1251 undeclared, Shift_JIS declared, EUC-JP undeclared, GBK labelled
    gb2312, cp1252 labelled iso-8859-1, UTF-8 labelled iso-8859-1), crawled through a real HTTP server: the
    decoded text equals the original, where decoding by the label (or UTF-8) alone did not."""
    cases = {c["path"]: c for c in web_corpus.charset_cases}
    seen: dict[str, int] = {}
    for page in pages_of(web_corpus.root / "charsets/charsets.warc.gz"):
        case = cases[urlparse(page.metadata["url"]).path]
        decoded = decode_html(page.body, page.header_charset)
        assert decoded is not None and decoded.replacements == 0, case
        assert hashlib.sha256(decoded.text.encode()).hexdigest() == case["sha256"], (case, decoded.charset)
        if case["case"] != "shift_jis-declared":  # correctly declared: the control case
            naive = page.body.decode(page.header_charset or "utf-8", errors="replace")
            assert hashlib.sha256(naive.encode()).hexdigest() != case["sha256"], case  # label-only decoding fails
        seen[case["case"]] = seen.get(case["case"], 0) + 1
    assert seen == {name: 4 for name in ("cp1251-undeclared", "shift_jis-declared", "euc-jp-undeclared",
                                         "gbk-labelled-gb2312", "cp1252-labelled-iso-8859-1",
                                         "utf8-labelled-iso-8859-1")}


def test_real_euc_kr_pages_decode_cleanly(web_corpus):
    korean = [p for p in pages_of(web_corpus.root / "apache-manual/apache-manual.warc.gz")
              if "/ko/" in p.metadata["url"]]
    assert len(korean) >= 100
    for page in korean:
        decoded = decode_html(page.body, page.header_charset)
        assert (decoded.charset, decoded.method, decoded.replacements) == ("euc_kr", "meta", 0)
        assert any("\uac00" <= ch <= "\ud7a3" for ch in decoded.text)  # Hangul syllables


def test_binary_served_as_html_is_undecodable_but_one_stray_byte_is_not(corpus):
    import random

    page = HtmlToText(ExtractSettings())
    rng = random.Random(1)
    noise = bytes(rng.randrange(256) for _ in range(5000))
    assert (page(noise, "utf-8").outcome, page(noise, "utf-8").reason) == ("dropped", "undecodable")
    c1_only = b"\x81\x8d\x8f\x90\x9d" * 100  # undefined in windows-1252 and invalid UTF-8
    assert page(c1_only, None).reason == "undecodable"
    # A real UTF-8 page with one stray Latin-1 byte keeps its label (one replacement), not a detected
    # single-byte encoding that would turn every accented letter into mojibake.
    real = next(p.body for p in pages_of(corpus.root / "web/debian-handbook/debian-handbook.warc.gz")
                if "/fr-FR/" in p.metadata["url"])
    cut = real.index(b"</title>")
    decoded = decode_html(real[:cut] + b"\xe9" + real[cut:], "utf-8")
    assert (decoded.charset, decoded.method, decoded.replacements) == ("utf-8", "header", 1)
    assert decoded.text.replace("\ufffd", "", 1) == real.decode("utf-8")


def hostile_pages() -> dict[str, bytes]:
    return {
        # Resiliparse takes minutes on this (measured: 240 s); trafilatura gives up quickly.
        "nested": b"<html><body>" + b"<div>" * 100_000 + b"deep text" + b"</div>" * 100_000 + b"</body></html>",
        "attribute": b'<html><body><p title="' + b"x" * 5_000_000 + b'">After a long attribute.</p></body></html>',
        # trafilatura takes ~6 s on this one, Resiliparse 0.1 s.
        "paragraphs": b"<html><body>" + b"".join(b"<p>paragraph %d with some words.</p>" % i for i in range(60_000))
        + b"</body></html>",
    }


def write_warc(path: Path, pages: dict[str, bytes]) -> None:
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True)
        for name, html in pages.items():
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(f"http://127.0.0.1/{name}.html", "response",
                                                          payload=io.BytesIO(html), http_headers=headers))


@pytest.mark.parametrize("extractor,slow", [("resiliparse", "nested"), ("trafilatura", "paragraphs")])
def test_hostile_pages_are_bounded_and_the_unit_completes(corpus, tmp_path, extractor, slow, lid_model):
    from pipeline.stages.crawl_filter import CrawlFilterStage

    real = {f"real{i}": p.body for i, p in enumerate(pages_of(corpus.root / "web/python-docs/python-docs.warc.gz")[:4])}
    write_warc(tmp_path / "hostile.warc.gz", {"a": real["real0"], **hostile_pages(), **real})
    cfg = parse_config({"sources": [{"name": "w", "kind": "web", "paths": [str(tmp_path)], "max_html_mb": 16}],
                        "crawl_filter": {"web": {"extractor": extractor, "extraction": {"timeout_s": 1.0},
                                                 "language": {"model": str(lid_model)}}}})
    warc = tmp_path / "hostile.warc.gz"
    unit = Unit("w-00000", "w", "web", (InputFile(str(warc), warc.name, warc.stat().st_size),))
    started = time.perf_counter()
    result = CrawlFilterStage(cfg).run_unit(unit, tmp_path / "run")
    took = time.perf_counter() - started
    stats = Ledger.from_json(result["ledger"]).stats(["read", "crawl_filter"])
    assert stats["invariant_ok"], stats["violations"]
    entry = stats["stages"]["crawl_filter"]["w"]
    assert entry["in"] == 8 and entry["dropped"].get("extract_timeout", 0) >= 1, entry
    extracted_real = 8 - sum(entry["errored"].values()) - entry["dropped"].get("extract_timeout", 0)
    assert extracted_real >= 5  # the real pages before and after the hostile ones were extracted
    assert took < 60, took


def test_timeout_then_a_fresh_child_takes_the_rest_of_the_batch(corpus):
    real = [p.body for p in pages_of(corpus.root / "web/python-docs/python-docs.warc.gz")[:3]]
    extractor = PageExtractor(ExtractSettings(), timeout_s=0.5)
    results = extractor.extract_many([(real[0], None), (hostile_pages()["nested"], None), (real[1], None),
                                      (real[2], None)])
    assert [r.outcome for r in results] == ["kept", "dropped", "kept", "kept"]
    assert results[1].reason == "extract_timeout" and extractor.restarts == 1
    assert results[2].text == HtmlToText(ExtractSettings())(real[1], None).text  # same function, in or out
    extractor.close()


def test_a_child_that_dies_mid_page_is_booked_and_replaced(corpus):
    real = pages_of(corpus.root / "web/python-docs/python-docs.warc.gz")[0].body
    extractor = PageExtractor(ExtractSettings(), timeout_s=30)
    assert extractor(real, None).outcome == "kept"
    victim = extractor._proc.pid  # noqa: SLF001 - the test kills the child from outside, like the OOM killer
    threading.Timer(0.3, os.kill, (victim, signal.SIGKILL)).start()
    crashed = extractor(hostile_pages()["nested"], None)
    assert (crashed.outcome, crashed.reason) == ("errored", "extract_crashed")
    assert extractor(real, None).outcome == "kept" and extractor._proc.pid != victim  # noqa: SLF001
    extractor.close()
