"""Code: directory trees or archives (.tar, .tar.gz, .zip) of source files; language from the extension."""

from __future__ import annotations

import posixpath
import tarfile
import zipfile
import zlib
from collections.abc import Iterator

import fsspec
from datatrove.data import Document

from pipeline.document import make_document
from pipeline.ledger import Ledger
from pipeline.sources.base import ARCHIVE_SUFFIXES, GZIP_ERRORS, InputFile, Reader, read_capped

LANGUAGES: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".cc": "c++", ".cpp": "c++", ".cxx": "c++",
    ".hpp": "c++", ".hh": "c++", ".rs": "rust", ".go": "go", ".java": "java", ".kt": "kotlin",
    ".scala": "scala", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".rb": "ruby", ".php": "php", ".cs": "c#", ".swift": "swift",
    ".m": "objective-c", ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".pl": "perl", ".pm": "perl",
    ".lua": "lua", ".r": "r", ".jl": "julia", ".hs": "haskell", ".ml": "ocaml", ".ex": "elixir",
    ".exs": "elixir", ".erl": "erlang", ".clj": "clojure", ".sql": "sql", ".f90": "fortran", ".f": "fortran",
    ".s": "assembly", ".asm": "assembly", ".zig": "zig", ".dart": "dart", ".vue": "vue", ".css": "css",
    ".scss": "scss", ".html": "html", ".md": "markdown", ".rst": "restructuredtext", ".tex": "tex",
    ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".cmake": "cmake", ".mk": "makefile",
}
FILENAMES: dict[str, str] = {"Makefile": "makefile", "Dockerfile": "dockerfile", "CMakeLists.txt": "cmake"}
# Directories whose contents are third-party or build output, not the repository's own code.
VENDORED_DIRS = {"node_modules", "vendor", "vendored", "third_party", "third-party", "site-packages",
                 "dist-packages", ".git", ".hg", ".svn", "__pycache__", "bower_components", ".venv", "venv",
                 ".tox", "build", "dist", "target", ".mypy_cache", ".pytest_cache"}
GENERATED_NAMES = ("_pb2.py", "_pb2_grpc.py", ".pb.go", ".min.js", ".min.css", "package-lock.json",
                   "yarn.lock", "Cargo.lock", "poetry.lock", ".designer.cs", "_generated.go")


def language_of(path: str) -> str | None:
    name = posixpath.basename(path)
    if name in FILENAMES:
        return FILENAMES[name]
    return LANGUAGES.get(posixpath.splitext(name)[1].lower())


def path_rejection(rel: str) -> str | None:
    """Why a path is not a repository's own source file, or None."""
    parts = rel.split("/")
    if any(p in VENDORED_DIRS for p in parts[:-1]):
        return "vendored"
    if parts[-1].endswith(GENERATED_NAMES):
        return "generated_name"
    if language_of(rel) is None:
        return "not_code"
    return None


class CodeReader(Reader):
    def read(self, file: InputFile, ledger: Ledger) -> Iterator[Document]:
        if file.url.endswith(ARCHIVE_SUFFIXES):
            yield from self._archive(file, ledger)
            return
        self.took(ledger, 1, file.size)
        reason = path_rejection(file.rel)
        if reason:
            self.dropped(ledger, reason, file.size)
            return
        if file.size > self.max_bytes:
            self.dropped(ledger, "too_large", file.size)
            return
        with fsspec.open(file.url, "rb") as fh:
            data = read_capped(fh, self.max_bytes)
        doc = self._member(data, file.rel, file.rel.split("/")[0], ledger)
        if doc is not None:
            yield doc

    def _member(self, data: bytes | None, rel: str, repo: str, ledger: Ledger) -> Document | None:
        if data is None:
            self.dropped(ledger, "too_large")
            return None
        if not data.strip():
            self.dropped(ledger, "empty_file")
            return None
        if b"\x00" in data[:8192]:
            self.dropped(ledger, "binary", len(data))
            return None
        text = self.decode(data)
        if text is None:
            self.dropped(ledger, "invalid_utf8", len(data))
            return None
        self.kept(ledger, len(data))
        return make_document(text, self.source.name, self.source.kind, rel, repository=repo,
                             path=rel.split("/", 1)[-1], language=language_of(rel), size=len(data))

    def _archive(self, file: InputFile, ledger: Ledger) -> Iterator[Document]:
        repo = posixpath.basename(file.rel)
        for suffix in ARCHIVE_SUFFIXES:
            repo = repo.removesuffix(suffix)
        try:
            with fsspec.open(file.url, "rb") as raw:
                if file.url.endswith(".zip"):
                    yield from self._zip(raw, file, repo, ledger)
                else:
                    yield from self._tar(raw, file, repo, ledger)
        except GZIP_ERRORS:
            self.took(ledger)
            self.errored(ledger, "truncated_gzip")
        except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
            self.took(ledger)
            self.errored(ledger, _archive_error(exc))

    def _admit_member(self, name: str, size: int, ledger: Ledger) -> bool:
        """Count an archive member; False (dropped, with its reason) when it is not a source file to read."""
        self.took(ledger, 1, size)
        reason = path_rejection(name)
        if reason or size > self.max_bytes:
            self.dropped(ledger, reason or "too_large", size)
            return False
        return True

    def _tar(self, raw, file: InputFile, repo: str, ledger: Ledger) -> Iterator[Document]:
        with tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                rel = f"{file.rel}!{member.name}"
                if not self._admit_member(member.name, member.size, ledger):
                    continue
                try:
                    fh = tar.extractfile(member)
                    data = read_capped(fh, self.max_bytes) if fh else b""
                except GZIP_ERRORS:  # the archive ends inside this member: it is the one lost
                    self.errored(ledger, "truncated_gzip")
                    return
                except (tarfile.TarError, OSError) as exc:
                    self.errored(ledger, _archive_error(exc))
                    return
                doc = self._member(data, rel, repo, ledger)
                if doc is not None:
                    yield doc

    def _zip(self, raw, file: InputFile, repo: str, ledger: Ledger) -> Iterator[Document]:
        with zipfile.ZipFile(raw) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                if info.is_dir():
                    continue
                rel = f"{file.rel}!{info.filename}"
                if not self._admit_member(info.filename, info.file_size, ledger):
                    continue
                try:
                    with zf.open(info) as fh:
                        data = read_capped(fh, self.max_bytes)
                except (zipfile.BadZipFile, zlib.error) as exc:
                    self.errored(ledger, f"corrupt_member:{type(exc).__name__}")
                    continue
                doc = self._member(data, rel, repo, ledger)
                if doc is not None:
                    yield doc



def _archive_error(exc: BaseException) -> str:
    if "unexpected end of data" in str(exc):
        return "truncated_archive"
    return f"corrupt_archive:{type(exc).__name__}"
