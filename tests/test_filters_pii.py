"""PII redaction on real documents: Python's docs pages and CPython's standard library, with planted and
real e-mail addresses, IP addresses and phone numbers."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest

from pipeline.config import PIIConfig
from pipeline.filters.pii import PIIRedactor, pii_tallies

pytestmark = pytest.mark.realdata

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EMAILS = ["ada.lovelace@analytical-engine.co.uk", "grace+navy@cobol.mil", "x_y@mail.example.com"]
PUBLIC_IPS = ["8.8.4.4", "93.184.216.34", "151.101.1.69"]
KEPT_IPS = ["10.1.2.3", "192.168.0.254", "127.0.0.1", "172.16.5.4", "169.254.1.1", "192.0.2.17", "0.0.0.0"]
VERSIONS = ["Python 3.11.2.1", "version 1.2.3.4", "__version__ = '4.3.2.1'", "libfoo-3.11.2.1.tar.gz",
            "release 2.7.2.2", "1.2.3.4.5", "v9.9.4.4", "pkg==4.3.2.1"]
PHONES = ["+1 650-253-0000", "(415) 555-2671", "+44 20 7946 0958"]


@pytest.fixture(scope="module")
def page(python_docs_html) -> str:
    """The extracted text of a real page of Python's docs."""
    from pipeline.extract import ExtractSettings, HtmlToText

    result = HtmlToText(ExtractSettings())((python_docs_html / "library/socket.html").read_bytes(), None)
    assert result.outcome == "kept"
    return result.text


def planted(text: str, items: list[str], seed: int = 0) -> str:
    """``items`` inserted, space-separated, at random places between the page's words."""
    rng = random.Random(seed)
    words = text.split(" ")
    for item in items:
        words.insert(rng.randrange(1, len(words)), item)
    return " ".join(words)


def test_planted_emails_and_public_ips_replaced_and_counted(page):
    redactor = PIIRedactor(PIIConfig())
    before = PIIRedactor(PIIConfig()).redact(page)[1]  # what the real page holds already
    text = planted(page, EMAILS + PUBLIC_IPS + KEPT_IPS + VERSIONS)
    out, counts = redactor.redact(text)
    assert counts == {"email": before["email"] + 3, "ip": before["ip"] + 3}
    for item in EMAILS + PUBLIC_IPS:
        assert item not in out
    for item in KEPT_IPS + VERSIONS:  # private, loopback, link-local, documentation; version numbers
        assert item in out
    assert out.count("email@example.com") + out.count("firstname.lastname@example.org") >= 3
    assert "phone" not in counts  # phones are off by default


def test_redaction_is_idempotent_and_the_same_for_every_document(page):
    text = planted(page, EMAILS + PUBLIC_IPS, seed=1)
    redactor = PIIRedactor(PIIConfig(phones=True))
    out, counts = redactor.redact(text)
    assert counts["email"] >= 3 and counts["ip"] >= 3 and counts["phone"] == 0
    assert redactor.redact(out) == (out, {"email": 0, "ip": 0, "phone": 0})
    # datatrove's replacement cycle spans documents; ours restarts with each one
    redactor.redact(planted(page, EMAILS[:1] + PUBLIC_IPS[:1], seed=2))
    assert redactor.redact(text) == (out, counts)
    assert PIIRedactor(PIIConfig()).redact(text)[0] == out


def test_datatrove_would_cycle_across_documents(page):
    """Why the cycle restarts: datatrove's formatter gives the same document another text the second time."""
    from datatrove.pipeline.formatters.pii import PIIFormatter

    text = planted(page, EMAILS[:1], seed=3)
    formatter = PIIFormatter()
    assert formatter.format(text) != formatter.format(text)


def test_phones_with_libphonenumber(page):
    redactor = PIIRedactor(PIIConfig(phones=True, phone_region="US", phone_replacement="<PHONE>"))
    text = planted(page, PHONES + VERSIONS + ["2024-01-31"], seed=4)
    out, counts = redactor.redact(text)
    assert counts["phone"] == 3 and out.count("<PHONE>") == 3
    for item in PHONES:
        assert item not in out
    assert "2024-01-31" in out and "version 1.2.3.4" in out
    assert redactor.redact(out)[1]["phone"] == 0
    # a national number is read in the configured region: valid in the US, not in Germany
    assert PIIRedactor(PIIConfig(phones=True, phone_region="DE")).redact("call (415) 555-2671 now")[1]["phone"] == 0


