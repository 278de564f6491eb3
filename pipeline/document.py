"""The one record shape that flows between stages, and its on-disk form (one Parquet file per unit).

In memory a document is datatrove's ``Document`` (text, id, metadata) so datatrove filters run on it
unchanged; ``source`` and ``source_kind`` live in its metadata. On disk, between stages, a unit's documents
are a Parquet table with fixed columns; stage-specific values (language, scores) travel in ``metadata``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document

from pipeline.atomic import atomic_path

DOC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("source_kind", pa.string()),
        ("text", pa.large_string()),
        ("metadata", pa.string()),  # JSON object
    ]
)
_WRITE_BATCH = 256


def document_id(source: str, locator: str) -> str:
    """Stable id: the same source name and locator give the same id on every machine and run."""
    return hashlib.blake2b(f"{source}\x00{locator}".encode(), digest_size=12).hexdigest()


def clean_text(text: str) -> tuple[str, int]:
    """``text`` made encodable as UTF-8, and how many code points were replaced.

    JSON (``"\\ud800"``) and Python strings can hold lone surrogates, which UTF-8 cannot encode: written to
    Parquet they raise ``UnicodeEncodeError`` on every retry. Each becomes U+FFFD; a valid surrogate pair
    that arrived as two code points is joined into its character.
    """
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return fixed, max(1, fixed.count("\ufffd") - text.count("\ufffd"))


def make_document(text: str, source: str, kind: str, locator: str, **metadata) -> Document:
    """A document with a stable id; lone surrogates in the text or string metadata are repaired here, at
    read time, and counted in ``metadata["unicode_repaired"]``."""
    text, repaired = clean_text(text)
    meta: dict = {"source": source, "source_kind": kind}
    for key, value in (("locator", locator), *metadata.items()):
        key, n_key = clean_text(key)
        if isinstance(value, str):
            value, n_value = clean_text(value)
            repaired += n_value
        meta[key] = value
        repaired += n_key
    if repaired:
        meta["unicode_repaired"] = repaired
    return Document(text=text, id=document_id(source, meta["locator"]), metadata=meta)


def _row(doc: Document) -> tuple[str, str, str, str, str]:
    """One document as the Parquet row's strings; raises on anything that cannot be written (checked per
    document, so one bad document never fails the batch it would have been written in)."""
    meta = dict(doc.metadata)
    row = (doc.id, meta.pop("source"), meta.pop("source_kind"), doc.text,
           json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str))
    for value in row:
        value.encode("utf-8")
    return row


def _to_batch(rows: list[tuple[str, str, str, str, str]]) -> pa.RecordBatch:
    ids, sources, kinds, texts, metas = zip(*rows)
    return pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.array(sources, pa.string()), pa.array(kinds, pa.string()),
         pa.array(texts, pa.large_string()), pa.array(metas, pa.string())],
        schema=DOC_SCHEMA,
    )


def write_documents(path: Path, docs: Iterable[Document],
                    reject: Callable[[Document, Exception], None] | None = None) -> tuple[int, int]:
    """Stream documents into a Parquet file, atomically. Returns (documents, text bytes).

    A document that cannot be written is handed to ``reject`` (which books it) and skipped; without
    ``reject`` it raises."""
    count = nbytes = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, DOC_SCHEMA, compression="zstd") as writer:
        batch: list[tuple[str, str, str, str, str]] = []
        for doc in docs:
            try:
                row = _row(doc)
            except Exception as exc:  # noqa: BLE001 - one unwritable document, not the unit
                if reject is None:
                    raise
                reject(doc, exc)
                continue
            batch.append(row)
            count += 1
            nbytes += len(doc.text.encode("utf-8"))
            if len(batch) >= _WRITE_BATCH:
                writer.write_batch(_to_batch(batch))
                batch = []
        if batch:
            writer.write_batch(_to_batch(batch))
    return count, nbytes


def metadata_scores(metadata: list[str], key: str) -> np.ndarray:
    """The numeric ``key`` of each document's JSON metadata as float64; NaN where it is absent."""
    values = (json.loads(m).get(key) for m in metadata)
    return np.array([float(v) if isinstance(v, (int, float)) else np.nan for v in values], dtype=np.float64)


def read_documents(path: Path, batch_size: int = _WRITE_BATCH) -> Iterator[Document]:
    """Stream documents back from a unit's Parquet file, one record batch at a time."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_size):
        cols = batch.to_pydict()
        for i in range(batch.num_rows):
            meta = json.loads(cols["metadata"][i])
            meta["source"] = cols["source"][i]
            meta["source_kind"] = cols["source_kind"][i]
            yield Document(text=cols["text"][i], id=cols["id"][i], metadata=meta)
