"""Cutting one large input file into ranges of about ``run.unit_target_mb``, at record boundaries.

Every cut is found cheaply at planning time: a seek and a bounded read (``_window`` bytes) near each
candidate position, never a pass over the file. A candidate ``c`` sits ``target`` bytes after the previous
cut; the cut is the first record boundary at or after ``c`` inside the window. When the window holds none
(a record longer than the window) the planner looks again further on, in growing steps (``_cuts``): a
range holding such a record exceeds the target by about that record, never by a pass over it.

* uncompressed JSONL: just after the next ``\\n`` (a line start);
* Parquet: consecutive row groups, grouped by their compressed size from the footer (a row group is never
  cut; a file without the text column is not cut, so its one ``missing_text_column`` stays one);
* WARC.gz made of one gzip member per record (the WARC standard's and Common Crawl's layout): the next
  member start that inflates to ``WARC/`` (``warc_stream.starts_a_member``, the test the reader uses to
  resynchronise after a corrupt member, so planner and reader agree on where members start);
* not cut: single-stream gzip (``.jsonl.gz``, a WARC gzipped as one stream: a deflate stream can only be
  entered from its start), uncompressed WARC (a record's payload may itself hold WARC records, so a
  ``WARC/1.`` line found by seeking is no proof of a record start; framing is only certain from the file's
  start), books (one file is one document) and code. Such a file is one unit, streamed.

A reader takes the records that *start* in its range: each record is read exactly once over all ranges,
damaged ones included, and document locators (byte offsets, absolute row numbers) do not depend on the cut.
"""

from __future__ import annotations

import logging

import fsspec
import pyarrow.parquet as pq

from pipeline.config import SourceConfig
from pipeline.sources.base import InputFile

log = logging.getLogger(__name__)


def _window(target: int) -> int:
    """Bytes read near each candidate cut: 1/16 of the target, between 64 KiB and 1 MiB."""
    return min(1 << 20, max(64 << 10, target // 16))


def splittable(source: SourceConfig, file: InputFile) -> bool:
    url = file.url
    if source.format == "jsonl":
        return not url.endswith((".gz", ".tgz"))
    if source.format == "parquet":
        return True
    if source.format == "warc":
        return url.endswith(".warc.gz")
    return False


def split_file(source: SourceConfig, file: InputFile, target: int) -> list[InputFile]:
    """``file`` as ranges of about ``target`` bytes, or ``[file]`` when it is small or cannot be cut."""
    if file.size <= target or not splittable(source, file):
        return [file]
    if source.format == "parquet":
        return _parquet_ranges(source, file, target)
    with fsspec.open(file.url, "rb") as fh:
        if source.format == "jsonl":
            cuts = _cuts(file.size, target, lambda c, w: _next_line(fh, c, w))
        else:
            cuts = _cuts(file.size, target, lambda c, w: _next_warc_member(fh, c, w))
    return _byte_ranges(file, cuts)


def _cuts(size: int, target: int, boundary) -> list[int]:
    """Cut offsets (after 0), each the first boundary at or after a candidate, within the window.

    Where a window holds no boundary (inside a record longer than the window) the next look is one window
    further, then two, four, ...: a giant record costs a few windows read, not its length, and the range
    holding it ends at most about twice that record's length past where a boundary was first looked for."""
    window = _window(target)
    cuts: list[int] = []
    candidate, step = target, window
    while candidate < size:
        at = boundary(candidate, window)
        if at is None:
            candidate, step = candidate + step, 2 * step
            continue
        if at >= size:
            break
        cuts.append(at)
        candidate, step = at + target, window
    return cuts


def _byte_ranges(file: InputFile, cuts: list[int]) -> list[InputFile]:
    if not cuts:
        return [file]
    edges = [0, *cuts, None]
    return [InputFile(file.url, file.rel, file.size, start=a, end=b) for a, b in zip(edges, edges[1:])]


def _next_line(fh, candidate: int, window: int) -> int | None:
    """The first line start at or after ``candidate``: just after the first ``\\n`` at ``candidate - 1`` or
    later (``candidate`` itself when the byte before it ends a line)."""
    fh.seek(candidate - 1)
    idx = fh.read(window).find(b"\n")
    return None if idx < 0 else candidate + idx


def _next_warc_member(fh, candidate: int, window: int) -> int | None:
    from pipeline.sources.warc_stream import next_member

    return next_member(fh, candidate, candidate + window)


def _parquet_ranges(source: SourceConfig, file: InputFile, target: int) -> list[InputFile]:
    try:
        with fsspec.open(file.url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if source.text_field not in pf.schema_arrow.names:
                return [file]
            md = pf.metadata
            groups = []
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                columns = [rg.column(c) for c in range(rg.num_columns)]
                first = min((c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset)
                            for c in columns) if columns else 0
                groups.append((first, sum(c.total_compressed_size for c in columns)))
    except (OSError, ValueError) as exc:  # the reader books the broken file; planning does not fail on it
        log.warning("%s: cannot read the Parquet footer (%s); not cut", file.rel, exc)
        return [file]
    spans: list[tuple[int, int]] = []  # row groups [first, stop)
    first = size = 0
    for g, (_, nbytes) in enumerate(groups):
        if g > first and size + nbytes > target:
            spans.append((first, g))
            first, size = g, 0
        size += nbytes
    spans.append((first, len(groups)))
    if len(spans) <= 1:
        return [file]
    starts = [0] + [groups[a][0] for a, _ in spans[1:]]
    ends = starts[1:] + [None]
    return [InputFile(file.url, file.rel, file.size, start=s, end=e, row_groups=span)
            for s, e, span in zip(starts, ends, spans)]
