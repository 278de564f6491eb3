"""URL dedup's pure functions: URL normalisation, the 64-bit URL key, crawl dates, and the keeper order.

Re-crawls of one page collapse to one document. Two URLs are "the same page" when their normalised forms
are equal (``normalize_url``, version ``KEY_VERSION``):

* **scheme** lower-cased; ``http`` and ``https`` are one scheme (a site that moved to TLS serves the same
  page; SURT, the key of Common Crawl's index, drops the scheme altogether). Other schemes stay distinct.
* **host** lower-cased, a trailing dot dropped, non-ASCII hosts in their IDNA (punycode) form, and a leading
  ``www.`` dropped when what remains still has a dot (``www.example.com`` = ``example.com``, as SURT's host
  massage; ``www.com`` stays). User info is kept as written.
* **port**: the scheme's default (http 80, https 443, ftp 21, ws 80, wss 443) dropped, leading zeros too.
* **path**: percent-escapes of unreserved characters (``A-Z a-z 0-9 - . _ ~``) decoded, every other
  escape upper-cased, characters that must be escaped (non-ASCII as UTF-8, spaces, controls, a ``%`` not
  starting an escape) escaped; ``.`` and ``..`` segments resolved (RFC 3986, 5.2.4); an empty path is
  ``/``; a trailing slash is dropped (``/docs/`` = ``/docs``; the root stays ``/``). Case is kept (paths
  are case-sensitive); ``//`` is not collapsed.
* **query** kept, its ``&``-separated parameters escape-normalised as the path and **sorted** (servers
  rarely depend on parameter order; tracking parameters are *not* removed); an empty query (``?``) and
  empty parameters (``a=1&&b=2``) are dropped.
* **fragment** dropped (never sent to the server).

A URL without a host (``mailto:``, ``urn:``, a relative reference) is keyed on its text minus the fragment,
scheme lower-cased. A document whose metadata has no ``url`` (or an empty one) is not URL-deduped: it is
kept and counted. The key is the first 8 bytes of blake2b over the normalised URL's UTF-8 (never Python's
``hash()``, which changes per process): the same URL has the same key on every machine and run, and two
distinct URLs share a key with probability ~n²/2⁶⁵ (10⁻⁵ for 10⁷ distinct URLs per run).

**Keeper order** within a group of documents sharing a key: documents of an index run first (already
published: never removed), then ``keep=newest``: the latest crawl date (WARC-Date, ISO 8601; a missing or
unparsable date is the oldest), then the longest text (characters), then the smallest document id;
``keep=longest``: the longest text, then the newest, then the smallest id. Ids are the project's 24-hex
blake2b digests, compared exactly (two integers); the location (run, unit, row) breaks the only remaining
tie, the same id twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, urlsplit

import numpy as np

KEY_VERSION = 1          # bump when normalize_url or url_key changes: index runs of another version are refused
MISSING_DATE = -(1 << 62)  # sorts as the oldest crawl date; ~date stays in range (no overflow)
DEFAULT_PORTS = {"http": "80", "https": "443", "ftp": "21", "ws": "80", "wss": "443"}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PATH_SAFE = "/:@!$&'()*+,;=%-._~"          # pchar and '/', plus '%' of the escapes already there
_QUERY_SAFE = "/?:@!$&'()*+,;=%-._~"
_FRACTION = re.compile(r"(\.\d{6})\d+")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _escapes(text: str, safe: str) -> str:
    """Percent-encoding normalised: unreserved escapes decoded, others upper-cased, unsafe characters escaped."""
    if "%" in text:
        text = _LONE_PERCENT.sub("%25", text)
        text = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if chr(int(m.group(1), 16)) in _UNRESERVED
                           else "%" + m.group(1).upper(), text)
    if text.isascii() and all(c in _UNRESERVED or c in safe for c in text):
        return text
    return quote(text, safe=safe, encoding="utf-8", errors="replace")


def _remove_dot_segments(path: str) -> str:
    if "." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for seg in segments[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


def _host(host: str) -> str:
    host = host.lower().rstrip(".")
    if not host.isascii():
        with contextlib.suppress(UnicodeError):
            host = host.encode("idna").decode("ascii")
    if host.startswith("www.") and "." in host[4:]:
        host = host[4:]
    return host


def normalize_url(url: str | None) -> str | None:
    """The normalised form of ``url`` (see the module docstring); None for a missing or blank URL."""
    if not url:
        return None
    url = url.strip()
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:                              # e.g. an unbalanced '[' in the host
        return url.split("#", 1)[0]
    scheme = parts.scheme.lower()
    if not parts.netloc:
        rest = url.split("#", 1)[0]
        return scheme + rest[len(parts.scheme):] if scheme else rest
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if hostport.startswith("["):                    # IPv6 literal
        close = hostport.find("]")
        host, port = hostport[: close + 1], hostport[close + 2:]      # urlsplit checked the brackets
    else:
        host, _, port = hostport.partition(":")
    host = _host(host)
    if port.isdigit():
        port = str(int(port))
    if port == DEFAULT_PORTS.get(scheme) or port == "":
        port = ""
    key_scheme = "http" if scheme in ("http", "https") else scheme
    path = _remove_dot_segments(_escapes(parts.path, _PATH_SAFE)) if parts.path else "/"
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    if not path.startswith("/"):
        path = "/" + path
    query = ""
    if parts.query:
        params = sorted(_escapes(p, _QUERY_SAFE) for p in parts.query.split("&") if p)
        query = "?" + "&".join(params) if params else ""
    netloc = f"{userinfo}{at}{host}" + (f":{port}" if port else "")
    return f"{key_scheme}://{netloc}{path}{query}"


def url_key(normalized: str) -> int:
    """The 64-bit key of a normalised URL (blake2b, little-endian)."""
    return int.from_bytes(hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


def parse_crawl_date(value: str | None) -> int:
    """A crawl date (WARC-Date: ISO 8601, e.g. ``2024-03-01T12:34:56Z``, fractions of any length; a bare date;
    or a 14-digit ``YYYYMMDDhhmmss``) as microseconds since 1970 UTC (naive dates are UTC);
    ``MISSING_DATE`` when missing or unparsable."""
    if not value or not isinstance(value, str):
        return MISSING_DATE
    text = value.strip()
    try:
        if len(text) == 14 and text.isdigit():
            when = datetime.strptime(text, "%Y%m%d%H%M%S")
        else:
            if text.endswith(("Z", "z")):
                text = text[:-1] + "+00:00"
            when = datetime.fromisoformat(_FRACTION.sub(r"\1", text))
    except ValueError:
        return MISSING_DATE
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // timedelta(microseconds=1)


def id_parts(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Document ids as (high uint64, low uint32) whose order is the ids' string order: the project's ids are
    24 hex digits (12 bytes, big-endian here). Any other id is ordered by its blake2b digest instead."""
    raw = bytearray()
    for doc_id in ids:
        if len(doc_id) == 24:
            try:
                raw += bytes.fromhex(doc_id)
                continue
            except ValueError:
                pass
        raw += hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=12).digest()
    flat = np.frombuffer(bytes(raw), dtype=np.uint8).reshape(-1, 12)
    hi = flat[:, :8].copy().view(">u8").reshape(-1).astype(np.uint64)
    lo = flat[:, 8:].copy().view(">u4").reshape(-1).astype(np.uint32)
    return hi, lo


def id_text(hi: int, lo: int) -> str:
    """The id ``id_parts`` split (exact for the project's hex ids)."""
    return f"{int(hi):016x}{int(lo):08x}"


def keeper_order(keep: str, key: np.ndarray, is_index: np.ndarray, date: np.ndarray, chars: np.ndarray,
                 id_hi: np.ndarray, id_lo: np.ndarray, loc: np.ndarray) -> np.ndarray:
    """The permutation that groups rows by key and puts each group's keeper first (module docstring)."""
    new = (~is_index.astype(bool)).astype(np.int8)           # index rows (0) before this run's (1)
    newest, longest = ~date.astype(np.int64), ~chars.astype(np.int64)   # descending, without overflow
    first, second = (newest, longest) if keep == "newest" else (longest, newest)
    return np.lexsort((loc, id_lo, id_hi, second, first, new, key))
