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


def datatrove_verdict(result: Any) -> tuple[bool, str | None]:
    """A datatrove ``filter()`` answer (``bool`` or ``(bool, reason)``) as ``(kept, reason)``."""
    return result if isinstance(result, tuple) else (bool(result), None)


class DatatroveFilter:
    """Adapter: runs a datatrove ``BaseFilter`` and names its drop reasons ``<step>:<reason>``."""

    def __init__(self, name: str, impl: Any):
        self.name = name
        self.impl = impl

    def __call__(self, doc: Document) -> Verdict:
        kept, reason = datatrove_verdict(self.impl.filter(doc))
        if kept:
            return True, None
        return False, f"{self.name}:{reason}" if reason else self.name
