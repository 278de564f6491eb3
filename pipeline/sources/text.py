"""Books: one plain-text file (optionally gzip) per book."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

from datatrove.data import Document

from pipeline.document import make_document
from pipeline.ledger import Ledger
from pipeline.sources.base import GZIP_ERRORS, InputFile, Reader, open_binary, read_capped


def guess_title(text: str, fallback: str) -> str:
    for line in text.splitlines()[:40]:
        line = line.strip()
        if 3 <= len(line) <= 120:
            return line
    return fallback


class TextReader(Reader):
    def read(self, file: InputFile, ledger: Ledger) -> Iterator[Document]:
        self.took(ledger, 1, file.size)
        if file.size == 0:
            self.dropped(ledger, "empty_file")
            return
        compressed = file.url.endswith(".gz")
        if not compressed and file.size > self.max_bytes:
            self.dropped(ledger, "too_large", file.size)  # decided from the size alone: never read
            return
        try:
            with open_binary(file.url) as fh:
                data = read_capped(fh, self.max_bytes)
        except GZIP_ERRORS:
            self.errored(ledger, "truncated_gzip", file.size)
            return
        if data is None:
            self.dropped(ledger, "too_large", file.size)
            return
        if not data.strip():
            self.dropped(ledger, "empty_file", len(data))
            return
        if b"\x00" in data[:8192]:
            self.dropped(ledger, "binary", len(data))
            return
        text = self.decode(data)
        if text is None:
            self.dropped(ledger, "invalid_utf8", len(data))
            return
        stem = posixpath.basename(file.rel)
        for suffix in (".gz", ".txt"):
            stem = stem.removesuffix(suffix)
        self.kept(ledger, len(data))
        yield make_document(text, self.source.name, self.source.kind, file.rel,
                            title=guess_title(text, stem), path=file.rel)