def test_real_stdlib_addresses():
    redactor = PIIRedactor(PIIConfig())
    undefined = (STDLIB / "encodings/undefined.py").read_text()  # its author's real address in the header
    out, counts = redactor.redact(undefined)
    assert counts == {"email": 1, "ip": 0} and "@lemburg.com" not in out and "email@example.com" in out
    socket_py = (STDLIB / "socket.py").read_text()  # an example address in a public range; loopback kept
    out, counts = redactor.redact(socket_py)
    assert counts["ip"] == 2 and "123.45.67.89" not in out and "'127.0.0.1'" in out
    ipaddress_py = (STDLIB / "ipaddress.py").read_text()  # documentation ranges everywhere: all kept
    out, counts = redactor.redact(ipaddress_py)
    assert "192.0.2.130" in out and "'1.0.0.127.in-addr.arpa'" in out
    version_py = (STDLIB / "distutils/version.py").read_text()
    assert redactor.redact(version_py)[1]["email"] == 0


def test_counts_are_matches_replaced_over_the_stdlib():
    """Over real library files, each count equals the replacements that actually appear in the output."""
    redactor = PIIRedactor(PIIConfig(email_replacement=["<EMAIL>"], ip_replacement=["<IP>"]))
    files = sorted(p for p in (STDLIB / "email").rglob("*.py")) + [STDLIB / "smtplib.py", STDLIB / "socket.py"]
    totals = {"email": 0, "ip": 0}
    for path in files:
        text = path.read_text()
        out, counts = redactor.redact(text)
        assert out.count("<EMAIL>") - text.count("<EMAIL>") == counts["email"]
        assert out.count("<IP>") - text.count("<IP>") == counts["ip"]
        totals = {k: totals[k] + counts[k] for k in totals}
    assert totals["email"] >= 5 and totals["ip"] >= 2


def test_real_handbook_pages_headings_kept_addresses_replaced():
    """The Debian handbook numbers its sections with dotted quads ("8.3.1.1. Configuring"): not addresses.
    Its example resolv.conf and zone files hold real public addresses: replaced."""
    import re

    from pipeline.extract import ExtractSettings, HtmlToText
    from pipeline.realdata import FetchError, debian_package
    from tests.conftest import real_data_unavailable

    try:
        html = debian_package("debian-handbook") / "root/usr/share/doc/debian-handbook/html/en-US"
    except FetchError as exc:
        real_data_unavailable(str(exc))
    redactor = PIIRedactor(PIIConfig(ip_replacement=["<IP>"]))
    headings = 0
    for name in ("sect.hostname-name-service.html", "network-services.html"):
        text = HtmlToText(ExtractSettings())((html / name).read_bytes(), None).text
        out, counts = redactor.redact(text)
        numbered = re.findall(r"(?m)^\d+\.\d+\.\d+\.\d+\.\s", text)
        headings += len(numbered)
        assert all(h in out for h in numbered)
        assert counts["ip"] == out.count("<IP>") >= 3
    assert headings >= 5
    assert "nameserver <IP>" in out or "ip4:<IP>" in out


def test_kinds_and_tallies():
    cfg = PIIConfig(kinds=["web", "code"], emails=True, ips=False)
    redactor = PIIRedactor(cfg)
    assert redactor.applies_to("web") and redactor.applies_to("code") and not redactor.applies_to("book")
    assert not PIIRedactor(PIIConfig(enabled=False)).applies_to("web")
    out, counts = redactor.redact("mail ada@example.net from 8.8.8.8")
    assert counts == {"email": 1} and "8.8.8.8" in out
    assert pii_tallies({"email": 2, "ip": 0, "phone": 1}) == [
        ("pii_replaced", "email", 2), ("pii_documents", "email", 1),
        ("pii_replaced", "phone", 1), ("pii_documents", "phone", 1)]
