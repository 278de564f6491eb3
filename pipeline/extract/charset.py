"""Decode HTML bytes to text: BOM, valid UTF-8, the HTTP header label, the ``<meta>`` label, then byte-level
detection (uchardet, through Resiliparse), with labels mapped as browsers map them (WHATWG).

Order and why:

1. A byte-order mark wins (as in browsers).
2. Bytes that are valid UTF-8 *and* contain non-ASCII are UTF-8, whatever the label says: a UTF-8 page
   labelled ``iso-8859-1`` is common on the web, and no real text in another encoding is valid UTF-8 by
   accident beyond a few bytes. (Browsers trust the label and show mojibake; a corpus should not.)
3. The header label, then the ``<meta>`` label, each mapped by the WHATWG table (``iso-8859-1``, ``latin1``
   and ``ascii`` → ``windows-1252``; ``gb2312`` → ``gbk``; ``shift_jis`` variants → ``shift_jis``, …), is
   used when it decodes with at most ``max_replacement_fraction`` replacement characters.
4. Otherwise the encoding uchardet detects from the bytes (an undeclared ``windows-1251`` page).
5. Otherwise the candidate with the fewest replacements; if even that one needs more than the budget,
   the page is undecodable and the caller drops it.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
META_SCAN_BYTES = 4096  # WHATWG's prescan reads 1,024 bytes; real pages put <meta> later than that


@dataclass(frozen=True)
class Decoded:
    text: str
    charset: str          # the Python codec name used
    method: str           # bom | utf8 | header | meta | detected | best_effort | ascii
    replacements: int     # U+FFFD introduced by decoding


def whatwg_label(label: str | None) -> str | None:
    """The encoding a browser uses for ``label`` (WHATWG names and labels), or None when it is unknown."""
    if not label:
        return None
    from resiliparse.parse.encoding import map_encoding_to_html5

    return map_encoding_to_html5(label.strip().strip("\"'").lower(), fallback_utf8=False)


def header_charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip("\"' ").lower()
    return None


def meta_charset(head: bytes) -> str | None:
    match = _META_CHARSET.search(head[:META_SCAN_BYTES])
    return match.group(1).decode("ascii").lower() if match else None


def _decode(body: bytes, encoding: str) -> tuple[str, int] | None:
    try:
        return body.decode(encoding), 0
    except UnicodeDecodeError:
        text = body.decode(encoding, errors="replace")
        return text, text.count("\ufffd")
    except LookupError:
        return None


def decode_html(body: bytes, header_label: str | None, max_replacement_fraction: float = 0.01) -> Decoded | None:
    """The page's text, or None when no encoding decodes it within the replacement budget."""
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            text = body[len(bom):].decode(encoding, errors="replace")
            return Decoded(text, encoding, "bom", text.count("\ufffd"))
    if body.isascii():
        return Decoded(body.decode("ascii"), "ascii", "ascii", 0)
    try:
        return Decoded(body.decode("utf-8"), "utf-8", "utf8", 0)
    except UnicodeDecodeError:
        pass

    budget = max(1, int(max_replacement_fraction * len(body)))
    candidates: list[Decoded] = []
    tried: set[str] = set()

    def attempt(encoding: str | None, method: str) -> Decoded | None:
        if not encoding or encoding in tried:
            return None
        tried.add(encoding)
        result = _decode(body, encoding)
        if result is None:
            return None
        decoded = Decoded(result[0], encoding, method, result[1])
        candidates.append(decoded)
        return decoded if decoded.replacements <= budget else None

    for label, method in ((header_label, "header"), (meta_charset(body), "meta")):
        found = attempt(whatwg_label(label), method)
        if found:
            return found
    from resiliparse.parse.encoding import detect_encoding

    found = attempt(detect_encoding(body, html5_compatible=True, from_html_meta=False), "detected")
    if found:
        return found
    best = min(candidates, key=lambda d: d.replacements) if candidates else None
    if best is not None and best.replacements <= budget:
        return Decoded(best.text, best.charset, "best_effort", best.replacements)
    return None
