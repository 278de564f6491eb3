"""Readers on real inputs: a wget-made WARC of Python's docs, real books, the CPython standard library."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceConfig
from pipeline.document import document_id, read_documents, write_documents
from pipeline.ledger import Ledger
from pipeline.sources import reader_for
from pipeline.sources.base import InputFile
from pipeline.sources.code import language_of, path_rejection

pytestmark = pytest.mark.realdata


def read_all(kind: str, fmt: str | None, path: Path, rel: str | None = None, **extra):
    source = SourceConfig(name="s", kind=kind, format=fmt, paths=[str(path)], **extra)
    ledger = Ledger()
    docs = list(reader_for(source).read(InputFile(str(path), rel or path.name, path.stat().st_size), ledger))
    stats = ledger.stats(["read"])
    assert stats["invariant_ok"], stats["violations"]
    return docs, stats["stages"].get("read", {}).get("s")


@pytest.fixture(scope="module")
def python_docs(corpus):
    return read_all("web", "warc", corpus.root / "web/python-docs/python-docs.warc.gz")


def test_warc_reader_hands_on_real_html_pages(corpus, python_docs):
    warc = corpus.root / "web/python-docs/python-docs.warc.gz"
    docs, entry = python_docs
    assert len(docs) == entry["kept"] >= 20
    assert entry["dropped"]["warc_request"] >= entry["kept"]  # every response was requested (wget also asks robots.txt)
    doc = docs[0]
    assert doc.metadata["url"].startswith("http://127.0.0.1:") and doc.metadata["url"].endswith(".html")
    assert doc.metadata["content_type"] == "text/html" and doc.metadata["crawl_date"].startswith("20")
    # Pages leave the reader as HTML: extraction happens in the crawl filter, after the URL filter.
    assert doc.text == "" and b"<div" in doc.body and doc.metadata["html_bytes"] == len(doc.body)
    assert entry["bytes_kept"] == sum(len(d.body) for d in docs)
    assert doc.id == document_id("s", doc.metadata["locator"])
    again, _ = read_all("web", "warc", corpus.root / "web/debian-handbook/debian-handbook.warc.gz")
    again_twice, _ = read_all("web", "warc", corpus.root / "web/debian-handbook/debian-handbook.warc.gz")
    assert [d.id for d in again] == [d.id for d in again_twice]  # stable ids
    assert len(warc.name) > 0


def test_text_reader_reads_plain_and_gzip_books(corpus):
    docs, entry = read_all("book", "text", corpus.root / "books/austen-persuasion.txt", "books/austen-persuasion.txt")
    assert entry["kept"] == 1 and "Anne Elliot" in docs[0].text
    assert docs[0].metadata["path"] == "books/austen-persuasion.txt" and docs[0].metadata["title"]
    docs, entry = read_all("book", "text", corpus.root / "books/devils-dictionary.txt.gz")
    assert entry["kept"] == 1 and "CYNIC" in docs[0].text.upper()


def test_text_reader_size_limit_and_encoding_policy(corpus, tmp_path):
    book = (corpus.root / "books/austen-persuasion.txt").read_bytes()
    big = tmp_path / "big.txt"
    big.write_bytes(book)
    _, entry = read_all("book", "text", big, max_document_mb=0.1)
    assert entry["dropped"] == {"too_large": 1}
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(book[:5000] + "café".encode("latin-1"))
    _, entry = read_all("book", "text", latin)
    assert entry["dropped"] == {"invalid_utf8": 1}
    docs, entry = read_all("book", "text", latin, encoding_errors="replace")
    assert entry["kept"] == 1 and docs[0].text.endswith("caf\ufffd")


def stdlib_files(corpus) -> list[Path]:
    return sorted(p for p in (corpus.root / "code").rglob("*") if p.is_file())


def test_code_reader_on_a_real_tree(corpus):
    files = stdlib_files(corpus)
    kept = []
    for path in files:
        rel = str(path.relative_to(corpus.root))
        docs, entry = read_all("code", "code", path, rel)
        kept += docs
    assert len(kept) == len([p for p in files if p.suffix == ".py"]) >= 5
    doc = next(d for d in kept if d.metadata["path"].endswith("json/decoder.py"))
    assert doc.metadata["language"] == "python" and doc.metadata["repository"] == "code"
    assert "def " in doc.text


@pytest.mark.parametrize("archive", ["repo.tar.gz", "repo.zip"])
def test_code_reader_on_archives(corpus, tmp_path, archive):
    files = stdlib_files(corpus)
    path = tmp_path / archive
    if archive.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zf:
            for f in files:
                zf.write(f, f"repo/{f.name}")
            zf.writestr("repo/node_modules/x/index.js", "module.exports = 1;\n")
            zf.writestr("repo/logo.png", b"\x89PNG\x00\x00")
    else:
        with tarfile.open(path, "w:gz") as tf:
            for f in files:
                tf.add(f, f"repo/{f.name}")
            data = b"\x7fELF\x00\x00\x00binary"
            info = tarfile.TarInfo("repo/tool.py")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    docs, entry = read_all("code", "code", path)
    assert len(docs) == len([f for f in files if f.suffix == ".py"])
    assert all(d.metadata["repository"] == "repo" for d in docs)
    assert all("!" in d.metadata["locator"] for d in docs)
    if archive.endswith(".zip"):
        assert entry["dropped"]["vendored"] == 1 and entry["dropped"]["not_code"] == 1
    else:
        assert entry["dropped"]["binary"] == 1


def test_code_path_rules():
    assert language_of("src/main.rs") == "rust" and language_of("Makefile") == "makefile"
    assert path_rejection("repo/node_modules/a/b.js") == "vendored"
    assert path_rejection("repo/api_pb2.py") == "generated_name"
    assert path_rejection("repo/photo.jpg") == "not_code"
    assert path_rejection("repo/src/app.py") is None


def test_truncated_code_archive_is_an_error_not_a_crash(corpus, tmp_path):
    path = tmp_path / "cut.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for f in stdlib_files(corpus):
            tf.add(f, f"repo/{f.name}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    docs, entry = read_all("code", "code", path)
    assert entry["errored"] in ({"truncated_gzip": 1}, {"truncated_archive": 1})
    assert len(docs) >= 1


def book_paragraphs(corpus, n: int = 30) -> list[str]:
    text = (corpus.root / "books/austen-northangerabbey.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200][:n]


def test_jsonl_reader_fields_ids_and_gzip(corpus, tmp_path):
    paras = book_paragraphs(corpus)
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for i, p in enumerate(paras):
            fh.write(json.dumps({"body": p, "uid": f"u{i}", "lang": "en", "tags": ["x"]}) + "\n")
    docs, entry = read_all("book", "jsonl", path, text_field="body", id_field="uid")
    assert [d.text for d in docs] == paras and entry["kept"] == len(paras)
    assert docs[3].id == document_id("s", "id:u3")
    assert docs[0].metadata["lang"] == "en" and "tags" not in docs[0].metadata  # nested values not copied


def test_parquet_reader(corpus, tmp_path):
    paras = book_paragraphs(corpus)
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": paras + [None, ""], "n": list(range(len(paras) + 2))}), path)
    docs, entry = read_all("book", "parquet", path)
    assert [d.text for d in docs] == paras
    assert entry["dropped"] == {"missing_text_field": 1, "empty_text": 1}
    _, entry = read_all("book", "parquet", path, text_field="content")
    assert entry["errored"] == {"missing_text_column": 1}


def test_document_parquet_round_trip(python_docs, tmp_path):
    docs, _ = python_docs
    count, nbytes = write_documents(tmp_path / "u.parquet", docs)
    back = list(read_documents(tmp_path / "u.parquet"))
    assert count == len(docs) == len(back) and nbytes == sum(len(d.text.encode()) for d in docs)
    assert [(d.id, d.text, d.metadata) for d in back] == [(d.id, d.text, d.metadata) for d in docs]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
