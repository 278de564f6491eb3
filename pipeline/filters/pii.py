"""PII redaction of kept documents: e-mail addresses and public IP addresses with datatrove's
``PIIFormatter`` regexes, phone numbers (optional) with Google's libphonenumber (the ``phonenumbers`` port).

What is datatrove's and what is not:

* the e-mail and IPv4 patterns are read from datatrove's own ``PIIFormatter`` instance, and an address is
  public by datatrove's ``public_ip_validator`` (``ipaddress``' ``is_global``: private, loopback,
  link-local, documentation and reserved ranges are kept);
* datatrove's IPv4 pattern has no boundaries, so it finds "1.2.3.4" inside "11.2.3.45" and in
  "1.2.3.4.5"; here a match must stand alone (no word character, ``.`` or ``-`` touching it on the left, no
  word character nor ``.`` + word character on the right: not "1.0.0.127.in-addr.arpa"), and a dotted
  quad that follows "version", "__version__ = '", "release", "python", "section", ``==``... is a version or
  section number, not an address (also "Abschnitt", "第 ... 節", "chapitre"...), and so is one that opens
  a line followed by a dot and a space (a numbered heading, "11.8.3.1. Installing"). On a quarter of the
  web benchmark corpus, 343 of the 425 public-looking quads were such headings and section references of
  the Debian handbook; most of the 82 left are the example addresses the docs show (resolv.conf, zone
  files, logs), which are replaced;
* datatrove cycles through the replacements with one counter per formatter instance, so which replacement
  a document gets depends on every document before it in that worker. Here the cycle restarts with each
  document: the same text is always redacted the same way;
* a match that already is one of the replacements is left alone and not counted (datatrove's default IP
  replacements are themselves public addresses), so redacting twice changes nothing;
* the counts are the matches actually replaced (a private address found by the pattern is not counted).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from pipeline.config import PIIConfig

KINDS = ("email", "ip", "phone")
# What precedes a dotted quad that is a version or a section number, checked on the 24 characters before
# it: a keyword (alone or in an identifier such as __version__ or python_version, not inside "server"),
# then optional punctuation and an opening quote; or a version comparison (==, >=, ~=).
_VERSION_CONTEXT = re.compile(
    r"(?:(?<![A-Za-z0-9])(?:version|release|ver|rev|build|python|pypy|section|sections|sec|chapter|abschnitt|kapitel|secci[oó]n|se[cç][cç]?[aã]o|sezione|chapitre|第|§)[s_]*\.?"
    r"\s*[:=]?\s*[\"'(\[]?|[=<>~!]=\s*[\"']?)$", re.IGNORECASE)
# A numbered heading: the quad opens its line and a dot and a space follow ("11.8.3.1. Installing ...").
_HEADING_AFTER = re.compile(r"\.[^\S\n]")


@lru_cache(maxsize=1)
def _datatrove_patterns() -> tuple[re.Pattern[str], re.Pattern[str], tuple[str, ...]]:
    """datatrove's e-mail regex, its IPv4 regex with boundaries added, its default IP replacements."""
    from datatrove.pipeline.formatters.pii import PIIFormatter

    formatter = PIIFormatter()
    ip = re.compile(rf"(?<![\w.-])(?:{formatter.ip_replacer.regex.pattern})(?!\w|\.\w)")
    return formatter.emails_replacer.regex, ip, tuple(formatter.ip_replacer.replacements)


class _Cycle:
    """The replacements in turn, from the first, for one document."""

    def __init__(self, replacements: tuple[str, ...]):
        self.replacements, self.i = replacements, 0

    def next(self) -> str:
        value = self.replacements[self.i % len(self.replacements)]
        self.i += 1
        return value


class PIIRedactor:
    """``redact(text) -> (text, {"email": n, "ip": n, "phone": n})`` for the kinds the config turns on."""

    def __init__(self, cfg: PIIConfig):
        from datatrove.pipeline.formatters.pii import public_ip_validator

        self.cfg = cfg
        self.email_re, self.ip_re, default_ips = _datatrove_patterns()
        self.is_public = public_ip_validator  # public_only=True is its default
        self.email_replacements = tuple(cfg.email_replacement)
        self.ip_replacements = tuple(cfg.ip_replacement) if cfg.ip_replacement else default_ips
        if not self.email_replacements or not self.ip_replacements:
            raise ValueError("email_replacement and ip_replacement need at least one value")
        self.kinds = tuple(k for k, on in (("email", cfg.emails), ("ip", cfg.ips), ("phone", cfg.phones)) if on)

    def applies_to(self, source_kind: str) -> bool:
        """Whether documents of this source kind (web/book/code) are redacted at all."""
        return self.cfg.enabled and source_kind in self.cfg.kinds and bool(self.kinds)

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        counts = dict.fromkeys(self.kinds, 0)
        if "email" in counts and "@" in text:
            text, counts["email"] = self._emails(text)
        if "ip" in counts and "." in text:
            text, counts["ip"] = self._ips(text)
        if "phone" in counts:
            text, counts["phone"] = self._phones(text)
        return text, counts

    def _emails(self, text: str) -> tuple[str, int]:
        cycle, replaced = _Cycle(self.email_replacements), 0

        def sub(match: re.Match[str]) -> str:
            nonlocal replaced
            if match.group(0) in self.email_replacements:
                return match.group(0)
            replaced += 1
            return cycle.next()

        return self.email_re.sub(sub, text), replaced

    def _ips(self, text: str) -> tuple[str, int]:
        cycle, replaced = _Cycle(self.ip_replacements), 0

        def sub(match: re.Match[str]) -> str:
            nonlocal replaced
            found = match.group(0)
            if (found in self.ip_replacements or not self.is_public(found)
                    or _VERSION_CONTEXT.search(text, max(0, match.start() - 24), match.start())
                    or _HEADING_AFTER.match(text, match.end())
                    and not text[text.rfind("\n", 0, match.start()) + 1:match.start()].strip()):
                return found
            replaced += 1
            return cycle.next()

        return self.ip_re.sub(sub, text), replaced

    def _phones(self, text: str) -> tuple[str, int]:
        from phonenumbers import Leniency, PhoneNumberMatcher

        spans = [(m.start, m.end) for m in PhoneNumberMatcher(text, self.cfg.phone_region, leniency=Leniency.VALID)]
        for start, end in reversed(spans):
            text = text[:start] + self.cfg.phone_replacement + text[end:]
        return text, len(spans)


def pii_tallies(counts: dict[str, int]) -> list[tuple[str, str, int]]:
    """One document's counts as ledger tallies ``(group, key, value)``: ``pii_replaced`` (matches) and
    ``pii_documents`` (documents with at least one), per kind; kinds with nothing found are left out."""
    out: list[tuple[str, str, int]] = []
    for kind, n in counts.items():
        if n:
            out += [("pii_replaced", kind, n), ("pii_documents", kind, 1)]
    return out


def sum_counts(all_counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Counts of many documents added up per kind."""
    total: dict[str, int] = {}
    for counts in all_counts:
        for kind, n in counts.items():
            total[kind] = total.get(kind, 0) + n
    return total
