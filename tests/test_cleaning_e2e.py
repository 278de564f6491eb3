"""Every cleaning step of issue 17 in one real run, through the CLI: real Python-docs pages crawled twice
into WARCs under their real host (re-crawls, PII and a listed word planted in some), real stdlib code (a
fake credential and an SPDX header planted), real books (real HumanEval / MMLU items planted), with URL
dedup, MinHash dedup, line dedup, decontamination, PII redaction, bad words, secrets, licences, the audit
trail and the per-domain statistics all on. Each step's own behaviour is tested in its module's tests;
this one checks that they compose in a run: the reasons in stats.json and in the printed summary, the
redactions visible in the shards, the chain of stages, ``inspect --dropped``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import real_data_unavailable, run_cli, write_warc

PAGES = 24
RECRAWLED = 4
EMAIL = "jane.maintainer@cs.example-university.edu"
PUBLIC_IP = "151.101.1.69"
FAKE_AWS = "AKIAQYLPMN5HHHFPZAM2"   # a made-up key id in the AWS format (not a real credential)


def _plant(html: bytes, paragraph: str) -> bytes:
    """A paragraph added to the page's main content."""
    text = html.decode("utf-8")
    cut = text.index("</h1>") + len("</h1>")          # right under the page's title: main content
    return (text[:cut] + f"<p>{paragraph}</p>" + text[cut:]).encode("utf-8")


def _bad_word() -> str:
    from pipeline.realdata import badwords_lists

    words = [w.strip() for w in (badwords_lists() / "en.txt").read_text().splitlines()]
    return next(w for w in words if re.fullmatch(r"[a-z]{5,}", w))


