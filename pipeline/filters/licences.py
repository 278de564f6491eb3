"""Licence detection for code files: SPDX ids into ``doc.metadata["licences"]``. Never drops.

Two sources, both in the file's head (licence headers sit there; a licence quoted deep in a file is
usually not the file's own):

* ``SPDX-License-Identifier:`` tags, parsed and validated by nexB's ``license-expression`` (offline: it
  ships the ScanCode licence keys with their SPDX ids and aliases), so ``GPL-2.0+`` becomes
  ``GPL-2.0-or-later`` and ``GPL-2.0 WITH Linux-syscall-note`` gives ``GPL-2.0-only`` (exceptions are not
  licences); ``LicenseRef-*`` ids are kept as written, unknown ids go to ``metadata["licences_unknown"]``.
* licence notices, matched by their characteristic sentences (whitespace and comment markers between the
  words ignored): the MIT permission notice, Apache-2.0, GPL/LGPL/AGPL with their version and "or (at your
  option) any later version", BSD 2-/3-/4-clause, MPL-2.0, ISC, the Unlicense, "Licensed to PSF under a
  Contributor Agreement" (CPython's files: PSF-2.0) and the "governed by a BSD-style license that can be
  found in the LICENSE file" line of Go and Chromium (whose LICENSE is BSD-3-Clause, as ScanCode reads it).
  Each id is still normalised through ``license-expression``.

Why not a licence-text classifier: ScanCode is the reference but far too heavy for a per-file filter; the
light PyPI matchers (licenseclassifier, license-matcher, licenseid, golicense-classifier) compare whole
licence *texts* (LICENSE files), are months old or unmaintained, and some need Redis, Java or the network.
File headers are short notices, which a handful of phrases identify.
"""

from __future__ import annotations

import re
from functools import lru_cache

from datatrove.data import Document

from pipeline.filters.base import Verdict

HEAD_LINES = 60       # licence headers are in the first lines ...
HEAD_CHARS = 8000     # ... of bounded length
_SPDX_TAG = re.compile(r"SPDX-License-Identifier\s*:\s*(.+)")
# where a tag's expression ends: a closing comment, quote or markup, or the line's end
_TAG_END = re.compile(r"\s*(?:\*/|-->|\"\"\"|'''|#\}|\*\)|[\"'`;,]\s*$|$)")


def _phrase(text: str) -> str:
    """A phrase as a regex: its words in order, anything that is not a word character between them (line
    breaks, comment markers, indentation, punctuation)."""
    return r"[\W_]+".join(re.escape(word) for word in re.findall(r"[^\W_]+", text))


_GPL_LATER = r"(?:[\W_]+of[\W_]+the[\W_]+License)?(?P<later>[\W_]+(?:or[\W_]+)?\(?at[\W_]+your[\W_]+option\)?[\W_]+any[\W_]+later[\W_]+version)?"
_GPL_FAMILY = (
    r"GNU[\W_]+(?P<family>Affero[\W_]+General|Lesser[\W_]+General|Library[\W_]+General|General)[\W_]+Public"
    r"[\W_]+License(?:[\W_]+as[\W_]+published[\W_]+by[\W_]+the[\W_]+Free[\W_]+Software[\W_]+Foundation)?"
    r"[\W_]+(?:;[\W_]+)?(?:either[\W_]+)?(?:version|v)[\W_]*(?P<version>[123](?:\.[01])?)" + _GPL_LATER)
NOTICES: list[tuple[str, re.Pattern[str]]] = [
    ("MIT", re.compile(_phrase("Permission is hereby granted, free of charge, to any person obtaining a copy"), re.I)),
    ("Apache-2.0", re.compile(_phrase("Licensed under the Apache License, Version 2.0"), re.I)),
    ("MPL-2.0", re.compile(_phrase("subject to the terms of the Mozilla Public License, v. 2.0"), re.I)),
    ("ISC", re.compile(_phrase("Permission to use, copy, modify, and/or distribute this software for any purpose "
                               "with or without fee is hereby granted"), re.I)),
    ("Unlicense", re.compile(_phrase("This is free and unencumbered software released into the public domain"), re.I)),
    ("PSF-2.0", re.compile(_phrase("Licensed to PSF under a Contributor Agreement"), re.I)),
    ("BSD-3-Clause", re.compile(_phrase("governed by a BSD-style license that can be found in the LICENSE file"), re.I)),
]
_BSD = re.compile(_phrase("Redistribution and use in source and binary forms, with or without modification, are "
                          "permitted provided that the following conditions are met"), re.I)
