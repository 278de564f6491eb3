"""``HtmlToText``: one pure function from an HTTP body to extracted text, the same in-process or sandboxed.

Extractors:

* ``resiliparse`` (default): ``resiliparse.extract.html2text.extract_plain_text`` with DCLM's setting
  ``main_content=True`` (Resiliparse's main-content heuristics, formatting preserved); ~4 ms a page here.
* ``trafilatura``: datatrove's ``Trafilatura`` extractor with FineWeb's ``favour_precision=True``; ~30–150 ms
  a page. trafilatura's ``deduplicate`` remembers text segments in a process-wide cache, which would make
  a page's text depend on the pages extracted before it; the cache is cleared per page, so extraction is
  a pure function of the page (resume-safe, worker-count independent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.extract.charset import decode_html

EXTRACTORS = ("resiliparse", "trafilatura")
# Keyword arguments of resiliparse's extract_plain_text (a Cython function: no inspectable signature).
RESILIPARSE_OPTIONS = frozenset({"preserve_formatting", "main_content", "list_bullets", "alt_texts", "links",
                                 "form_fields", "noscript", "comments", "post_meta", "hidden_elements",
                                 "skip_elements"})
DCLM_RESILIPARSE = {"main_content": True}
FINEWEB_TRAFILATURA = {"favour_precision": True}


@dataclass(frozen=True)
class ExtractSettings:
    extractor: str = "resiliparse"
    resiliparse: dict[str, Any] = field(default_factory=lambda: dict(DCLM_RESILIPARSE))
    trafilatura: dict[str, Any] = field(default_factory=lambda: dict(FINEWEB_TRAFILATURA))
    max_replacement_fraction: float = 0.01


@dataclass(frozen=True)
class ExtractResult:
    """``outcome`` is kept / dropped / errored; ``reason`` names a drop or error."""

    outcome: str
    text: str = ""
    reason: str = ""
    charset: str = ""
    charset_method: str = ""


class HtmlToText:
    """The page function. Extractor callables are built on first use (trafilatura's import takes ~0.5 s)."""

    def __init__(self, settings: ExtractSettings):
        self.settings = settings
        self._extract = None

    def __call__(self, body: bytes, header_label: str | None) -> ExtractResult:
        decoded = decode_html(body, header_label, self.settings.max_replacement_fraction)
        if decoded is None:
            return ExtractResult("dropped", reason="undecodable")
        if self._extract is None:
            self._extract = self._build()
        try:
            text = self._extract(decoded.text)
        except Exception as exc:  # hostile HTML makes both extractors raise many types
            return ExtractResult("errored", reason=f"extract:{type(exc).__name__}", charset=decoded.charset,
                                 charset_method=decoded.method)
        text = (text or "").strip()
        if not text:
            return ExtractResult("dropped", reason="no_text_extracted", charset=decoded.charset,
                                 charset_method=decoded.method)
        return ExtractResult("kept", text=text, charset=decoded.charset, charset_method=decoded.method)

    def _build(self):
        if self.settings.extractor == "resiliparse":
            from resiliparse.extract.html2text import extract_plain_text

            options = dict(self.settings.resiliparse)
            return lambda html: extract_plain_text(html, **options)
        from datatrove.pipeline.extractors import Trafilatura
        from trafilatura.deduplication import LRU_TEST

        extractor = Trafilatura(**{**self.settings.trafilatura, "timeout": None})  # the sandbox bounds time

        def run(html: str) -> str:
            LRU_TEST.clear()
            return extractor.extract(html) or ""

        return run
