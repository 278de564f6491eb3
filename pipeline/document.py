"""The one record shape that flows between stages, and its on-disk form (one Parquet file per unit).

In memory a document is datatrove's ``Document`` (text, id, metadata) so datatrove filters run on it
unchanged; ``source`` and ``source_kind`` live in its metadata. On disk, between stages, a unit's documents
are a Parquet table with fixed columns; stage-specific values (language, scores) travel in ``metadata``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
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


def make_document(text: str, source: str, kind: str, locator: str, **metadata) -> Document:
    meta = {"source": source, "source_kind": kind, "locator": locator, **metadata}
    return Document(text=text, id=document_id(source, locator), metadata=meta)


def _to_batch(docs: list[Document]) -> pa.RecordBatch:
    ids, sources, kinds, texts, metas = [], [], [], [], []
    for doc in docs:
        meta = dict(doc.metadata)
        ids.append(doc.id)
        sources.append(meta.pop("source"))
        kinds.append(meta.pop("source_kind"))
        texts.append(doc.text)
        metas.append(json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str))
    return pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.array(sources, pa.string()), pa.array(kinds, pa.string()),
         pa.array(texts, pa.large_string()), pa.array(metas, pa.string())],
        schema=DOC_SCHEMA,
    )


def write_documents(path: Path, docs: Iterable[Document]) -> tuple[int, int]:
    """Stream documents into a Parquet file, atomically. Returns (documents, text bytes)."""
    count = nbytes = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, DOC_SCHEMA, compression="zstd") as writer:
        batch: list[Document] = []
        for doc in docs:
            batch.append(doc)
            count += 1
            nbytes += len(doc.text.encode("utf-8", "surrogatepass"))
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