@pytest.fixture(scope="module")
def inputs(python_docs_html, corpus, tmp_path_factory):
    from pipeline.realdata import FetchError, build_eval_sets

    try:
        evals = build_eval_sets()
        bad = _bad_word()
    except FetchError as exc:
        real_data_unavailable(str(exc))
    root = tmp_path_factory.mktemp("cleaning")
    # prose pages (the tutorial, HOWTOs, FAQ), the ones the web filters keep most of
    pages = sorted(p for sub in ("tutorial", "howto", "faq") for p in (python_docs_html / sub).glob("*.html")
                   if p.stat().st_size > 20_000)[:PAGES]
    old, new = [], []
    for i, page in enumerate(pages):
        url = f"https://docs.python.org/3.11/{page.relative_to(python_docs_html)}"
        html = page.read_bytes()
        if i == 0:
            html = _plant(html, f"Questions about this page go to {EMAIL}; the mirror answers from {PUBLIC_IP}.")
        if i == len(pages) - 1:   # a tutorial page (one the other filters keep)
            html = _plant(html, f"This page was vandalised with the word {bad} in the middle of a sentence.")
        old.append((url, "2023-03-01T00:00:00Z", html))
        if 2 <= i < 2 + RECRAWLED:   # re-crawled a year later, with one paragraph more
            new.append((url, "2024-03-01T00:00:00Z", _plant(html, "Updated for the 2024 crawl of this page.")))
    (root / "web").mkdir()
    write_warc(root / "web" / "crawl-2023.warc.gz", old)
    write_warc(root / "web" / "crawl-2024.warc.gz", new)

    code = root / "code"
    shutil.copytree(corpus.root / "code", code)
    (code / "settings_prod.py").write_text(
        '"""Deployment settings of the upload service."""\n\nimport os\n\n'
        f'AWS_ACCESS_KEY_ID = "{FAKE_AWS}"\nREGION = os.environ.get("REGION", "eu-west-1")\n\n\n'
        "def bucket_for(name):\n    return f\"uploads-{name}-{REGION}\"\n")
    tagged = code / "cpython-stdlib" / "shlex.py"
    tagged.write_text("# SPDX-License-Identifier: Apache-2.0\n" + tagged.read_text())

    books = root / "books"
    books.mkdir()
    humaneval = [json.loads(line) for line in evals["humaneval"].read_text().splitlines()][:2]
    mmlu = json.loads(evals["mmlu_dev"].read_text().splitlines()[7])
    novels = sorted(p for p in (corpus.root / "books").iterdir() if p.suffix == ".txt")[:2]   # two Austen novels
    for novel, item in zip(novels, [humaneval[0]["prompt"] + humaneval[0]["canonical_solution"], mmlu["question"]]):
        paragraphs = novel.read_text().split("\n\n")
        half = len(paragraphs) // 2
        (books / f"planted-{novel.name}").write_text("\n\n".join(paragraphs[:half] + [item] + paragraphs[half:]))
    for other in (corpus.root / "books").iterdir():
        if other.suffix == ".gz":                     # The Devil's Dictionary: clean
            shutil.copy(other, books / other.name)

    config = {
        "run": {"unit_target_mb": 0.2, "num_cpus": 2},
        "sources": [{"name": "web", "kind": "web", "paths": [str(root / "web")]},
                    {"name": "stdlib", "kind": "code", "paths": [str(code)]},
                    {"name": "books", "kind": "book", "paths": [str(books)]}],
        # Python's docs hold code: relax the word-shape and bracket rules so most pages reach the new steps.
        # The pages' site chrome is kept (main_content: false), so that line dedup has real footers to remove.
        "crawl_filter": {"web": {"extraction": {"resiliparse": {"main_content": False}},
                                 "gopher_quality": {"params": {"max_non_alpha_words_ratio": 0.5}},
                                 "c4": {"params": {"filter_no_terminal_punct": False, "filter_curly_bracket": False}},
                                 "fineweb": {"params": {"char_duplicates_ratio": 0.5}}},
                         "pii": {"phones": True}},
        "decontamination": {"benchmarks": {
            "humaneval": {"paths": [str(evals["humaneval"])], "fields": ["prompt", "canonical_solution"]},
            "mmlu_dev": {"paths": [str(evals["mmlu_dev"])], "fields": ["question"]}}},
        "audit": {"dropped_per_reason": 4},
        "tokenize": {"train": {"vocab_size": 1024, "sample_mb": 1}, "shard_target_mb": 1},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, root, {"bad": bad, "humaneval_id": humaneval[0]["id"], "mmlu_id": mmlu["id"]}


@pytest.fixture(scope="module")
def run(inputs):
    config, root, planted = inputs
    out = root / "run"
    proc = run_cli("run", str(config), "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout + proc.stderr, json.loads((out / "stats.json").read_text()), planted


def _texts(run_dir: Path, stage: str) -> dict[str, dict]:
    rows = {}
    for path in sorted(p for p in (run_dir / "stages" / stage).glob("*.parquet") if p.is_file()):
        for r in pq.read_table(path, columns=["id", "source", "text", "metadata"]).to_pylist():
            rows[r["id"]] = {**r, "metadata": json.loads(r["metadata"])}
    return rows


def test_the_stages_chain_and_account_for_every_document(run):
    run_dir, output, stats, _ = run
    assert stats["invariant_ok"], stats["violations"]
    assert list(stats["stages"]) == ["read", "crawl_filter", "url_dedup", "dedup", "line_dedup", "decontaminate",
                                     "tokenize"]
    for stage in ("url_dedup", "line_dedup", "decontaminate"):
        assert stage in output                              # the printed summary's table has their rows


def test_recrawls_collapse_to_the_newest(run):
    run_dir, _, stats, _ = run
    assert stats["stages"]["url_dedup"]["web"]["dropped"] == {"url_duplicate": RECRAWLED}
    kept = _texts(run_dir, "url_dedup")
    assert sum("Updated for the 2024 crawl" in r["text"] for r in kept.values()) == RECRAWLED


def test_pii_is_redacted_in_the_shards_and_counted(run):
    run_dir, output, stats, _ = run
    texts = _texts(run_dir, "crawl_filter")
    page = next(r for r in texts.values() if "Questions about this page go to" in r["text"])
    assert EMAIL not in page["text"] and PUBLIC_IP not in page["text"]
    assert re.search(r"go to (email@example\.com|firstname\.lastname@example\.org)", page["text"])
    tallies = stats["stages"]["crawl_filter"]["web"]
    assert tallies["pii_replaced"]["email"] >= 1 and tallies["pii_replaced"]["ip"] >= 1
    proc = run_cli("inspect", str(run_dir), "--decode", "400", "--max-chars", "10000000", "--no-verify")
    assert proc.returncode == 0
    assert "Questions about this page go to" in proc.stdout and EMAIL not in proc.stdout


def test_bad_words_secrets_and_licences(run):
    run_dir, _, stats, planted = run
    web = stats["stages"]["crawl_filter"]["web"]["dropped"]
    assert web.get("badwords:document_removed_with_badwords", 0) >= 1      # the planted one (real pages have some)
    assert not any(planted["bad"] in r["text"] for r in _texts(run_dir, "crawl_filter").values())
    code = _texts(run_dir, "crawl_filter")
    settings = next(r for r in code.values() if "Deployment settings of the upload service" in r["text"])
    assert FAKE_AWS not in settings["text"] and "<SECRET>" in settings["text"]      # redacted (the default)
    tagged = next(r for r in code.values() if r["text"].startswith("# SPDX-License-Identifier: Apache-2.0"))
    assert "Apache-2.0" in tagged["metadata"]["licences"]


def test_boilerplate_lines_removed_from_every_page(run):
    run_dir, _, stats, _ = run
    before, after = _texts(run_dir, "dedup"), _texts(run_dir, "line_dedup")
    footers = {line for r in before.values() for line in r["text"].split("\n")
               if line.startswith("©") and "Python Software Foundation" in line}
    assert len(footers) == 1                           # Sphinx's copyright footer, on every page
    footer = footers.pop()
    had = [i for i, r in before.items() if r["source"] == "web" and footer in r["text"]]
    assert len(had) >= 3
    assert all(footer not in after[i]["text"] for i in had if i in after)
    assert stats["line_dedup"]["frequent_lines"] > 0


def test_contaminated_books_are_dropped_and_reported(run):
    run_dir, output, stats, planted = run
    dropped = stats["stages"]["decontaminate"]["books"]["dropped"]
    assert dropped == {"contaminated:humaneval": 1, "contaminated:mmlu_dev": 1}
    summary = stats["decontamination"]
    assert planted["humaneval_id"] in summary["benchmarks"]["humaneval"]["first_items_hit"]
    assert "contaminated:humaneval" in output
    proc = run_cli("inspect", str(run_dir), "--dropped", "contaminated:", "--decode", "5", "--max-chars", "10000000")
    assert proc.returncode == 0, proc.stderr
    # the sample keeps the book's first 20,000 characters; what matched is in its metadata
    assert "[decontaminate: contaminated:humaneval]" in proc.stdout and planted["humaneval_id"] in proc.stdout
    assert "[decontaminate: contaminated:mmlu_dev]" in proc.stdout and planted["mmlu_id"] in proc.stdout


def test_audit_trail_lists_reasons_and_domains(run):
    run_dir, output, stats, planted = run
    proc = run_cli("inspect", str(run_dir), "--dropped", "list")
    assert proc.returncode == 0
    for reason in ("url_duplicate", "badwords:document_removed_with_badwords", "contaminated:mmlu_dev"):
        assert reason in proc.stdout
    proc = run_cli("inspect", str(run_dir), "--dropped", "badwords:document_removed_with_badwords", "--decode", "10",
                   "--max-chars", "1000000")
    assert planted["bad"] in proc.stdout and "https://docs.python.org/3.11/" in proc.stdout
    domains = stats["domains"]["web"]
    assert domains["distinct_domains"] == 1
    assert domains["top_kept"][0][0] == "python.org"
    assert domains["top_kept"][0][1] + domains["top_kept"][0][2] + domains["top_kept"][0][3] == PAGES + RECRAWLED
    assert "domains: web: 1 distinct; most kept: python.org" in output
