"""Tokenizers: load a ``tokenizer.json`` or train a byte-level BPE on a sample of the filtered corpus."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.atomic import atomic_path, read_json, write_json


@dataclass
class TokenizerInfo:
    path: str
    fingerprint: str
    vocab_size: int
    eos_id: int
    eos_token: str
    trained: bool

    def to_json(self) -> dict:
        return asdict(self)


class TokenizerError(ValueError):
    pass


def fingerprint(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def describe(tokenizer: Tokenizer, path: Path, eos_token: str, trained: bool) -> TokenizerInfo:
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise TokenizerError(f"tokenize.eos_token: {eos_token!r} is not in the tokenizer's vocabulary ({path})")
    return TokenizerInfo(path=str(path), fingerprint=fingerprint(tokenizer),
                         vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), eos_id=eos_id,
                         eos_token=eos_token, trained=trained)


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"cannot load tokenizer {path}: {exc}") from None


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization), EOS as a special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


SAMPLE_SPREAD = 64        # the sample is spread over at least this many units (when there are that many)
SAMPLE_MAX_FILES = 512    # and never opens more files than this, however small or empty the units are


def sample_order(parquet_files: Iterable[Path]) -> list[Path]:
    """Units in the order of a hash of their id (the file's stem): a fixed, well-mixed order that does not
    depend on how the files were listed."""
    return sorted(parquet_files, key=lambda p: (hashlib.sha256(p.stem.encode()).hexdigest(), p.name))


def sample_texts(parquet_files: list[Path], sample_bytes: int, spread: int = SAMPLE_SPREAD,
                 max_files: int = SAMPLE_MAX_FILES) -> Iterator[str]:
    """A deterministic sample of about ``sample_bytes`` characters: units taken in ``sample_order`` until the
    budget is met, each giving at most ``sample_bytes / min(units, spread)`` (documents in file order).

    The files opened are bounded by the budget (about ``spread`` when units hold more than their share,
    ``budget / unit size`` when they hold less) and by ``max_files``, never by the number of units."""
    files = [p for p in parquet_files if p.exists()]
    if not files or sample_bytes <= 0:
        return
    cap = max(1, -(-sample_bytes // min(len(files), spread)))
    total = 0
    for path in sample_order(files)[:max_files]:
        taken = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=["text"]):
            for text in batch.column("text").to_pylist():
                yield text
                taken += len(text)
                total += len(text)
                if taken >= cap or total >= sample_bytes:
                    break
            if taken >= cap or total >= sample_bytes:
                break
        if total >= sample_bytes:
            return


def train_sample(sample_files: list[Path], sample_bytes: int, vocab_size: int, eos_token: str,
                 min_frequency: int) -> str:
    """Sample and train: the tokenizer's JSON. The runner runs this in a Ray task, not in the driver."""
    return train_bpe(sample_texts(sample_files, sample_bytes), vocab_size, eos_token, min_frequency).to_str()


def prepare_tokenizer(run_dir: Path, tokenizer_path: str | None, eos_token: str, vocab_size: int,
                      min_frequency: int, sample_bytes: int, sample_files: list[Path],
                      train: Callable[..., str] = train_sample) -> TokenizerInfo:
    """The run's tokenizer, stored as ``run_dir/tokenizer/tokenizer.json``; reused as-is on resume.

    ``train`` has ``train_sample``'s signature and result: the runner passes one that runs it in a Ray task."""
    target = run_dir / "tokenizer" / "tokenizer.json"
    info_path = run_dir / "tokenizer" / "info.json"
    if target.exists() and info_path.exists():
        return TokenizerInfo(**read_json(info_path))
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
        with atomic_path(target) as tmp:
            shutil.copyfile(tokenizer_path, tmp)
        trained = False
    else:
        tokenizer = Tokenizer.from_str(train(sample_files, sample_bytes, vocab_size, eos_token, min_frequency))
        with atomic_path(target) as tmp:
            tokenizer.save(str(tmp))
        trained = True
    info = describe(tokenizer, target, eos_token, trained)
    info.path = "tokenizer/tokenizer.json"
    write_json(info_path, info.to_json())
    return info
