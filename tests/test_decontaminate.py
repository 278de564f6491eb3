"""Decontamination on real data: HumanEval, MMLU dev questions and GSM8K exemplars (from the wheels that ship
them) planted into real documents (Austen's novels, Bierce's dictionary, CPython's standard library, the
Python docs' pages) must be found, attributed to the right items and dropped or cut out, while the real
documents around them are untouched."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import pytest
import yaml

from pipeline.audit import read_dropped
from pipeline.config import AuditConfig, DecontaminationConfig
from pipeline.decontaminate import (
    BenchmarkMatch,
    EvalIndex,
    bulk_words,
    cut_spans,
    decide,
    top_benchmark,
    word_lists,
    words,
)
from pipeline.document import make_document, read_documents, write_documents
from pipeline.ledger import Ledger
from pipeline.sources.base import Unit
from pipeline.stages.base import MapStage
from pipeline.stages.decontaminate import STAGE, DecontaminateStage, decontamination_summary
from tests.conftest import real_data_unavailable, run_cli

pytestmark = pytest.mark.realdata

AUDIT = AuditConfig(dropped_per_reason=8, dropped_max_chars=1_000_000)


class LineDedupOutput(MapStage):
    """Stands for the stage before decontamination: its Parquet output is what the test writes."""

    name = "line_dedup"

    def run_unit(self, unit, run_dir):  # pragma: no cover - never run
        raise NotImplementedError


@pytest.fixture(scope="module")
def eval_sets() -> dict[str, Path]:
    from pipeline.realdata import FetchError, build_eval_sets

    try:
        return build_eval_sets()
    except FetchError as exc:
        real_data_unavailable(str(exc))


@pytest.fixture(scope="module")
def items(eval_sets) -> dict[str, dict[str, dict]]:
    out = {}
    for name, path in eval_sets.items():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        out[name] = {rec["id"]: rec for rec in records}
    return out


def config(eval_sets, **overrides) -> DecontaminationConfig:
    from pipeline.realdata import EVAL_SETS

    benchmarks = {name: {"paths": [str(path)], "fields": EVAL_SETS[name][1]} for name, path in eval_sets.items()}
    return DecontaminationConfig.model_validate({"benchmarks": benchmarks, **overrides})


@pytest.fixture(scope="module")
def index(eval_sets) -> EvalIndex:
    return EvalIndex.build(config(eval_sets))


@pytest.fixture(scope="module")
def real_texts(corpus, python_docs_html) -> dict[str, list[tuple[str, str]]]:
    """kind -> (locator, text): every chapter of the test corpus' novels, Bierce's dictionary in pieces,
    every standard-library file of the corpus and the text of 80 pages of the Python docs."""
    from pipeline.extract import ExtractSettings
    from pipeline.extract.html import HtmlToText

    books = []
    for path in corpus.books:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        if path.name.startswith("austen"):
            parts = re.split(r"\n(?=Chapter \d+\n)", text)
        else:
            paras = text.split("\n\n")
            parts = ["\n\n".join(paras[k:k + 60]) for k in range(0, len(paras), 60)]
        books += [(f"{path.name}#{k}", part) for k, part in enumerate(parts) if len(part.split()) > 300]
    code = [(str(p.relative_to(corpus.code[0])), p.read_text()) for p in sorted(corpus.code[0].rglob("*.py"))]
    extract = HtmlToText(ExtractSettings())
    pages = sorted(python_docs_html.rglob("*.html"))
    web = []
    for page in pages[:: max(1, len(pages) // 80)]:
        result = extract(page.read_bytes(), None)
        if len(result.text.split()) > 300:
            web.append((str(page.relative_to(python_docs_html)), result.text))
    assert len(books) > 40 and len(code) >= 8 and len(web) > 40
    return {"book": books, "code": code, "web": web}


def indexed_text(items, name: str, item_id: str) -> str:
    """An item's text as the index reads it: its configured fields joined by a newline."""
    from pipeline.realdata import EVAL_SETS

    return "\n".join(items[name][item_id][f] for f in EVAL_SETS[name][1])


