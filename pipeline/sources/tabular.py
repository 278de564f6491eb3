"""Generic inputs: JSONL (optionally gzip) and Parquet with a configurable text field."""

from __future__ import annotations

import json
from collections.abc import Iterator

import fsspec
import pyarrow.parquet as pq
from datatrove.data import Document

from pipeline.document import make_document
from pipeline.ledger import Ledger
from pipeline.sources.base import GZIP_ERRORS, InputFile, Reader, open_binary
from pipeline.sources.code import language_of


class _TabularReader(Reader):
    def _document(self, record: dict, file: InputFile, row: str, ledger: Ledger) -> Document | None:
        try:
            return self._make(record, file, row, ledger)
        except Exception as exc:  # noqa: BLE001 - one poison record is that record's error, never the unit's
            self.errored(ledger, f"bad_record:{type(exc).__name__}", locator=f"{file.rel}#{row}",
                         error=f"{type(exc).__name__}: {exc}")
            return None

    def _make(self, record: dict, file: InputFile, row: str, ledger: Ledger) -> Document | None:
        text = record.get(self.source.text_field)
        if text is None:
            self.dropped(ledger, "missing_text_field")
            return None
        if not isinstance(text, str):
            self.dropped(ledger, "text_not_a_string")
            return None
        if not text.strip():
            self.dropped(ledger, "empty_text")
            return None
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        if nbytes > self.max_bytes:
            self.dropped(ledger, "too_large", nbytes)
            return None
        locator = f"{file.rel}#{row}"
        if self.source.id_field and record.get(self.source.id_field) is not None:
            locator = f"id:{record[self.source.id_field]}"
        meta = {k: v for k, v in record.items() if k != self.source.text_field and _scalar(v)}
        if self.source.path_field and isinstance(record.get(self.source.path_field), str):
            meta.setdefault("path", record[self.source.path_field])
            meta.setdefault("language", language_of(record[self.source.path_field]))
        doc = make_document(text, self.source.name, self.source.kind, locator, **meta)
        self.kept(ledger, nbytes)
        return doc


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


class JsonlReader(_TabularReader):
    """One JSON object per line. A record's locator is ``<rel>#B<offset>``, the offset of its line in the
    (uncompressed) file, so ids do not depend on how the file was cut into ranges. A range reads the lines
    that start in ``[start, end)``; the planner put ``start`` on a line start."""

    def read(self, file: InputFile, ledger: Ledger) -> Iterator[Document]:
        if file.size == 0:
            self.took(ledger)
            self.dropped(ledger, "empty_file")
            return
        limit = self.max_bytes
        pos, end = file.start, file.end
        try:
            with open_binary(file.url) as fh:
                if pos:
                    fh.seek(pos - 1)
                    if fh.read(1) != b"\n":
                        raise ValueError(f"{file.describe()}: byte {pos} is not a line start (the file changed "
                                         "since the plan was made)")
                while end is None or pos < end:
                    at = pos
                    line = fh.readline(limit + 1)
                    if not line:
                        return
                    pos += len(line)
                    if len(line) > limit and not line.endswith(b"\n"):
                        # A giant line: skip the rest of it without ever holding it in memory.
                        skipped = len(line)
                        while line and not line.endswith(b"\n"):
                            line = fh.readline(1 << 20)
                            skipped += len(line)
                        pos = at + skipped
                        self.took(ledger, 1, skipped)
                        self.dropped(ledger, "record_too_large", skipped)
                        continue
                    if not line.strip():
                        continue  # blank separator lines are not records
                    self.took(ledger, 1, len(line))
                    row = f"B{at}"
                    try:
                        record = json.loads(line)
                    except (UnicodeDecodeError, ValueError) as exc:
                        self.errored(ledger, "invalid_json", len(line), locator=f"{file.rel}#{row}",
                                     error=f"{type(exc).__name__}: {exc}")
                        continue
                    if not isinstance(record, dict):
                        self.errored(ledger, "record_not_an_object", len(line))
                        continue
                    doc = self._document(record, file, row, ledger)
                    if doc is not None:
                        yield doc
        except GZIP_ERRORS:
            self.took(ledger)
            self.errored(ledger, "truncated_gzip")


class ParquetReader(_TabularReader):
    """Rows of a Parquet file, row group by row group. A record's locator is ``<rel>#R<row>``, its row
    number in the whole file (from the footer), whatever the range. A row group that fails to decode is one
    ``corrupt_parquet`` error (its rows not yet read are lost) and reading goes on with the next one."""

    def read(self, file: InputFile, ledger: Ledger) -> Iterator[Document]:
        try:
            with fsspec.open(file.url, "rb") as fh:
                pf = pq.ParquetFile(fh)
                if self.source.text_field not in pf.schema_arrow.names:
                    self.took(ledger)
                    self.errored(ledger, "missing_text_column")
                    return
                md = pf.metadata
                first, stop = file.row_groups or (0, md.num_row_groups)
                row = sum(md.row_group(g).num_rows for g in range(first))
                for group in range(first, stop):
                    group_end = row + md.row_group(group).num_rows
                    try:
                        for batch in pf.iter_batches(batch_size=1024, row_groups=[group]):
                            for record in batch.to_pylist():
                                self.took(ledger)
                                doc = self._document(record, file, f"R{row}", ledger)
                                row += 1
                                if doc is not None:
                                    yield doc
                    except (OSError, ValueError) as exc:
                        self.took(ledger)
                        self.errored(ledger, f"corrupt_parquet:{type(exc).__name__}")
                    row = group_end
        except (OSError, ValueError) as exc:
            self.took(ledger)
            self.errored(ledger, f"corrupt_parquet:{type(exc).__name__}")
