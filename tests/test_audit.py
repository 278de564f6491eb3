"""The audit trail's pieces: the sample of dropped documents and the per-domain counts (pipeline.audit,
pipeline.stages.domains). The whole trail in a real run is tested in tests/test_cleaning_e2e.py."""

from __future__ import annotations

import random
from collections import Counter

import pyarrow.parquet as pq

from pipeline.audit import DomainCounter, DropSampler, rank_of, registered_domain
from pipeline.stages.domains import reduce_domains


def _docs(n: int) -> list[tuple[str, str]]:
    return [(f"doc-{i}", f"text of document {i} " * (1 + i % 7)) for i in range(n)]


def test_sample_is_the_lowest_ranks_per_reason_whatever_the_order(tmp_path):
    docs = _docs(500)
    samples = []
    for seed in (0, 1):
        order = docs[:]
        random.Random(seed).shuffle(order)
        sampler = DropSampler(per_reason=5, max_chars=12)
        for doc_id, text in order:
            sampler.offer("short" if len(text) < 60 else "long", doc_id, "src", text, {"url": f"http://x/{doc_id}"})
        path = tmp_path / f"s{seed}.parquet"
        assert sampler.write(path)
        samples.append(pq.read_table(path).to_pylist())
    assert samples[0] == samples[1]                      # a pure function of the data, not of the order
    rows = samples[0]
    for reason in ("short", "long"):
        mine = [r for r in rows if r["reason"] == reason]
        expected = sorted((rank_of(d), d) for d, t in docs if (len(t) < 60) == (reason == "short"))[:5]
        assert [(r["rank"], r["id"]) for r in mine] == expected
        assert all(len(r["text"]) <= 12 and r["chars"] > 12 for r in mine)   # cut, full length kept


def test_sample_materialises_only_what_it_keeps(tmp_path):
    calls = Counter()

    def text_of(i):
        def make():
            calls["text"] += 1
            return f"document {i}"
        return make

    sampler = DropSampler(per_reason=3, max_chars=100)
    for i in range(2000):
        sampler.offer("r", f"id-{i}", "s", text_of(i))
    assert len(sampler.rows()) == 3
    assert calls["text"] < 60          # ~3 ln(2000/3) entries to a heap of 3, not 2000 strings


def test_empty_sample_writes_nothing_and_removes_a_stale_file(tmp_path):
    path = tmp_path / "d" / "u.parquet"
    full = DropSampler(2, 10)
    full.offer("r", "a", "s", "x")
    assert full.write(path) and path.exists()
    assert not DropSampler(2, 10).write(path) and not path.exists()
    off = DropSampler(0, 10)
    off.offer("r", "a", "s", "x")
    assert off.rows() == []


def test_registered_domains_offline():
    assert registered_domain("https://docs.python.org/3/library/os.html") == "python.org"
    assert registered_domain("http://news.bbc.co.uk/x") == "bbc.co.uk"       # a multi-label public suffix
    assert registered_domain("http://127.0.0.1:8000/page") == "127.0.0.1"
    assert registered_domain("") == ""


def test_domain_reduce_is_exact_for_any_partitioning(tmp_path):
    rng = random.Random(3)
    domains = [f"site{i}.com" for i in range(300)] + ["python.org", "debian.org"]
    truth: dict[tuple[str, str], Counter] = {}
    files = {1: [], 7: []}
    for unit in range(12):
        counter = DomainCounter()
        for _ in range(400):
            source = rng.choice(["web-a", "web-b"])
            domain = rng.choice(domains[:5]) if rng.random() < 0.3 else rng.choice(domains)
            outcome = rng.choice(["kept", "kept", "dropped", "errored"])
            counter.page(source, f"https://www.{domain}/p{rng.randrange(50)}", outcome)
            truth.setdefault((source, domain), Counter())[outcome] += 1
        for p in files:
            path = tmp_path / f"p{p}" / f"u{unit}.arrow"
            counter.write(path, p)
            files[p].append(str(path))
    top = 6
    results = {}
    for p, paths in files.items():
        merged: dict[str, dict] = {}
        for k in range(p):
            for source, entry in reduce_domains(k, paths, top)["sources"].items():
                m = merged.setdefault(source, {"distinct": 0, "kept": [], "dropped": []})
                m["distinct"] += entry["distinct"]
                m["kept"] += entry["top_kept"]
                m["dropped"] += entry["top_dropped"]
        results[p] = {s: (m["distinct"], sorted(m["kept"], key=lambda r: (-r[1], r[0]))[:top],
                          sorted(m["dropped"], key=lambda r: (-r[2], r[0]))[:top]) for s, m in merged.items()}
    assert results[1] == results[7]
    for source in ("web-a", "web-b"):
        rows = [[d, c["kept"], c["dropped"], c["errored"]] for (s, d), c in truth.items() if s == source]
        distinct, kept, dropped = results[7][source]
        assert distinct == len(rows)
        assert kept == sorted(rows, key=lambda r: (-r[1], r[0]))[:top]
        assert dropped == sorted(rows, key=lambda r: (-r[2], r[0]))[:top]
