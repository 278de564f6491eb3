from pipeline.ledger import Ledger


def test_invariant_holds_and_round_trips():
    ledger = Ledger()
    for _ in range(5):
        ledger.took("read", "s", "web", nbytes=10)
    ledger.kept("read", "s", "web", 3, 30)
    ledger.dropped("read", "s", "web", "not_html")
    ledger.errored("read", "s", "web", "corrupt")
    ledger.took("crawl_filter", "s", "web", 3)
    ledger.kept("crawl_filter", "s", "web", 2)
    ledger.dropped("crawl_filter", "s", "web", "language_id")
    ledger.add_seconds("read", "s", 1.5)
    merged = Ledger()
    merged.merge(Ledger.from_json(ledger.to_json()))
    stats = merged.stats(["read", "crawl_filter"])
    assert stats["invariant_ok"], stats["violations"]
    read = stats["stages"]["read"]["s"]
    assert (read["in"], read["kept"], read["dropped"], read["errored"]) == (5, 3, {"not_html": 1}, {"corrupt": 1})
    assert read["bytes_in"] == 50 and read["seconds"] == 1.5


def test_a_lost_document_is_a_violation():
    ledger = Ledger()
    ledger.took("read", "s", "book", 2)
    ledger.kept("read", "s", "book", 1)
    stats = ledger.stats(["read"])
    assert not stats["invariant_ok"]
    assert stats["violations"] == ["read/s: in=2 but kept+dropped+errored=1"]


def test_stages_must_chain():
    ledger = Ledger()
    ledger.took("read", "s", "book", 2)
    ledger.kept("read", "s", "book", 2)
    ledger.took("crawl_filter", "s", "book", 1)
    ledger.kept("crawl_filter", "s", "book", 1)
    stats = ledger.stats(["read", "crawl_filter"])
    assert stats["violations"] == ["read->crawl_filter/s: read kept 2 but crawl_filter took in 1"]