_BSD_NAME_CLAUSE = re.compile(_phrase("Neither the name of") + r"|" + _phrase("names of its contributors may not be used")
                              + r"|" + _phrase("may not be used to endorse or promote"), re.I)
_BSD_ADVERTISING = re.compile(_phrase("All advertising materials mentioning features or use of this software"), re.I)
_GPL = re.compile(_GPL_FAMILY, re.I)
_GPL_IDS = {"general": "GPL", "lesser general": "LGPL", "library general": "LGPL", "affero general": "AGPL"}


@lru_cache(maxsize=1)
def spdx_licensing():
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


def normalise(expression: str) -> tuple[list[str], list[str]]:
    """The SPDX licence ids of an expression (exceptions left out) and the ids it does not know."""
    from license_expression import ExpressionError

    licensing = spdx_licensing()
    try:
        parsed = licensing.parse(expression, validate=True, strict=False)
    except ExpressionError:  # an unknown id (or bad syntax): take the expression apart, id by id
        known, unknown = [], []
        for token in re.split(r"\s+(?:AND|OR|WITH)\s+|[()\s]+", expression, flags=re.IGNORECASE):
            if not token:
                continue
            try:
                symbol = licensing.parse(token, validate=True, strict=False)
            except ExpressionError:
                (known if token.startswith("LicenseRef-") else unknown).append(token)
                continue
            known += [s.key for s in licensing.license_symbols(symbol) if not s.is_exception]
        return known, unknown
    if parsed is None:
        return [], []
    return [s.key for s in licensing.license_symbols(parsed) if not s.is_exception], []


_GPL_VERSIONS = {"GPL": ("1.0", "2.0", "3.0"), "LGPL": ("2.0", "2.1", "3.0"), "AGPL": ("3.0",)}


def gpl_id(family: str, version: str, later: bool) -> str | None:
    """'Lesser General', '2.1', True -> 'LGPL-2.1-or-later' (LGPL-2.0 is the Library GPL)."""
    prefix = _GPL_IDS[re.sub(r"[\W_]+", " ", family.lower())]
    version = version if "." in version else f"{version}.0"
    if version not in _GPL_VERSIONS[prefix]:
        return None
    return f"{prefix}-{version}-{'or-later' if later else 'only'}"


def detect(text: str) -> tuple[list[str], list[str]]:
    """The licences of a file's head: SPDX ids (tags first, then notices, each once) and unknown tag ids."""
    head = "\n".join(text[:HEAD_CHARS].split("\n")[:HEAD_LINES])
    ids: list[str] = []
    unknown: list[str] = []
    for tag in _SPDX_TAG.finditer(head):
        expression = _TAG_END.split(tag.group(1), maxsplit=1)[0].strip()
        if expression:
            known, bad = normalise(expression)
            ids += known
            unknown += bad
    found = [spdx for spdx, pattern in NOTICES if pattern.search(head)]
    if _BSD.search(head):
        found.append("BSD-4-Clause" if _BSD_ADVERTISING.search(head)
                     else "BSD-3-Clause" if _BSD_NAME_CLAUSE.search(head) else "BSD-2-Clause")
    for match in _GPL.finditer(head):
        spdx = gpl_id(match["family"], match["version"], bool(match["later"]))
        if spdx:
            found.append(spdx)
    for spdx in found:
        ids += normalise(spdx)[0]
    return list(dict.fromkeys(ids)), list(dict.fromkeys(unknown))


class Licences:
    """Annotates ``metadata["licences"]`` (and ``licences_unknown`` when a tag names unknown ids)."""

    name = "code_licences"

    def __call__(self, doc: Document) -> Verdict:
        ids, unknown = detect(doc.text)
        doc.metadata["licences"] = ids
        if unknown:
            doc.metadata["licences_unknown"] = unknown
        return True, None
