"""Readers for every input format, and unit planning."""

from __future__ import annotations

from pipeline.config import SourceConfig
from pipeline.sources.base import InputFile, Reader, Unit, plan_fingerprint, plan_units


def reader_for(source: SourceConfig) -> Reader:
    if source.format == "warc":
        from pipeline.sources.warc import WarcReader

        return WarcReader(source)
    if source.format == "text":
        from pipeline.sources.text import TextReader

        return TextReader(source)
    if source.format == "code":
        from pipeline.sources.code import CodeReader

        return CodeReader(source)
    if source.format == "jsonl":
        from pipeline.sources.tabular import JsonlReader

        return JsonlReader(source)
    from pipeline.sources.tabular import ParquetReader

    return ParquetReader(source)


__all__ = ["InputFile", "Reader", "Unit", "plan_fingerprint", "plan_units", "reader_for"]
