"""Code secrets (detect-secrets) and licences on real source files: CPython's standard library with planted
fake credentials, and Debian's Go, readline and Linux UAPI sources for licence headers and SPDX tags."""

from __future__ import annotations

import random
import string
import sysconfig
from pathlib import Path

import pytest
from datatrove.data import Document

from pipeline.config import CodeFilters, CrawlFilterConfig, SecretsStep
from pipeline.filters.licences import Licences, detect
from pipeline.filters.secrets import Secrets, SecretScanner, default_plugins, readlines
from tests.conftest import real_data_unavailable

pytestmark = pytest.mark.realdata

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def fake_secrets(seed: int = 0) -> dict[str, str]:
    """Credential-shaped strings, made at run time (none is written out in this file)."""
    rng = random.Random(seed)

    def chars(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    body = "\n".join(chars(string.ascii_letters + string.digits + "+/", 64) for _ in range(6))
    kind = "RSA " + "PRIVATE KEY"
    return {
        "aws": "AKIA" + chars(string.ascii_uppercase + string.digits, 16),
        "github": "ghp" + "_" + chars(string.ascii_letters + string.digits, 36),
        "key": f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----",
    }


def planted_file(name: str, secrets: dict[str, str]) -> tuple[str, str]:
    """A real stdlib file with the secrets planted as module constants after its imports."""
    original = (STDLIB / name).read_text()
    lines = original.split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(("import ", "from "))) + 1
    planted = [f'AWS_ACCESS_KEY_ID = "{secrets["aws"]}"',
               f"TOKEN = '{secrets['github']}'  # deploy token",
               f'SIGNING_KEY = """{secrets["key"]}"""']
    return original, "\n".join(lines[:at] + planted + lines[at:])


def code_doc(text: str, path: str) -> Document:
    return Document(text=text, id=f"stdlib/{path}", metadata={"path": path, "source": "stdlib", "source_kind": "code"})


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """detect-secrets can verify secrets against their services: any HTTP request fails the test."""
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(requests.Session, "request", refuse)


def test_planted_secrets_dropped_with_their_type():
    secrets = fake_secrets()
    flt = Secrets(SecretsStep(action="drop"))
    for name in ("textwrap.py", "csv.py", "json/decoder.py"):
        original, text = planted_file(name, secrets)
        assert flt(code_doc(original, name)) == (True, None)
        kept, reason = flt(code_doc(text, name))
        assert not kept and reason == "code_secrets:aws_access_key"  # the first one in the file
    # the earlier ones made harmless: the next kind is found
    _, text = planted_file("shlex.py", {**secrets, "aws": "AKIA"})
    assert flt(code_doc(text, "shlex.py")) == (False, "code_secrets:github_token")
    _, text = planted_file("shlex.py", {**secrets, "aws": "AKIA", "github": "none"})
    assert flt(code_doc(text, "shlex.py")) == (False, "code_secrets:private_key")


def test_planted_secrets_redacted_and_counted():
    secrets = fake_secrets(1)
    flt = Secrets(SecretsStep(action="redact", replacement="<SECRET>"))
    original, text = planted_file("textwrap.py", secrets)
    doc = code_doc(text, "textwrap.py")
    assert flt(doc) == (True, None)
    assert doc.metadata["secrets_redacted"] == {"aws_access_key": 1, "github_token": 1, "private_key": 1}
    for value in (secrets["aws"], secrets["github"]):
        assert value not in doc.text
    assert "PRIVATE KEY" not in doc.text and secrets["key"].split("\n")[2] not in doc.text  # the whole block
    assert 'AWS_ACCESS_KEY_ID = "<SECRET>"' in doc.text and 'SIGNING_KEY = """<SECRET>"""' in doc.text
    compile(doc.text, "textwrap.py", "exec")  # still Python
    assert doc.text.replace('AWS_ACCESS_KEY_ID = "<SECRET>"\n', "").replace(
        "TOKEN = '<SECRET>'  # deploy token\n", "").replace('SIGNING_KEY = """<SECRET>"""\n', "") == original
    again = code_doc(doc.text, "textwrap.py")
    assert flt(again) == (True, None) and "secrets_redacted" not in again.metadata  # nothing left to find


