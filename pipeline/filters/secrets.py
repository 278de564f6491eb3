"""Secrets in code files with Yelp's ``detect-secrets`` (offline): a file holding one is dropped, or the
secret values are replaced and the file kept.

detect-secrets decides: its plugins (``analyze_line``) and its filters (allowlist pragmas, templated
values, sequential strings, UUIDs, indirect references...) run exactly as its own line scanner
(``detect_secrets.core.scan._process_line_based_plugins``) runs them, with the same per-line code snippet.
Two things are ours:

* **which plugins.** Its default set is every plugin it ships. On CPython 3.11's standard library (1,786
  files, tests included, ``bench/filters_cost.py --secrets-plugins all``) that flags 50 files: the two
  entropy plugins 40 (``Hex High Entropy String`` 29 files: test vectors, byte-order tables;
  ``Base64 High Entropy String`` 11: alphabets such as base64.py's), ``Secret Keyword`` 12 (``password =
  'pass'`` in tests, "yes" in _sysconfigdata), ``Basic Auth Credentials`` 4 (``http://user:pass@host`` in
  tests) — every one a false positive. The default here (``DEFAULT_PLUGINS``) is every plugin that looks
  for a *credential format* (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, PyPI, npm, JWT, Azure, private key
  blocks, ...): 0 files flagged on that library. Left out: the two entropy plugins and the keyword plugin
  (false positives above), basic auth (placeholders in URLs; 4 test files), and ``IPPublicDetector``
  (addresses are PII, handled by ``pipeline.filters.pii``).
* **which lines.** detect-secrets tries every plugin on every line through its dependency injection, about
  0.5 ms a line (255 ms for a mean stdlib file). Every plugin kept is a ``RegexBasedDetector``: it can only
  report a line that one of its ``denylist`` patterns matches. So those patterns are first searched over
  the text, and detect-secrets runs on the lines they touch: a line with no pattern match is a line
  detect-secrets reports nothing on, so the result is the same. The search is cheap and sound:

  - a pattern is searched over the whole text in multi-line mode (``^``/``$`` at line ends), restarted one
    character after each match, so neither an overlapping nor a line-crossing match can hide a line's own
    match (a lookaround that sees the neighbouring line's newline can only add lines);
  - the slow ones (keyword-led patterns such as IBM's, SoftLayer's or Cloudant's, ~1 µs a character) are
    searched only on lines holding a run of at least 24 ``[\\da-z_-]`` characters (case-insensitive).
    That is decided by parsing each pattern (``re._parser``): a pattern is gated only if its top-level
    sequence has a repeat of at least 24 of a character class inside that set, so every match of it
    contains such a run.

Redaction replaces each reported secret on its line: the plugin's pattern match where the reported value is
only its prefix group (GitHub reports "ghp" for a whole token), else the value. A private key is reported
by its ``BEGIN ... PRIVATE KEY`` marker, so the whole block (to its ``END`` marker, or the key lines that
follow) is replaced.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from datatrove.data import Document

from pipeline.config import SecretsStep
from pipeline.filters.base import Verdict

# False positives measured on CPython's standard library (module doc): off by default.
NOISY_PLUGINS = frozenset({"HexHighEntropyString", "Base64HighEntropyString", "KeywordDetector",
                           "BasicAuthDetector"})
PII_PLUGINS = frozenset({"IPPublicDetector"})  # pipeline.filters.pii

_ACTIVE: list[Any] = [None]
GATE_RUN = 24  # a pattern needing a run of this many [0-9a-z_-] is searched only on lines holding one
# The gate scans bytes at C speed: ASCII gate characters and every non-ASCII byte (a superset: any Unicode
# digit, or a letter such as "ſ" that case-insensitive patterns match as "s") become b"a", "\n" stays,
# all else becomes b" "; a run of GATE_RUN b"a" is then a bytes.find.
_GATE_TABLE = bytes((0x61 if (b >= 0x80 or chr(b) in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
                     else 0x0A if b == 0x0A else 0x20) for b in range(256))
_GATE_NEEDLE = b"a" * GATE_RUN
_GATE_CHARS = frozenset(map(ord, "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-"))  # + \d  # the plugin set detect-secrets' process-wide settings now hold

_PEM = re.compile(r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY((?: BLOCK)?)-----.*?-----END \1PRIVATE KEY\2-----", re.DOTALL)
_PEM_OPEN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*")
_KEY_LINE = re.compile(r"""^[\s"'`#/*;\\n]*[A-Za-z0-9+/=]{16,}[\s"'`,;\\n]*$""")


def readlines(text: str) -> list[str]:
    """The text's lines as a file's ``readlines()`` gives them: split at "\n" only, each keeping it."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _class_within_gate(items: list) -> bool:
    """A parsed ``[...]`` class whose characters all lie in the gate's set (ranges and literals only)."""
    from re import _constants as c

    for op, av in items:
        if op is c.LITERAL and av in _GATE_CHARS or op is c.CATEGORY and av is c.CATEGORY_DIGIT:
            continue
        if op is c.RANGE and all(ch in _GATE_CHARS for ch in range(av[0], av[1] + 1)):
            continue
        return False
    return True


def needs_gate_run(pattern: re.Pattern[str]) -> bool:
    """Every match of ``pattern`` holds GATE_RUN consecutive gate characters (a mandatory repeat, found in
    its top-level sequence or in mandatory groups of it)."""
    from re import _constants as c
    from re import _parser

    def sequence(items) -> bool:
        for op, av in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                low, _, sub = av
                if low >= GATE_RUN and len(sub) == 1 and sub[0][0] is c.IN and _class_within_gate(sub[0][1]):
                    return True
            elif op is c.SUBPATTERN and sequence(av[-1]):
                return True
        return False

    return sequence(_parser.parse(pattern.pattern, pattern.flags).data)


def required_literal(pattern: re.Pattern[str]) -> str | None:
    """The longest string every match of a case-sensitive ``pattern`` contains (consecutive literal
    characters of its top-level sequence), or None; a text without it cannot match."""
    from re import _constants as c
    from re import _parser

    if pattern.flags & re.IGNORECASE:
        return None
    best, run = "", ""
    for op, av in _parser.parse(pattern.pattern, pattern.flags).data:
        run = run + chr(av) if op is c.LITERAL else ""
        best = max(best, run, key=len)
    return best if len(best) >= 2 else None


def all_plugins() -> list[str]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    return sorted(cls.__name__ for cls in get_mapping_from_secret_type_to_class().values())


def default_plugins() -> list[str]:
    return [name for name in all_plugins() if name not in NOISY_PLUGINS | PII_PLUGINS]


def slug(secret_type: str) -> str:
    """'AWS Access Key' -> 'aws_access_key' (drop reasons and metadata keys)."""
    return re.sub(r"[^a-z0-9]+", "_", secret_type.lower()).strip("_")


class SecretScanner:
    """The secrets detect-secrets reports in a text: ``[(line_number, secret_type, value)]``."""

    def __init__(self, plugins: list[str] | None = None):
        self.plugins = tuple(sorted(plugins if plugins is not None else default_plugins()))
        self._activate()
        from detect_secrets.plugins.base import RegexBasedDetector
        from detect_secrets.settings import get_plugins

        # a plugin that is not regex-based can report any line: then every line is scanned
        self.every_line = not all(isinstance(p, RegexBasedDetector) for p in get_plugins())
        patterns = [] if self.every_line else [
            re.compile(rx.pattern, rx.flags | re.MULTILINE) for p in get_plugins() for rx in p.denylist]
        self.gated = [p for p in patterns if needs_gate_run(p)]
        self.patterns = [(p, required_literal(p)) for p in patterns if not needs_gate_run(p)]

    def _activate(self) -> None:
        """Point detect-secrets' process-wide settings at this plugin set (its default filters)."""
        if _ACTIVE[0] == self.plugins:
            return
        from detect_secrets.settings import cache_bust, get_settings

        cache_bust()  # its caches, and a fresh settings object: detect-secrets' default filters
        settings = get_settings()
        settings.configure_plugins([{"name": name} for name in self.plugins])
        # no verification filter: it would call the services the secrets belong to
        assert "detect_secrets.filters.common.is_ignored_due_to_verification_policies" not in settings.filters
        _ACTIVE[0] = self.plugins

    def spans(self, line: str, secret_type: str, value: str) -> list[tuple[int, int]]:
        """Where on ``line`` the plugin of ``secret_type`` found ``value``: the whole pattern match when the
        value is its prefix (GitHub's and GitLab's patterns report their prefix group, "ghp"), else the
        group holding the value (a keyword pattern reports the token after ``key =``)."""
        from detect_secrets.settings import get_plugins

        self._activate()
        out = []
        for plugin in get_plugins():
            if plugin.secret_type != secret_type:
                continue
            for rx in getattr(plugin, "denylist", ()):
                for m in rx.finditer(line):
                    if m.group(0) == value or m.group(0).startswith(value) and value in m.groups():
                        out.append(m.span())
                    elif value and value in m.groups():
                        k = m.groups().index(value) + 1
                        out.append(m.span(k))
        return out

    def candidate_lines(self, text: str) -> list[int]:
        """1-based numbers of the lines a denylist pattern touches (all lines when a plugin is not regex-based)."""
        if self.every_line:
            return list(range(1, text.count("\n") + 2))
        lines: set[int] = set()
        for pattern, literal in self.patterns:
            if literal is not None and literal not in text:  # C's substring search: no match possible
                continue
            pos = 0
            while (match := pattern.search(text, pos)) is not None:
                first = text.count("\n", 0, match.start()) + 1
                lines.update(range(first, first + text.count("\n", match.start(), match.end()) + 1))
                pos = match.start() + 1
        if self.gated:
            gated = self._gated_lines(text)
            if gated:
                parts = text.split("\n")
                start = 0
                for number, part in enumerate(parts, 1):  # the gated lines' character ranges
                    if number in gated and any(p.search(text, start, start + len(part)) for p in self.gated):
                        lines.add(number)
                    start += len(part) + 1
        return sorted(lines)

    @staticmethod
    def _gated_lines(text: str) -> set[int]:
        """1-based numbers of the lines holding a run of GATE_RUN gate characters (a superset)."""
        data = text.encode("utf-8", "surrogatepass").translate(_GATE_TABLE)
        found, pos = set(), data.find(_GATE_NEEDLE)
        while pos >= 0:
            found.add(data.count(b"\n", 0, pos) + 1)
            pos = data.find(b"\n", pos)
            pos = -1 if pos < 0 else data.find(_GATE_NEEDLE, pos)
        return found

    def scan(self, text: str, filename: str) -> list[tuple[int, str, str]]:
        from detect_secrets.core.scan import _is_filtered_out, _scan_line
        from detect_secrets.settings import get_plugins
        from detect_secrets.util.code_snippet import get_code_snippet

        candidates = self.candidate_lines(text)
        if not candidates:
            return []
        self._activate()
        lines = readlines(text)
        found = []
        for number in candidates:  # detect-secrets' _process_line_based_plugins, on these lines
            if number > len(lines):
                continue
            line = lines[number - 1].rstrip()
            snippet = get_code_snippet(lines=lines, line_number=number)
            if _is_filtered_out(required_filter_parameters=["line"], filename=filename, line=line, context=snippet):
                continue
            for plugin in get_plugins():
                for secret in _scan_line(plugin=plugin, filename=filename, line=line, line_number=number,
                                         context=snippet):
                    if not _is_filtered_out(required_filter_parameters=["context"], filename=secret.filename,
                                            secret=secret.secret_value, plugin=plugin, line=line, context=snippet):
                        found.append((number, secret.type, secret.secret_value))
        return sorted(set(found))


def redact(text: str, secrets: list[tuple[int, str, str]], replacement: str,
           scanner: SecretScanner | None = None) -> tuple[str, Counter[str]]:
    """``text`` with the reported secrets replaced (private keys: the whole block); counts per type."""
    lines = readlines(text)
    counts: Counter[str] = Counter()
    keys: set[int] = set()
    spans: dict[int, list[tuple[int, int]]] = {}
    for number, secret_type, value in secrets:
        counts[slug(secret_type)] += 1
        if secret_type == "Private Key":
            keys.add(number)
            continue
        line = lines[number - 1]
        found = scanner.spans(line, secret_type, value) if scanner is not None else []
        if not found and value:
            found = [(m.start(), m.end()) for m in re.finditer(re.escape(value), line)]
        spans.setdefault(number, []).extend(found)
    for number, found in spans.items():
        line, merged = lines[number - 1], []
        for start, end in sorted(found):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        for start, end in reversed(merged):
            line = line[:start] + replacement + line[end:]
        lines[number - 1] = line
    for number in sorted(keys, reverse=True):
        _redact_key(lines, number - 1, replacement)
    return "".join(lines), counts


def _redact_key(lines: list[str], index: int, replacement: str) -> None:
    """Replace the private key whose marker is on ``lines[index]``: to its END marker, else its key lines."""
    rest = "".join(lines[index:])
    whole = _PEM.search(rest)
    if whole is not None and "\n" not in rest[:whole.start()]:
        new = rest[:whole.start()] + replacement + rest[whole.end():]
        lines[index:] = readlines(new)
        return
    line = lines[index]
    marker = _PEM_OPEN.search(line)
    lines[index] = (line[:marker.start()] + replacement + line[marker.end():]) if marker else replacement + "\n"
    end = index + 1
    while end < len(lines) and _KEY_LINE.match(lines[end]):  # a block without its END marker
        end += 1
    del lines[index + 1:end]


class Secrets:
    """The code filter: ``drop`` -> ``(False, "code_secrets:<type>")``; ``redact`` -> values replaced in
    ``doc.text``, counts per type in ``doc.metadata["secrets_redacted"]``, kept."""

    name = "code_secrets"

    def __init__(self, step: SecretsStep, plugins: list[str] | None = None):
        self.step = step
        self.scanner = SecretScanner(plugins)

    def __call__(self, doc: Document) -> Verdict:
        secrets = self.scanner.scan(doc.text, doc.metadata.get("path") or doc.id or "file")
        if not secrets:
            return True, None
        if self.step.action == "drop":
            return False, f"{self.name}:{slug(secrets[0][1])}"
        doc.text, counts = redact(doc.text, secrets, self.step.replacement, self.scanner)
        doc.metadata["secrets_redacted"] = dict(sorted(counts.items()))
        return True, None
