from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, parse_config
from pipeline.sources import plan_units

ROOT = Path(__file__).resolve().parent.parent


def minimal(tmp_path: Path, **overrides) -> dict:
    (tmp_path / "books").mkdir(exist_ok=True)
    (tmp_path / "books" / "a.txt").write_text("a book\n")
    data = {"sources": [{"name": "b", "kind": "book", "paths": [str(tmp_path / "books")]}]}
    data.update(overrides)
    return data


def test_shipped_configs_validate(monkeypatch, tmp_path):
    monkeypatch.setenv("JAMBA_DEMO_DATA", str(tmp_path))
    monkeypatch.setenv("JAMBA_EVAL_DATA", str(tmp_path))
    for name in ("humaneval", "mmlu_dev", "gsm8k_fewshot"):      # the paths must exist (fetch-evals makes them)
        (tmp_path / f"{name}.jsonl").write_text("")
    demo = load_config(ROOT / "configs/pipeline/demo.yaml")
    assert set(demo.decontamination.benchmarks) == {"humaneval", "mmlu_dev", "gsm8k_fewshot"}
    assert {s.kind for s in demo.sources} == {"web", "book", "code"}
    assert all(s.paths[0].startswith(str(tmp_path)) for s in demo.sources)
    prod = load_config(ROOT / "configs/pipeline/web-books-code.yaml")
    assert prod.tokenize.train.vocab_size == 65536


def test_defaults_follow_the_kind(tmp_path):
    cfg = parse_config(minimal(tmp_path))
    assert cfg.sources[0].format == "text"
    assert cfg.crawl_filter.web.c4.params == {"filter_no_terminal_punct": False}
    web = cfg.crawl_filter.web
    assert web.extractor == "resiliparse" and web.extraction.resiliparse == {"main_content": True}  # DCLM's
    assert web.extraction.trafilatura == {"favour_precision": True} and 0 < web.extraction.timeout_s <= 10


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.update(bogus=1), "bogus: unknown key"),
        (lambda d: d["sources"][0].update(colour="red"), "sources[0].colour: unknown key"),
        (lambda d: d["sources"][0].update(kind="video"), "sources[0].kind: Input should be 'web', 'book' or 'code'"),
        (lambda d: d.update(tokenize={"shard_target_mb": "big"}), "tokenize.shard_target_mb:"),
        (lambda d: d["sources"][0].pop("paths"), "sources[0].paths: required key is missing"),
        (lambda d: d.update(crawl_filter={"web": {"gopher_quality": {"params": {"min_doc_wordz": 5}}}}),
         "crawl_filter.web.gopher_quality.params.min_doc_wordz: unknown parameter of GopherQualityFilter"),
        (lambda d: d["sources"].append(dict(d["sources"][0])), "duplicate source name 'b'"),
        (lambda d: d.update(crawl_filter={"web": {"extractor": "lynx"}}),
         "crawl_filter.web.extractor: Input should be 'resiliparse' or 'trafilatura'"),
        (lambda d: d.update(crawl_filter={"web": {"extraction": {"resiliparse": {"main_contents": True}}}}),
         "crawl_filter.web.extraction.resiliparse: Value error, unknown option 'main_contents' of extract_plain_text"),
        (lambda d: d.update(crawl_filter={"web": {"extraction": {"trafilatura": {"favor_precision": True}}}}),
         "crawl_filter.web.extraction.trafilatura.favor_precision: unknown parameter of Trafilatura"),
        (lambda d: d.update(crawl_filter={"web": {"extraction": {"timeout_s": -1}}}),
         "crawl_filter.web.extraction.timeout_s: Input should be greater than or equal to 0"),
    ],
)
def test_errors_are_one_line_and_name_the_key(tmp_path, mutate, expected):
    data = minimal(tmp_path)
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_config(data, "cfg.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cfg.yaml: ")
    assert expected in message


def test_missing_input_path_is_an_error_naming_the_key(tmp_path):
    data = minimal(tmp_path)
    data["sources"][0]["paths"].append(str(tmp_path / "nope"))
    cfg = parse_config(data)
    with pytest.raises(ConfigError, match=r"sources\[0\]\.paths\[1\]: no such file or directory: .*nope"):
        plan_units(cfg)


def test_optional_source_with_missing_input_is_skipped(tmp_path):
    data = minimal(tmp_path)
    data["sources"].append({"name": "gone", "kind": "web", "paths": [str(tmp_path / "x")], "optional": True})
    units = plan_units(parse_config(data))
    assert [u.source for u in units] == ["b"]


def test_unset_environment_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    data = minimal(tmp_path)
    data["sources"][0]["paths"] = ["${NOT_SET_ANYWHERE}/x"]
    with pytest.raises(ConfigError, match=r"sources\[0\]\.paths\[0\]: environment variable NOT_SET_ANYWHERE"):
        parse_config(data)


def test_invalid_yaml_reports_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sources:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line"):
        load_config(path)


def test_fingerprint_ignores_where_and_how_but_not_what(tmp_path):
    a = parse_config(minimal(tmp_path))
    b = parse_config({**minimal(tmp_path), "run": {"output": "/elsewhere", "num_cpus": 8}})
    c = parse_config({**minimal(tmp_path), "tokenize": {"shard_target_mb": 1}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_units_group_small_files_and_are_deterministic(tmp_path):
    books = tmp_path / "many"
    books.mkdir()
    for i in range(10):
        (books / f"{i:02d}.txt").write_bytes(b"x" * 300_000)
    data = {"run": {"unit_target_mb": 1}, "sources": [{"name": "m", "kind": "book", "paths": [str(books)]}]}
    units = plan_units(parse_config(data))
    assert [len(u.files) for u in units] == [3, 3, 3, 1]
    assert [f.rel for f in units[0].files] == ["many/00.txt", "many/01.txt", "many/02.txt"]
    assert units == plan_units(parse_config(yaml.safe_load(yaml.safe_dump(data))))
