"""Book-specific checks (language and repetition come from the shared/datatrove filters)."""

from __future__ import annotations

from datatrove.data import Document

from pipeline.filters.base import Verdict


class MinWords:
    name = "book_min_words"

    def __init__(self, min_words: int):
        self.min_words = min_words

    def __call__(self, doc: Document) -> Verdict:
        words = len(doc.text.split())
        doc.metadata["words"] = words
        return (True, None) if words >= self.min_words else (False, "book_too_short")
