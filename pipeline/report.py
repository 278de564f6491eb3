"""Human-readable summaries of a run: the end-of-run table and ``inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.shards import Manifest


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_num(r[i]) for r in cells[1:]) and bool(rows) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), rule, *(fmt(r) for r in cells[1:])])


def _is_num(text: str) -> bool:
    return text.replace(",", "").replace(".", "").isdigit()


def _top(reasons: dict[str, int], n: int = 3) -> str:
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    more = len(reasons) - len(top)
    return ", ".join(f"{r} {c:,}" for r, c in top) + (f", +{more} more" if more > 0 else "")


def stats_table(stats: dict[str, Any]) -> str:
    rows = []
    for stage, sources in stats["stages"].items():
        for source, e in sources.items():
            dropped, errored = sum(e["dropped"].values()), sum(e["errored"].values())
            reasons = _top({**e["dropped"], **{f"ERR {k}": v for k, v in e["errored"].items()}})
            rows.append([stage, source, e["kind"], f"{e['in']:,}", f"{e['kept']:,}", f"{dropped:,}",
                         f"{errored:,}", f"{e['bytes_kept'] / 1e6:.1f}", f"{e['seconds']:.1f}", reasons])
    return _table(["stage", "source", "kind", "in", "kept", "dropped", "errored", "MB kept", "sec", "top reasons"],
                  rows)


def manifest_table(manifest: Manifest) -> str:
    rows = [[src, t["kind"], f"{t['rows']:,}", f"{t['tokens']:,}"] for src, t in manifest.totals.items()]
    rows.append(["total", "", f"{manifest.total_rows:,}", f"{manifest.total_tokens:,}"])
    return _table(["source", "kind", "documents", "tokens"], rows)


def run_summary(run_dir: Path, stats: dict[str, Any], manifest: Manifest, seconds: float | None = None) -> str:
    tok = manifest.tokenizer
    lines = [stats_table(stats), "", manifest_table(manifest), ""]
    for source, q in stats.get("quality", {}).get("sources", {}).items():
        policy = q["policy"]
        mode = policy["mode"]
        rule = (f"top {policy['keep_percent']:g}%" if mode == "percentile" else
                f"score >= {policy['min_score']:g}" if mode == "threshold" else
                f"Pareto alpha {policy['alpha']:g} seed {policy['seed']}" if mode == "pareto" else mode)
        threshold = f", threshold {q['threshold']:.4f}" if q.get("threshold") is not None else ""
        mean = f", mean score {q['mean_score']:.3f}" if q.get("mean_score") is not None else ""
        kept = f", kept {q['kept_fraction']:.1%}" if q.get("kept_fraction") is not None else ""
        lines.append(f"quality: {source}: {rule}{threshold}{mean}{kept}")
    lines += cleaning_lines(stats)
    lines += domain_lines(stats)
    lines.append(f"accounting: {'OK (in = kept + dropped + errored at every stage)' if stats['invariant_ok'] else 'VIOLATED'}")
    lines.append(f"tokenizer: {tok['path']} (vocab {tok['vocab_size']:,}, eos {tok['eos_token']!r}={tok['eos_id']}, "
                 f"fingerprint {tok['fingerprint']})")
    lines.append(f"shards: {len(manifest.shards)} file(s), {sum(s.bytes for s in manifest.shards) / 1e6:.1f} MB in "
                 f"{run_dir / 'shards'}")
    lines.append(f"manifest: {run_dir / 'manifest.json'}   stats: {run_dir / 'stats.json'}")
    if seconds is not None:
        lines.append(f"wall time: {seconds:.1f}s")
    return "\n".join(lines)


def domain_lines(stats: dict[str, Any], n: int = 5) -> list[str]:
    """Per web source: distinct domains, the top ``n`` by kept and by dropped pages."""
    lines = []
    for source, entry in stats.get("domains", {}).items():
        kept = ", ".join(f"{d} {k:,}" for d, k, *_ in entry["top_kept"][:n]) or "none"
        dropped = ", ".join(f"{d} {x:,}" for d, _, x, _ in entry["top_dropped"][:n]) or "none"
        lines.append(f"domains: {source}: {entry['distinct_domains']:,} distinct; most kept: {kept}; "
                     f"most dropped: {dropped}")
    return lines


def cleaning_lines(stats: dict[str, Any]) -> list[str]:
    """One line per cleaning step that ran: what it found, summed over sources."""
    lines = []
    stages = stats.get("stages", {})
    pii: dict[str, int] = {}
    for entry in stages.get("crawl_filter", {}).values():
        for kind, n in entry.get("pii_replaced", {}).items():
            pii[kind] = pii.get(kind, 0) + n
    if pii:
        lines.append("pii: replaced " + ", ".join(f"{n:,} {kind}" for kind, n in sorted(pii.items())))
    url = stats.get("url_dedup")
    if url:
        lines.append(f"url_dedup: {url['urls']:,} URLs, {url['duplicate_groups']:,} re-crawled, {url['removed']:,} "
                     f"removed (keep {url['params']['keep']}; {url['removed_index']:,} against "
                     f"{url['index_runs']} index run(s)), {url['without_url']:,} without URL")
    line = stats.get("line_dedup")
    if line:
        edited = sum(e.get("line_dedup", {}).get("documents_edited", 0) for e in stages.get("line_dedup", {}).values())
        removed = sum(e.get("line_dedup", {}).get("lines_removed", 0) for e in stages.get("line_dedup", {}).values())
        nbytes = sum(e.get("line_dedup", {}).get("bytes_removed", 0) for e in stages.get("line_dedup", {}).values())
        lines.append(f"line_dedup: {line['frequent_lines']:,} of {line['distinct_lines']:,} distinct lines in >= "
                     f"{line['params']['min_documents']} documents; {removed:,} lines ({nbytes / 1e6:.2f} MB) "
                     f"removed from {edited:,} documents")
    decont = stats.get("decontamination")
    if decont:
        parts = [f"{name} {b['documents_matched']:,} documents, {b['items_hit']}/{b['items']} items"
                 for name, b in decont["benchmarks"].items()]
        lines.append(f"decontamination ({decont['ngram']}-grams, {decont['mode']}): " + "; ".join(parts))
    return lines
