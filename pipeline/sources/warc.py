"""Web crawls: WARC / WARC.gz files → HTTP 200 HTML responses, handed on as pages (HTML bytes, not text).

Framing and damage accounting are ``warc_stream``'s (gzip members, truncation, resynchronisation); each
record's bytes are parsed by FastWARC (WARC headers, HTTP headers, chunked and content-encoded bodies).
Extraction is not done here: the crawl-filter stage runs the URL filter first, so pages it drops are never
extracted, then decodes and extracts in a time-bounded sandbox (``pipeline.extract``).

Every record is booked under ``read``: kept (an HTML page), dropped (request, warcinfo, metadata, non-200,
non-HTML, too large, truncated by the crawler) or errored (``truncated_record``, ``corrupt_gzip_member``,
``corrupt_record``, ``gzip_member_too_large``, or ``corrupt_record:<Exception>`` for anything FastWARC
raises on one record).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from datatrove.data import Document

from pipeline.document import make_document
from pipeline.extract.charset import header_charset
from pipeline.ledger import Ledger
from pipeline.sources.base import InputFile, Reader
from pipeline.sources.warc_stream import Framed, frame_records, gzip_records

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
        with fsspec.open(file.url, "rb") as raw:
            if file.url.endswith(".gz"):
                records = gzip_records(raw, max_record, max_member=2 * max_record)
            else:
                records = frame_records(raw.read, max_record)
            for index, framed in enumerate(records):
                self.took(ledger)
                locator = f"{file.rel}#{index}"
                if framed.damage:
                    self.errored(ledger, framed.damage, locator=locator,
                                 error=f"{framed.damage} at byte {framed.offset}")
                    continue
                try:
                    page = self._page(framed, index, file, ledger)
                except Exception as exc:  # FastWARC on a malformed record: that record's error, not the file's
                    self.errored(ledger, f"corrupt_record:{type(exc).__name__}", locator=locator,
                                 error=f"{type(exc).__name__}: {exc} (record at byte {framed.offset})")
                    continue
                if page is not None:
                    yield page

    def _page(self, framed: Framed, index: int, file: InputFile, ledger: Ledger) -> WebPage | None:
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
        doc = make_document("", self.source.name, self.source.kind, f"{file.rel}#{index}", url=url,
                            crawl_date=record.headers.get("WARC-Date") or "",
                            content_type=content_type.split(";")[0].strip(), html_bytes=len(body),
                            warc_offset=framed.offset)
        self.kept(ledger, len(body))
        return WebPage(text="", id=doc.id, metadata=doc.metadata, body=body,
                       header_charset=header_charset(content_type))
