"""HTML bytes to text: charset decoding, the extractors, and the bounded-time sandbox that runs them.

* ``charset.py``  — bytes → str the way a browser would, plus byte-level detection and a replacement budget.
* ``html.py``     — the one pure function ``HtmlToText(settings)(body, header_charset)`` (decode, then
  Resiliparse or trafilatura), identical wherever it runs.
* ``sandbox.py``  — runs that function in a child process with a per-page time limit; a page that runs
  over is booked ``extract_timeout`` and the child is replaced, a page that kills the child is booked
  ``extract_crashed``. With the limit off it runs in-process.
"""

from pipeline.extract.html import ExtractResult, ExtractSettings, HtmlToText
from pipeline.extract.sandbox import PageExtractor

__all__ = ["ExtractResult", "ExtractSettings", "PageExtractor", "HtmlToText"]