def test_same_findings_as_detect_secrets_on_every_line():
    """Scanning only the lines the plugins' patterns touch reports what detect-secrets' own line scanner
    reports over all lines, with the same plugins and filters."""
    from detect_secrets.core.scan import _process_line_based_plugins

    scanner = SecretScanner()
    secrets = fake_secrets(2)
    extra = {"slack": "xoxb-" + "1234567890-" + "2345678901-" + "a1b2c3d4e5f6g7h8i9j0k1l2",
             "stripe": "sk" + "_live_" + "a1B2c3D4e5F6g7H8i9J0k1L2"}
    for name in ("shlex.py", "dataclasses.py", "smtplib.py"):
        _, text = planted_file(name, secrets)
        text += "\n".join(f"{k.upper()} = '{v}'" for k, v in extra.items()) + "\n"
        ours = scanner.scan(text, name)
        scanner._activate()
        theirs = sorted({(s.line_number, s.type, s.secret_value)
                         for s in _process_line_based_plugins(list(enumerate(readlines(text), 1)), filename=name)})
        assert ours == theirs
        assert {t for _, t, _ in ours} >= {"AWS Access Key", "GitHub Token", "Private Key", "Slack Token",
                                           "Stripe Access Key"}


def test_false_positives_on_the_standard_library():
    """Default plugins: no file of a spread of real stdlib files (tests included) is flagged; the plugins
    left out flag real files there (which is why they are left out)."""
    files = sorted(p for p in STDLIB.rglob("*.py") if "site-packages" not in p.parts)[::3]
    assert len(files) > 500
    scanner = SecretScanner()
    flagged = [p for p in files if scanner.scan(p.read_text(errors="replace"), str(p))]
    assert flagged == []
    noisy = SecretScanner(["Base64HighEntropyString", "HexHighEntropyString", "KeywordDetector"])
    assert noisy.every_line  # not regex-based: detect-secrets runs on every line
    assert {t for _, t, _ in noisy.scan((STDLIB / "base64.py").read_text(), "base64.py")} == {
        "Base64 High Entropy String"}
    assert "IPPublicDetector" not in default_plugins() and "AWSKeyDetector" in default_plugins()


def test_code_filters_order():
    from pipeline.filters.registry import build_filters

    names = [f.name for f in build_filters("code", CrawlFilterConfig())]
    assert names[-2:] == ["code_secrets", "code_licences"] and names.index("code_minified") < names.index("code_secrets")
    off = CrawlFilterConfig(code=CodeFilters(secrets=SecretsStep(enabled=False), licences=False))
    assert "code_secrets" not in [f.name for f in build_filters("code", off)]
    assert "code_licences" not in [f.name for f in build_filters("code", off)]


def test_licences_of_stdlib_files():
    cases = {"tomllib/_parser.py": ["MIT", "PSF-2.0"],  # an SPDX tag, then CPython's contributor notice
             "profile.py": ["Apache-2.0", "PSF-2.0"], "optparse.py": ["BSD-3-Clause"],
             "xml/etree/ElementTree.py": ["PSF-2.0"], "json/__init__.py": []}
    flt = Licences()
    for name, expected in cases.items():
        doc = code_doc((STDLIB / name).read_text(), name)
        assert flt(doc) == (True, None)
        assert doc.metadata["licences"] == expected, name


def _debian_sources(package: str, pattern: str) -> list[Path]:
    from pipeline.realdata import FetchError, debian_package

    try:
        root = debian_package(package) / "root"
    except FetchError as exc:
        real_data_unavailable(str(exc))
    return sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())


def test_licences_of_debian_sources():
    go = _debian_sources("golang-github-google-uuid-dev", "usr/share/gocode/**/*.go")
    assert len(go) >= 10 and all(detect(p.read_text())[0] == ["BSD-3-Clause"] for p in go)  # Go's header line
    readline = _debian_sources("libreadline-dev", "usr/include/readline/*.h")
    assert readline and all(detect(p.read_text())[0] == ["GPL-3.0-or-later"] for p in readline)  # GPL notice
    uapi = _debian_sources("linux-libc-dev", "usr/include/linux/*.h")
    assert len(uapi) > 300
    results = {p.name: detect(p.read_text(errors="replace")) for p in uapi}
    assert results["types.h"] == (["GPL-2.0-only"], [])   # GPL-2.0 WITH Linux-syscall-note: no exception id
    assert all(not unknown for _, unknown in results.values())
    with_ids = [name for name, (ids, _) in results.items() if ids]
    assert len(with_ids) > 0.95 * len(uapi)
    assert any("GPL-2.0-or-later" in ids for ids, _ in results.values())
    assert any(ids[:2] == ["GPL-2.0-only", "BSD-3-Clause"] for ids, _ in results.values())  # dual licences


def test_unknown_and_custom_ids():
    ids, unknown = detect("// SPDX-License-Identifier: MIT OR Apache-2.0\n"
                          "# SPDX-License-Identifier: LicenseRef-Acme AND Not-A-Licence-9\n")
    assert ids == ["MIT", "Apache-2.0", "LicenseRef-Acme"] and unknown == ["Not-A-Licence-9"]
    doc = code_doc("/* SPDX-License-Identifier: GPL-2.0+ */\nint x;\n", "x.c")
    Licences()(doc)
    assert doc.metadata["licences"] == ["GPL-2.0-or-later"] and "licences_unknown" not in doc.metadata
