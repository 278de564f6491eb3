"""The filter contract: one job each, answering ``(kept, reason)`` for a document.

Filters may annotate ``doc.metadata`` (language, scores) and some datatrove filters edit ``doc.text``
(C4 removes lines); that is how FineWeb runs them too.
"""

from __future__ import annotations

from typing import Any, Protocol

from datatrove.data import Document

Verdict = tuple[bool, "str | None"]


class DocumentFilter(Protocol):
    name: str

    def __call__(self, doc: Document) -> Verdict: ...


class DatatroveFilter:
    """Adapter: runs a datatrove ``BaseFilter`` and names its drop reasons ``<step>:<reason>``."""

    def __init__(self, name: str, impl: Any):
        self.name = name
        self.impl = impl

    def __call__(self, doc: Document) -> Verdict:
        result = self.impl.filter(doc)
        kept, reason = result if isinstance(result, tuple) else (result, None)
        if kept:
            return True, None
        return False, f"{self.name}:{reason}" if reason else self.name
