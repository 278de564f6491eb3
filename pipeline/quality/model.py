"""A fastText quality classifier: load it (checked before any work starts) and score text with it.

The score of a document is fastText's probability of the configured high-quality label, as DCLM uses
P(``__label__hq``). fastText reads one line at a time, so newlines become spaces; everything else is the
text as stored. Scoring a batch goes through fastText's multi-line predict in one call, so the Python
overhead per document is one ``str.replace``.
"""

from __future__ import annotations

import functools
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.shards import sha256_file


class QualityModelError(ValueError):
    """A quality model that cannot be used; one line naming the file and what is wrong."""


def one_line(text: str, max_chars: int | None = None) -> str:
    """fastText's input form: a single line (and an optional prefix cap for very long documents)."""
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]
    return text.replace("\n", " ").replace("\r", " ")


FASTTEXT_MAGIC = 793712314
SUPERVISED = 3  # fastText's model_name enum: cbow 1, sg 2, sup 3


@dataclass
class FastTextHeader:
    version: int
    dim: int
    word_ngrams: int
    model: int
    words: int
    labels: int
    quantized: bool
    file_bytes: int
    label_names: tuple[str, ...] = ()


def inspect_fasttext_file(path: Path) -> FastTextHeader:
    """Walk a fastText ``.bin``/``.ftz`` file's layout and check that it ends exactly where it should.

    fastText's own loader trusts the sizes it reads: a truncated file can load silently with garbage
    weights, and a corrupt size field makes it allocate until the process is killed. Checking the layout
    first (header, dictionary entries, dense or product-quantized matrices) turns both into a clear error.
    """
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise QualityModelError(f"{path}: quality model file is empty")
        fh.seek(0)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(buf, size, path)


def _walk(buf: mmap.mmap, size: int, path: Path) -> FastTextHeader:
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise QualityModelError(f"{path}: not a complete fastText model (truncated at byte {pos:,} of {size:,})")
        values = struct.unpack_from(fmt, buf, pos)
        pos += n
        return values

    def skip(nbytes: int, what: str) -> None:
        nonlocal pos
        if nbytes < 0 or pos + nbytes > size:
            raise QualityModelError(f"{path}: not a complete fastText model ({what} needs {nbytes:,} bytes at "
                                    f"byte {pos:,}, file has {size:,})")
        pos += nbytes

    def product_quantizer() -> None:
        dim, _nsubq, _dsub, _lastdsub = take("<iiii")
        skip(4 * dim * 256, "product-quantizer centroids")

    def matrix(quantized: bool, what: str) -> None:
        if quantized:
            qnorm, = take("<?")
            rows, _cols = take("<qq")
            codesize, = take("<i")
            skip(codesize, f"{what} codes")
            product_quantizer()
            if qnorm:
                skip(rows, f"{what} norm codes")
                product_quantizer()
        else:
            rows, cols = take("<qq")
            if rows < 0 or cols < 0:
                raise QualityModelError(f"{path}: corrupt fastText model ({what} shape {rows} x {cols})")
            skip(4 * rows * cols, f"{what} matrix")

    magic, version = take("<ii")
    if magic != FASTTEXT_MAGIC:
        raise QualityModelError(f"{path}: not a fastText model (bad magic number)")
    if version not in (11, 12):
        raise QualityModelError(f"{path}: unsupported fastText model version {version}")
    dim, _ws, _epoch, _min_count, _neg, word_ngrams, _loss, model, *_rest = take("<12id")
    n_entries, n_words, n_labels, _ntokens, prune_size = take("<iiiqq")
    if n_entries < 0 or n_words + n_labels != n_entries:
        raise QualityModelError(f"{path}: corrupt fastText dictionary header")
    label_names = []
    for _ in range(n_entries):
        end = buf.find(b"\0", pos)
        if end < 0:
            raise QualityModelError(f"{path}: not a complete fastText model (truncated in the dictionary)")
        start, pos = pos, end + 1
        _count, entry_type = take("<qb")
        if entry_type == 1:  # a label (0: a word)
            label_names.append(bytes(buf[start:end]).decode("utf-8", "replace"))
    skip(8 * max(prune_size, 0), "pruned-word index")
    quantized, = take("<?")
    matrix(quantized, "input")
    quantized_out, = take("<?")
    matrix(quantized and quantized_out, "output")
    if pos != size:
        raise QualityModelError(f"{path}: corrupt fastText model ({size - pos:,} unexpected trailing bytes)")
    return FastTextHeader(version=version, dim=dim, word_ngrams=word_ngrams, model=model, words=n_words,
                          labels=n_labels, quantized=bool(quantized), file_bytes=size, label_names=tuple(label_names))


