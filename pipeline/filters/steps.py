"""The datatrove classes behind each configurable step (their constructor arguments are the step's params).

A leaf module: the config validates params against these classes and the registry builds them, so neither
has to import the other.
"""

from __future__ import annotations

DATATROVE_FILTERS: dict[str, dict[str, str]] = {
    "web": {
        "url": "datatrove.pipeline.filters.URLFilter",
        "gopher_repetition": "datatrove.pipeline.filters.GopherRepetitionFilter",
        "gopher_quality": "datatrove.pipeline.filters.GopherQualityFilter",
        "c4": "datatrove.pipeline.filters.C4QualityFilter",
        "fineweb": "datatrove.pipeline.filters.FineWebQualityFilter",
        "badwords": "datatrove.pipeline.filters.C4BadWordsFilter",
    },
    "book": {"repetition": "datatrove.pipeline.filters.GopherRepetitionFilter"},
}
TRAFILATURA_EXTRACTOR = "datatrove.pipeline.extractors.Trafilatura"
