"""Web crawls: WARC / WARC.gz files → HTTP 200 HTML responses, handed on as pages (HTML bytes, not text).

Framing and damage accounting are ``warc_stream``'s (gzip members, truncation, resynchronisation); each
record's bytes are parsed by FastWARC (WARC headers, HTTP headers, chunked and content-encoded bodies).
Extraction is not done here: the crawl-filter stage runs the URL filter first, so pages it drops are never
extracted, then decodes and extracts in a time-bounded sandbox (``pipeline.extract``).

Every record is booked under ``read``: kept (an HTML page), dropped (request, warcinfo, metadata, non-200,
non-HTML, too large, truncated by the crawler) or errored (``truncated_record``, ``corrupt_gzip_member``,
``corrupt_record``, ``gzip_member_too_large``, or ``corrupt_record:<Exception>`` for anything FastWARC
raises on one record).

A record's locator is ``<rel>#B<offset>``: the byte offset of its gzip member (of the record itself in a
plain WARC), with ``+<k>`` for the k-th further record of a member holding several. It does not depend on
how the file was cut into ranges (``pipeline.sources.ranges``); a range reads the records starting in it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from datatrove.data import Document

from pipeline.document import make_document
from pipeline.extract.charset import header_charset
from pipeline.ledger import Ledger
from pipeline.sources.base import READ_STAGE, InputFile, Reader
from pipeline.sources.warc_stream import Framed, frame_records, gzip_records

log = logging.getLogger(__name__)
HTML_TYPES = ("text/html", "application/xhtml+xml")
HEADER_ALLOWANCE = 1 << 20  # HTTP headers and WARC framing on top of the largest accepted body


@dataclass
class WebPage(Document):
    """A page before extraction: ``text`` is empty until the crawl-filter stage extracts ``body``."""

    body: bytes = b""
    header_charset: str | None = None


class WarcReader(Reader):
    def __init__(self, source):
        super().__init__(source)
        self.max_html = int(source.max_html_mb * 1024 * 1024)

    def read(self, file: InputFile, ledger: Ledger) -> Iterator[Document]:
        if file.size == 0:
            self.took(ledger)
            self.dropped(ledger, "empty_file")
            return
        max_record = self.max_html + HEADER_ALLOWANCE

        def missed(at: int) -> None:
            log.warning("%s: the range ending at byte %d was not on the file's chain of gzip members (reading "
                        "stopped at %d); records near the cut may be read twice or not at all", file.rel,
                        file.end, at)
            ledger.tally(READ_STAGE, self.source.name, "split", "boundary_missed")

        with fsspec.open(file.url, "rb") as raw:
            if file.url.endswith(".gz"):
                records = gzip_records(raw, max_record, max_member=2 * max_record, start=file.start,
                                       end=file.end, missed=missed)
            else:
                if file.start:
                    raw.seek(file.start)
                records = frame_records(raw.read, max_record, offset=file.start)
            previous, k = -1, 0
            for framed in records:
                if file.end is not None and framed.offset >= file.end:
                    break  # a plain WARC's next range starts here
                k = k + 1 if framed.offset == previous else 0
                previous = framed.offset
                # Where the record starts in the file (its gzip member's offset, and its rank within that
                # member when a member holds several records): the same whether or not the file was split.
                locator = f"{file.rel}#B{framed.offset}" + (f"+{k}" if k else "")
                self.took(ledger)
                if framed.damage:
                    self.errored(ledger, framed.damage, locator=locator,
                                 error=f"{framed.damage} at byte {framed.offset}")
                    continue
                try:
                    page = self._page(framed, locator, ledger)
                except Exception as exc:  # FastWARC on a malformed record: that record's error, not the file's
                    self.errored(ledger, f"corrupt_record:{type(exc).__name__}", locator=locator,
                                 error=f"{type(exc).__name__}: {exc} (record at byte {framed.offset})")
                    continue
                if page is not None:
                    yield page

    def _page(self, framed: Framed, locator: str, ledger: Ledger) -> WebPage | None:
        from fastwarc.warc import WarcRecord

        record = WarcRecord.from_bytes(framed.data)
        warc_type = (record.headers.get("WARC-Type") or "unknown").strip().lower()
        if warc_type != "response":
            self.dropped(ledger, f"warc_{warc_type}")
            return None
        if framed.oversize:
            self.dropped(ledger, "html_too_large")
            return None
        if not (record.headers.get("Content-Type") or "").lower().startswith("application/http"):
            self.dropped(ledger, "no_http_headers")
            return None
        record.parse_http(auto_decode="all")
        if record.http_headers.status_code != 200:
            self.dropped(ledger, "http_status_not_200")
            return None
        content_type = (record.http_headers.get("Content-Type") or "").lower()
        if not content_type.startswith(HTML_TYPES):
            self.dropped(ledger, "not_html")
            return None
        body = record.reader.read(self.max_html + 1)
        if len(body) > self.max_html:
            self.dropped(ledger, "html_too_large", len(body))
            return None
        if record.headers.get("WARC-Truncated"):
            self.dropped(ledger, "warc_truncated_record", len(body))
            return None
        if not body:
            self.dropped(ledger, "empty_body")
            return None
        url = (record.headers.get("WARC-Target-URI") or "").strip().strip("<>")
        doc = make_document("", self.source.name, self.source.kind, locator, url=url,
                            crawl_date=record.headers.get("WARC-Date") or "",
                            content_type=content_type.split(";")[0].strip(), html_bytes=len(body),
                            warc_offset=framed.offset)
        self.kept(ledger, len(body))
        return WebPage(text="", id=doc.id, metadata=doc.metadata, body=body,
                       header_charset=header_charset(content_type))