def check_model_file(path: str | Path, label: str) -> FastTextHeader:
    """Everything ``QualityModel.load`` checks, from the file's layout alone: no fastText load, so a driver
    can check a GB-scale classifier before any work without holding it (the scoring actors load it)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QualityModelError(f"{path}: quality model file not found")
    header = inspect_fasttext_file(path)
    if header.model != SUPERVISED or header.labels == 0:
        raise QualityModelError(f"{path}: a supervised fastText classifier is required (this model has no labels)")
    if label not in header.label_names:
        raise QualityModelError(f"{path}: label {label!r} is not one of the model's labels "
                                f"({_shown(list(header.label_names))})")
    return header


def _shown(labels: list[str]) -> str:
    return ", ".join(labels[:8]) + (f", ... ({len(labels)} labels)" if len(labels) > 8 else "")


@dataclass
class QualityModel:
    path: Path
    label: str
    labels: list[str]
    fasttext_model: object
    header: FastTextHeader
    max_chars: int | None = None

    @classmethod
    def load(cls, path: str | Path, label: str, max_chars: int | None = None) -> QualityModel:
        """Open and check a supervised fastText model; raises ``QualityModelError`` with the reason."""
        import fasttext

        path = Path(path).expanduser()
        header = check_model_file(path, label)
        try:
            model = fasttext.load_model(str(path))
        except (ValueError, RuntimeError, MemoryError) as exc:
            raise QualityModelError(f"{path}: not a readable fastText model ({_first_line(exc)})") from None
        labels = list(model.labels)
        if label not in labels:
            raise QualityModelError(f"{path}: label {label!r} is not one of the model's labels ({_shown(labels)})")
        return cls(path=path, label=label, labels=labels, fasttext_model=model,
                   header=header, max_chars=max_chars)

    @functools.cached_property
    def sha256(self) -> str:
        """The file's digest, computed on first use (the driver records it; scoring actors never need it)."""
        return sha256_file(self.path)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P(label) for each text, as float32 in [0, 1]. An empty text gets the model's prior-like score."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        lines = [one_line(t, self.max_chars) for t in texts]
        try:
            labels, probs = self.fasttext_model.predict(lines, k=-1, threshold=0.0, on_unicode_error="replace")
        except (TypeError, UnicodeError):
            # A lone surrogate (from undecodable input) cannot cross into C++; score the text without it.
            lines = [line.encode("utf-8", "replace").decode("utf-8") for line in lines]
            labels, probs = self.fasttext_model.predict(lines, k=-1, threshold=0.0, on_unicode_error="replace")
        out = np.empty(len(lines), dtype=np.float32)
        for i, (row_labels, row_probs) in enumerate(zip(labels, probs)):
            out[i] = _prob_of(self.label, row_labels, row_probs)
        # fastText's softmax can round a hair past 1 for a saturated label.
        np.clip(out, 0.0, 1.0, out=out)
        return out


def _prob_of(label: str, labels: Sequence[str], probs: Sequence[float]) -> float:
    for name, p in zip(labels, probs):
        if name == label:
            return float(p)
    return 0.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
