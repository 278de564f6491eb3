"""Poison records: repaired or booked and quarantined one by one; their unit always completes."""

from __future__ import annotations

import json

import pytest

from pipeline.document import clean_text, make_document, read_documents, write_documents
from pipeline.ledger import Ledger
from pipeline.stages import tokenize as tokenize_module


def test_lone_surrogates_are_repaired_and_pairs_joined():
    assert clean_text("plain") == ("plain", 0)
    assert clean_text("a\ud800b") == ("a\ufffdb", 1)
    assert clean_text("\ud83d\ude00")[0] == "\U0001F600"  # a pair split into two code points, joined
    doc = make_document("x\udfff", "s", "book", "loc\ud800", title="t\ud801")
    assert doc.text == "x\ufffd" and doc.metadata["locator"] == "loc\ufffd" and doc.metadata["title"] == "t\ufffd"
    assert doc.metadata["unicode_repaired"] == 3
    doc.text.encode("utf-8")


def test_an_unwritable_document_is_rejected_alone(tmp_path):
    good = [make_document(f"text {i}", "s", "book", str(i)) for i in range(600)]
    bad = make_document("fine", "s", "book", "bad")
    bad.text = "broken \ud800 after the reader"  # a stage that introduced one (the reader repairs its own)
    rejected = []
    count, _ = write_documents(tmp_path / "u.parquet", [*good[:300], bad, *good[300:]],
                               reject=lambda doc, exc: rejected.append((doc.id, type(exc).__name__)))
    assert count == 600 and rejected == [(bad.id, "UnicodeEncodeError")]
    assert [d.id for d in read_documents(tmp_path / "u.parquet")] == [d.id for d in good]
    with pytest.raises(UnicodeEncodeError):
        write_documents(tmp_path / "v.parquet", [bad])


def test_a_text_the_tokenizer_chokes_on_costs_only_itself():
    def encode(texts, add_special_tokens=False):
        if any("POISON" in t for t in texts):
            raise ValueError("tokenizer blew up")
        return [list(t) for t in texts]

    encodings, errors = tokenize_module._encode_isolating(encode, ["ab", "xPOISONx", "cd"])
    assert encodings == [["a", "b"], None, ["c", "d"]]
    assert errors[0] == errors[2] == "" and errors[1].startswith("ValueError")


def test_quarantine_file_lists_poison_records(tmp_path):
    from pipeline.stages.crawl_filter import CrawlFilterStage

    ledger = Ledger()
    ledger.poison("read", "s", "web", "corrupt_record:OSError", 10, doc_id="abc", locator="f.warc#3", error="boom")
    stage = CrawlFilterStage.__new__(CrawlFilterStage)
    from pipeline.sources.base import Unit

    unit = Unit("s-00000", "s", "web", ())
    assert stage.write_quarantine(tmp_path, unit, ledger) == 1
    entries = [json.loads(line) for line in stage.quarantine_path(tmp_path, unit).read_text().splitlines()]
    assert entries == [{"error": "boom", "id": "abc", "locator": "f.warc#3", "reason": "corrupt_record:OSError",
                        "source": "s", "stage": "read"}]
    assert ledger.stats(["read"])["stages"]["read"]["s"]["errored"] == {"corrupt_record:OSError": 1}
    assert stage.write_quarantine(tmp_path, unit, Ledger()) == 0 and not stage.quarantine_path(tmp_path, unit).exists()