def humaneval_text(items, task_id: str) -> str:
    item = items["humaneval"][task_id]
    return item["prompt"] + item["canonical_solution"]


def mmlu_text(items, item_id: str) -> str:
    item = items["mmlu_dev"][item_id]
    return f"Q: {item['question']}\nA: {item['answer']}"


def gsm8k_text(items, item_id: str) -> str:
    item = items["gsm8k_fewshot"][item_id]
    return f"{item['question']}\n{item['answer']}"


def plant(text: str, inserted: str) -> str:
    """``inserted`` as a paragraph of its own half way through ``text``."""
    at = text.find("\n\n", len(text) // 2)
    at = at if at > 0 else len(text) // 2
    return f"{text[:at]}\n\n{inserted}\n\n{text[at:]}"


def paraphrase(text: str) -> str:
    """Changed case, whitespace and punctuation; the same words."""
    out = text.upper().replace("\n", " \t\n  ").replace(". ", "! ").replace(",", " ;").replace("(", "[ ")
    return out.replace(")", "] ").replace("'", "`")


def write_unit(run_dir: Path, source: str, kind: str, docs: list[tuple[str, str]]) -> Unit:
    unit = Unit(id=f"{source}-00000", source=source, kind=kind)
    path = LineDedupOutput().output_path(run_dir, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_documents(path, [make_document(text, source, kind, locator) for locator, text in docs])
    return unit


def doc_id(source: str, locator: str) -> str:
    return make_document("", source, "book", locator).id


def contamination_tallies(result: dict) -> dict[str, int]:
    ledger = Ledger.from_json(result["ledger"])
    return {key: int(v) for (stage, _, group, key), v in ledger.tallies.items()
            if stage == STAGE and group == "contamination"}


# ------------------------------------------------------------------------------------------ the data
def test_eval_sets_are_the_real_benchmarks(items, index):
    assert list(items["humaneval"]) == [f"HumanEval/{k}" for k in range(164)]
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in \
        items["humaneval"]["HumanEval/0"]["prompt"]
    subjects = {item["subject"] for item in items["mmlu_dev"].values()}
    assert len(subjects) == 57 and len(items["mmlu_dev"]) == 282   # 54 subjects x 5 questions, 3 x 4
    assert all(item["answer"].startswith("Let's think step by step.") for item in items["mmlu_dev"].values())
    assert items["gsm8k_fewshot"]["gsm8k-cot/0"]["question"].startswith("There are 15 trees in the grove.")
    assert len(items["gsm8k_fewshot"]) == 8
    described = index.describe()
    for name, bench in described.items():
        assert bench["items_indexed"] == bench["items"] == len(items[name]), name
        assert bench["ngrams"] > 0
    assert described["humaneval"]["ngrams"] > 10_000 and described["mmlu_dev"]["ngrams"] > 25_000


def test_items_shorter_than_n_are_skipped_and_counted(eval_sets, items):
    from datatrove.utils.text import simplify_text

    n = 64
    index = EvalIndex.build(config(eval_sets, ngram=n))
    for name, bench in index.describe().items():
        short = sum(len(simplify_text(indexed_text(items, name, item_id)).split()) < n for item_id in items[name])
        assert bench["items_short"] == short, name
        assert bench["items_indexed"] + bench["items_short"] + bench["items_uninformative"] == bench["items"]
    assert index.describe()["gsm8k_fewshot"]["items_short"] > 0
    # a skipped item is not found even whole; an indexed one is
    gsm8k = index.benchmarks["gsm8k_fewshot"]
    for item_id in items["gsm8k_fewshot"]:
        found = index.match(gsm8k_text(items, item_id))
        long_enough = len(words(gsm8k_text(items, item_id))) >= n
        assert (item_id in found.get("gsm8k_fewshot", BenchmarkMatch(0, [], [])).items) == long_enough
    assert gsm8k.items_short == sum(len(words(gsm8k_text(items, i))) < n for i in items["gsm8k_fewshot"])


def test_words_are_datatrove_normalised_words(real_texts, items):
    """Our words equal datatrove's ``simplify_text(text).split()`` on real prose, code and web text, token by
    token (with offsets) as well as in bulk."""
    from datatrove.utils.text import simplify_text

    samples = real_texts["book"] + real_texts["code"] + real_texts["web"]
    samples += [("he", humaneval_text(items, "HumanEval/0")), ("mmlu", mmlu_text(items, "mmlu/formal_logic/0"))]
    references = [simplify_text(text).split() for _, text in samples]
    for (locator, text), reference in zip(samples, references):
        assert bulk_words(text) == reference, locator      # alone: the text ends Arrow's buffer
    for (locator, text), reference in list(zip(samples, references))[::7]:
        assert words(text) == reference, locator
    assert word_lists([text for _, text in samples]) == references
    assert words("Caf\u00e9's 3.14, 1,234,567 don't V1.2.3 e\u0301 \u0301") == \
        ["cafe", "s", "0", "0", "0", "don", "t", "v0", "0", "e"]


def test_ties_go_to_the_first_name():
    def m(k: int) -> BenchmarkMatch:
        return BenchmarkMatch(ngrams=k, items=[], spans=[])

    assert top_benchmark({"b": m(5), "a": m(5), "c": m(4)}) == "a"
    assert top_benchmark({"b": m(5), "a": m(5), "c": m(7)}) == "c"


# ------------------------------------------------------------------------------------ the index alone
def test_no_false_positives_on_the_real_corpus(index, real_texts):
    """Number lists ("0 0 0 ...") in HumanEval's docstrings matched the docs' examples before uninformative
    n-grams were left out of the index; none of these real documents shares an n-gram with the benchmarks."""
    for kind, texts in real_texts.items():
        for locator, text in texts:
            assert index.match(text) == {}, (kind, locator)
    assert index.benchmarks["humaneval"].ngrams_uninformative > 1000      # what those were
    assert index.benchmarks["mmlu_dev"].ngrams_shared > 100                # its template's n-grams


def test_texts_shorter_than_n_and_boundaries(index, items):
    text = humaneval_text(items, "HumanEval/12")
    item_words = text.split()
    assert index.match("") == {}
    assert index.match(" ".join(item_words[:3])) == {}
    # 13 words of the item (in its words) is the shortest match; 12 never is
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    cut12 = text[: next(e for s, e in spans if len(words(text[:e])) == 12)]
    cut13 = text[: next(e for s, e in spans if len(words(text[:e])) == 13)]
    assert len(words(cut12)) == 12 and index.match(cut12) == {}
    found = index.match(cut13)
    assert list(found) == ["humaneval"] and found["humaneval"].ngrams == 1
    assert found["humaneval"].items == ["HumanEval/12"] and found["humaneval"].spans == [(0, len(cut13))]


def test_a_batch_matches_as_its_documents_alone(index, items, real_texts):
    """No n-gram across two documents of a batch: an item cut in two (7 + 7 of its words) at a document
    boundary is found in neither; each whole document of the batch gets exactly what it gets alone."""
    item_words = humaneval_text(items, "HumanEval/7").split()
    head = real_texts["book"][2][1] + "\n" + " ".join(item_words[:7])
    tail = " ".join(item_words[7:14]) + "\n" + real_texts["book"][4][1]
    batch = [real_texts["web"][0][1], head, tail, plant(real_texts["code"][1][1], humaneval_text(items, "HumanEval/7")),
             "", real_texts["web"][2][1], mmlu_text(items, "mmlu/virology/1")]
    assert index.match(head + " " + tail)["humaneval"].items == ["HumanEval/7"]   # together they match
    found = index.match_batch(batch)
    assert found == [index.match(text) for text in batch]
    assert [sorted(f) for f in found] == [[], [], [], ["humaneval"], [], [], ["mmlu_dev"]]


def test_a_paraphrase_is_still_found(index, items, real_texts):
    item_id = "mmlu/college_computer_science/1"
    changed = paraphrase(mmlu_text(items, item_id))
    assert changed != mmlu_text(items, item_id) and changed.lower() != mmlu_text(items, item_id).lower()
    doc = plant(real_texts["web"][3][1], changed)
    found = index.match(doc)
    assert list(found) == ["mmlu_dev"] and found["mmlu_dev"].items == [item_id]
    assert found["mmlu_dev"].ngrams == index.match(mmlu_text(items, item_id))["mmlu_dev"].ngrams > 50
    (start, end), = found["mmlu_dev"].spans
    assert doc[start:end].strip() in changed and len(doc[start:end]) > 0.9 * len(changed.strip())


# ------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def planted(items, real_texts) -> dict[str, dict]:
    """Per source: the documents of its unit, the planted ones among them with the reason and items each
    must come out with."""
    books, code, web = real_texts["book"], real_texts["code"], real_texts["web"]
    heapq_py = next(text for loc, text in code if loc.endswith("heapq.py"))
    answer = items["mmlu_dev"]["mmlu/astronomy/2"]["answer"].split()
    mixed = humaneval_text(items, "HumanEval/5") + "\n\n" + " ".join(answer[len(answer) // 2:][:24])
    gsm8k_words = gsm8k_text(items, "gsm8k-cot/4").split()
    return {
        "books": {"kind": "book", "clean": books[:30], "planted": {
            "chapter-he0": (plant(books[3][1], humaneval_text(items, "HumanEval/0")), "humaneval",
                               {"humaneval": ["HumanEval/0"]}),
            "chapter-gsm": (plant(books[40][1], gsm8k_text(items, "gsm8k-cot/3")), "gsm8k_fewshot",
                               {"gsm8k_fewshot": ["gsm8k-cot/3"]}),
            "mixed": (plant(books[7][1], mixed), "humaneval",
                      {"humaneval": ["HumanEval/5"], "mmlu_dev": ["mmlu/astronomy/2"]}),
        }, "short": [("short-12", " ".join(gsm8k_words[:12])), ("empty", "")]},
        "stdlib": {"kind": "code", "clean": code, "planted": {
            "heapq+he": (heapq_py + "\n\n" + humaneval_text(items, "HumanEval/17") + "\n\n"
                         + humaneval_text(items, "HumanEval/42"), "humaneval",
                         {"humaneval": ["HumanEval/17", "HumanEval/42"]}),
        }, "short": []},
        "python-docs": {"kind": "web", "clean": web[:30], "planted": {
            "page-mmlu": (plant(web[5][1], mmlu_text(items, "mmlu/high_school_mathematics/2")), "mmlu_dev",
                          {"mmlu_dev": ["mmlu/high_school_mathematics/2"]}),
            "page-paraphrase": (plant(web[9][1], paraphrase(mmlu_text(items, "mmlu/college_computer_science/1"))),
                                "mmlu_dev", {"mmlu_dev": ["mmlu/college_computer_science/1"]}),
        }, "short": []},
    }


def run_units(stage: DecontaminateStage, run_dir: Path, planted: dict) -> dict[str, dict]:
    results = {}
    for source, spec in planted.items():
        docs = spec["clean"] + [(loc, text) for loc, (text, _, _) in spec["planted"].items()] + spec["short"]
        unit = write_unit(run_dir, source, spec["kind"], docs)
        results[source] = stage.run_unit(unit, run_dir)
        results[source]["_unit"] = unit
    return results


def test_planted_items_are_dropped_and_nothing_else(eval_sets, index, planted, tmp_path):
    cfg = config(eval_sets)
    stage = DecontaminateStage(cfg, AUDIT, LineDedupOutput(), index=index)
    results = run_units(stage, tmp_path, planted)
    expected_hits: dict[str, list[str]] = {name: [] for name in index.benchmarks}
    for source, spec in planted.items():
        result = results[source]
        out = {doc.id: doc.text for doc in read_documents(stage.output_path(tmp_path, result["_unit"]))}
        kept = spec["clean"] + spec["short"]
        assert out == {doc_id(source, loc): text for loc, text in kept}, source   # untouched, all of them
        assert result["documents"] == len(kept)
        stats = Ledger.from_json(result["ledger"]).stats([STAGE])
        assert stats["invariant_ok"], stats["violations"]
        entry = stats["stages"][STAGE][source]
        assert entry["in"] == len(kept) + len(spec["planted"]) and entry["kept"] == len(kept)
        reasons: dict[str, int] = {}
        for _, reason, _ in spec["planted"].values():
            reasons[f"contaminated:{reason}"] = reasons.get(f"contaminated:{reason}", 0) + 1
        assert entry["dropped"] == reasons
        unit_hits: dict[str, set[str]] = {name: set() for name in index.benchmarks}
        for _, _, hits in spec["planted"].values():
            for name, ids in hits.items():
                unit_hits[name].update(ids)
        assert {name: set(ids) for name, ids in result["items_hit"].items()} == unit_hits, source
        tallies = contamination_tallies(result)
        for name, ids in unit_hits.items():
            docs_with = sum(name in hits for _, _, hits in spec["planted"].values())
            assert tallies.get(f"{name}:documents", 0) == docs_with == result["contamination"][name]["documents"]
            assert (tallies.get(f"{name}:ngrams", 0) > 0) == bool(docs_with)
            expected_hits[name] += sorted(ids)
        # the audit sample: every dropped document, with its text and what it matched
        dropped = {row["id"]: row for row in read_dropped(tmp_path, "contaminated:", STAGE)
                   if row["source"] == source}
        assert set(dropped) == {doc_id(source, loc) for loc in spec["planted"]}
        for loc, (text, reason, hits) in spec["planted"].items():
            row = dropped[doc_id(source, loc)]
            assert row["reason"] == f"contaminated:{reason}" and row["text"] == text
            meta = json.loads(row["metadata"])
            assert meta["locator"] == loc
            assert {name: m["items"] for name, m in meta["contamination"]["benchmarks"].items()} == hits

    summary = decontamination_summary(cfg, index, [r for r in results.values()])
    he = summary["benchmarks"]["humaneval"]
    assert he["first_items_hit"] == ["HumanEval/0", "HumanEval/5", "HumanEval/17", "HumanEval/42"]
    assert he["items_hit"] == 4 and he["fraction_hit"] == round(4 / 164, 6) and he["items"] == 164
    assert he["documents_matched"] == 3 and he["dropped"] == 3 and he["spans_removed"] == 0
    mmlu = summary["benchmarks"]["mmlu_dev"]
    assert mmlu["documents_matched"] == 3 and mmlu["dropped"] == 2 and mmlu["items_hit"] == 3
    assert summary["benchmarks"]["gsm8k_fewshot"]["first_items_hit"] == ["gsm8k-cot/3"]
    assert summary["benchmarks"]["gsm8k_fewshot"]["ngrams_indexed"] == index.describe()["gsm8k_fewshot"]["ngrams"]
    json.dumps(summary)   # stats.json material


def test_remove_spans_cuts_the_item_and_keeps_the_text_around_it(eval_sets, index, items, real_texts, tmp_path):
    cfg = config(eval_sets, mode="remove_spans", span_margin_chars=200, min_words_left=50)
    stage = DecontaminateStage(cfg, AUDIT, LineDedupOutput(), index=index)
    chapter = real_texts["book"][12][1]
    at = chapter.find("\n\n", len(chapter) // 2)
    before, after = chapter[:at], chapter[at:]
    item = humaneval_text(items, "HumanEval/0")
    long_doc = f"{before}\n\n{item}\n\n{after}"
    few_words = " ".join(real_texts["book"][13][1].split()[:40])
    mostly_item = f"{few_words}\n\n{humaneval_text(items, 'HumanEval/3')}"
    heapq_py = next(text for loc, text in real_texts["code"] if loc.endswith("heapq.py"))
    two_items = (humaneval_text(items, "HumanEval/17") + "\n\n" + heapq_py + "\n\n"
                 + humaneval_text(items, "HumanEval/42"))
    docs = [("long", long_doc), ("mostly-item", mostly_item), ("two-items", two_items)] + real_texts["book"][20:25]
    unit = write_unit(tmp_path, "books", "book", docs)
    result = stage.run_unit(unit, tmp_path)

    out = {doc.id: doc for doc in read_documents(stage.output_path(tmp_path, unit))}
    assert doc_id("books", "mostly-item") not in out   # 40 words left < 50: dropped
    entry = Ledger.from_json(result["ledger"]).stats([STAGE])["stages"][STAGE]["books"]
    assert entry["dropped"] == {"contaminated:humaneval": 1} and entry["kept"] == len(docs) - 1
    for loc, text in real_texts["book"][20:25]:
        assert out[doc_id("books", loc)].text == text

    kept = out[doc_id("books", "long")]
    assert index.match(kept.text) == {}
    assert "has_close_elements" not in kept.text
    slack = 200 + 40   # the margin, then out to the end of a word
    assert kept.text.startswith(before[: len(before) - slack]) and kept.text.endswith(after[slack:])
    assert len(before) + len(after) - 2 * slack <= len(kept.text) < len(before) + len(after)
    # the cut is at whitespace on both sides: no word of the chapter is cut in two
    found = index.match(long_doc)["humaneval"]
    (lo, hi), = cut_spans(long_doc, found.spans, 200)[1]
    assert lo == 0 or long_doc[lo - 1].isspace() or long_doc[lo].isspace()
    assert hi == len(long_doc) or long_doc[hi - 1].isspace() or long_doc[hi].isspace()
    assert found.spans[0][0] - lo >= 200 and hi - found.spans[-1][1] >= 200
    assert lo <= long_doc.index(item) and hi >= long_doc.index(item) + len(item.rstrip())
    meta = kept.metadata["decontaminated"]
    assert meta["benchmarks"]["humaneval"]["items"] == ["HumanEval/0"] and meta["cuts"] == 1
    assert meta["chars_removed"] == len(long_doc) - len(kept.text)

    code = out[doc_id("books", "two-items")]
    assert index.match(code.text) == {} and "def heappush(heap, item):" in code.text
    assert code.metadata["decontaminated"]["cuts"] == 2
    tallies = contamination_tallies(result)
    assert tallies["humaneval:spans_removed"] == 3 == result["contamination"]["humaneval"]["spans_removed"]
    assert tallies["humaneval:documents"] == 3 and result["contamination"]["humaneval"]["dropped"] == 1
    assert result["items_hit"]["humaneval"] == ["HumanEval/0", "HumanEval/3", "HumanEval/17", "HumanEval/42"]
    sample = list(read_dropped(tmp_path, "contaminated:humaneval"))
    assert [row["text"] for row in sample] == [mostly_item]


def test_kinds_not_configured_pass_unchanged(eval_sets, index, items, real_texts, tmp_path):
    cfg = config(eval_sets, kinds=["web", "book"])
    stage = DecontaminateStage(cfg, AUDIT, LineDedupOutput(), index=index)
    text = real_texts["code"][0][1] + "\n\n" + humaneval_text(items, "HumanEval/1")
    unit = write_unit(tmp_path, "stdlib", "code", [("with-item", text)])
    result = stage.run_unit(unit, tmp_path)
    assert [d.text for d in read_documents(stage.output_path(tmp_path, unit))] == [text]
    assert result["items_hit"] == {name: [] for name in index.benchmarks}
    assert not stage.dropped_path(tmp_path, unit).exists()


def test_the_stage_pickles_small_and_builds_nothing_per_unit(eval_sets, items, real_texts, tmp_path, monkeypatch):
    stage = DecontaminateStage(config(eval_sets), AUDIT, LineDedupOutput())
    blob = pickle.dumps(stage)
    assert len(blob) < 4 * 2**20
    copy = pickle.loads(blob)

    def no_build(*_a, **_k):
        raise AssertionError("the index is built once, on the driver")

    monkeypatch.setattr(EvalIndex, "build", no_build)
    text = plant(real_texts["web"][0][1], gsm8k_text(items, "gsm8k-cot/0"))
    unit = write_unit(tmp_path, "python-docs", "web", [("page", text), real_texts["web"][1]])
    result = copy.run_unit(unit, tmp_path)
    assert result["items_hit"]["gsm8k_fewshot"] == ["gsm8k-cot/0"] and result["documents"] == 1
    assert decide(copy.index, copy.cfg, text).reason == "contaminated:gsm8k_fewshot"


def test_fetch_evals_prints_a_config_that_validates(eval_sets):
    proc = run_cli("fetch-evals", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name, path in eval_sets.items():
        assert f"{name}: {path}" in proc.stdout
    snippet = yaml.safe_load(proc.stdout.split("# for the pipeline config:", 1)[1])
    cfg = DecontaminationConfig.model_validate(snippet["decontamination"])
    assert set(cfg.benchmarks) == set(eval_sets)
    assert cfg.benchmarks["humaneval"].fields == ["prompt", "canonical_solution"]


def test_a_poison_document_is_quarantined_and_a_failed_batch_is_matched_alone(eval_sets, index, items, real_texts,
                                                                              tmp_path, monkeypatch):
    """One document whose decision raises is errored and quarantined, not the unit; a batch the index cannot
    match as one is matched document by document, so a planted item in it is still found and dropped."""
    import pipeline.stages.decontaminate as stage_module

    stage = DecontaminateStage(config(eval_sets), AUDIT, LineDedupOutput(), index=index)
    poison = real_texts["book"][2][1] + "\n\nthe poison document"
    planted = plant(real_texts["book"][4][1], humaneval_text(items, "HumanEval/2"))
    clean = real_texts["book"][5:9]
    docs = [("poison", poison), ("planted", planted), *clean]
    real_decide = stage_module.decide

    def decide_or_raise(index_, cfg, text, found=None):
        if text.endswith("the poison document"):
            raise UnicodeError("a document the matcher cannot read")
        return real_decide(index_, cfg, text, found)

    real_match_batch = EvalIndex.match_batch
    batches: list[int] = []

    def batch_fails(self, texts):
        batches.append(len(texts))
        if len(texts) > 1:
            raise MemoryError("the batch's texts do not fit")
        return real_match_batch(self, texts)

    monkeypatch.setattr(stage_module, "decide", decide_or_raise)
    monkeypatch.setattr(EvalIndex, "match_batch", batch_fails)
    unit = write_unit(tmp_path, "books", "book", docs)
    result = stage.run_unit(unit, tmp_path)

    out = {doc.id: doc.text for doc in read_documents(stage.output_path(tmp_path, unit))}
    assert out == {doc_id("books", loc): text for loc, text in clean}
    stats = Ledger.from_json(result["ledger"]).stats([STAGE])
    assert stats["invariant_ok"], stats["violations"]
    entry = stats["stages"][STAGE]["books"]
    assert entry["in"] == len(docs) and entry["kept"] == len(clean)
    assert entry["errored"] == {"decontaminate:UnicodeError": 1}
    assert entry["dropped"] == {"contaminated:humaneval": 1}
    assert result["items_hit"]["humaneval"] == ["HumanEval/2"]
    quarantined = [json.loads(line) for line in stage.quarantine_path(tmp_path, unit).read_text().splitlines()]
    assert [(q["id"], q["locator"], q["stage"]) for q in quarantined] == [(doc_id("books", "poison"), "poison", STAGE)]
    assert "a document the matcher cannot read" in quarantined[0]["error"]
    assert batches[0] == len(docs) and batches[1:] == [1] * (len(docs) - 1)   # then one by one, the poison skipped
