"""Web crawls: WARC / WARC.gz files read with warcio; HTML responses extracted to text with trafilatura
through datatrove's extractor."""

from __future__ import annotations

import re
from collections.abc import Iterator

import fsspec
from datatrove.data import Document
from trafilatura.deduplication import LRU_TEST as _TRAFILATURA_SEEN  # noqa: E402
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from pipeline.document import make_document
from pipeline.ledger import Ledger
from pipeline.sources.base import GZIP_ERRORS, InputFile, Reader

_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
HTML_TYPES = ("text/html", "application/xhtml+xml")


def sniff_charset(content_type: str, head: bytes) -> str:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            return value.strip("\"' ").lower()
    match = _META_CHARSET.search(head[:4096])
    return match.group(1).decode("ascii").lower() if match else "utf-8"


def decode_html(body: bytes, charset: str) -> str:
    try:
        return body.decode(charset, errors="replace")
    except LookupError:  # unknown charset name in the page
        return body.decode("utf-8", errors="replace")


class _CheckedArchiveIterator(ArchiveIterator):
    """warcio treats a gzip stream that ends mid-member as a clean end of file; remember whether the last
    member was complete so a truncated download is reported instead of silently shortening the crawl."""

    truncated = False

    def close(self):
        reader = getattr(self, "reader", None)
        if reader is not None and reader.decompressor is not None:
            self.truncated = not getattr(reader.decompressor, "eof", True)
        super().close()


class WarcReader(Reader):
    def __init__(self, source):
        super().__init__(source)
        from datatrove.pipeline.extractors import Trafilatura

        # favour_precision as FineWeb; called directly (not as a pipeline step), so no sandbox process.
        self.extractor = Trafilatura(favour_precision=True, timeout=None)
        self.max_html = int(source.max_html_mb * 1024 * 1024)

    def read(self, file: InputFile, ledger: Ledger) -> Iterator[Document]:
        if file.size == 0:
            self.took(ledger)
            self.dropped(ledger, "empty_file")
            return
        with fsspec.open(file.url, "rb") as raw:
            records = _CheckedArchiveIterator(raw, arc2warc=True)
            index = -1
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    if records.truncated:
                        self.took(ledger)
                        self.errored(ledger, "truncated_gzip")
                    return
                except GZIP_ERRORS:
                    self.took(ledger)
                    self.errored(ledger, "truncated_gzip")
                    return
                except (ArchiveLoadFailed, ValueError, OSError) as exc:
                    self.took(ledger)
                    self.errored(ledger, f"corrupt_warc:{type(exc).__name__}")
                    return
                index += 1
                try:
                    # The record's ordinal, not its byte offset: warcio learns the offset only by reading
                    # the record to its end, which would consume the body.
                    doc = self._record(record, index, file, ledger)
                except GZIP_ERRORS:
                    self.errored(ledger, "truncated_gzip")
                    return
                except (ArchiveLoadFailed, ValueError, OSError) as exc:
                    self.errored(ledger, f"corrupt_record:{type(exc).__name__}")
                    continue
                if doc is not None:
                    yield doc

    def _record(self, record, index: int, file: InputFile, ledger: Ledger) -> Document | None:
        self.took(ledger)
        if record.rec_type != "response":
            self.dropped(ledger, f"warc_{record.rec_type}")
            return None
        http = record.http_headers
        if http is None:
            self.dropped(ledger, "no_http_headers")
            return None
        status = http.get_statuscode()
        if status != "200":
            self.dropped(ledger, "http_status_not_200")
            return None
        content_type = (http.get_header("Content-Type") or "").lower()
        if not content_type.startswith(HTML_TYPES):
            self.dropped(ledger, "not_html")
            return None
        declared = int(record.rec_headers.get_header("Content-Length") or 0)
        if declared > self.max_html + 65536:
            self.dropped(ledger, "html_too_large")
            return None
        body = record.content_stream().read(self.max_html + 1)
        if len(body) > self.max_html:
            self.dropped(ledger, "html_too_large", len(body))
            return None
        if record.rec_headers.get_header("WARC-Truncated"):
            self.dropped(ledger, "warc_truncated_record", len(body))
            return None
        if not body:
            self.dropped(ledger, "empty_body")
            return None
        charset = sniff_charset(content_type, body)
        html = decode_html(body, charset)
        # trafilatura's `deduplicate` remembers text segments across calls in a process-wide cache, which
        # makes a page's text depend on which pages the worker saw before it. Clearing it per page keeps
        # the in-page deduplication and makes extraction a pure function of the page (resume-safe).
        _TRAFILATURA_SEEN.clear()
        try:
            text = self.extractor.extract(html) or ""
        except Exception as exc:  # trafilatura/lxml raise many types on hostile HTML
            self.errored(ledger, f"extract:{type(exc).__name__}", len(body))
            return None
        text = text.strip()
        if not text:
            self.dropped(ledger, "no_text_extracted", len(body))
            return None
        url = (record.rec_headers.get_header("WARC-Target-URI") or "").strip("<> ")
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        self.kept(ledger, nbytes)
        return make_document(
            text, self.source.name, self.source.kind, f"{file.rel}#{index}",
            url=url, crawl_date=record.rec_headers.get_header("WARC-Date") or "",
            content_type=content_type.split(";")[0].strip(), charset=charset, html_bytes=len(body),
        )
