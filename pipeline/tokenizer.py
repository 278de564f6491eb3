"""Tokenizers: load a ``tokenizer.json`` or train a byte-level BPE on a sample of the filtered corpus."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Iterator
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


def sample_texts(parquet_files: list[Path], sample_bytes: int) -> Iterator[str]:
    """A deterministic sample: an equal byte budget per unit file, documents in file order."""
    files = [p for p in parquet_files if p.exists()]
    if not files:
        return
    budget = max(1, sample_bytes // len(files))
    for path in files:
        taken = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=["text"]):
            for text in batch.column("text").to_pylist():
                yield text
                taken += len(text)
                if taken >= budget:
                    break
            if taken >= budget:
                break


def prepare_tokenizer(run_dir: Path, tokenizer_path: str | None, eos_token: str, vocab_size: int,
                      min_frequency: int, sample_bytes: int, sample_files: list[Path]) -> TokenizerInfo:
    """The run's tokenizer, stored as ``run_dir/tokenizer/tokenizer.json``; reused as-is on resume."""
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
        tokenizer = train_bpe(sample_texts(sample_files, sample_bytes), vocab_size, eos_token, min_frequency)
        with atomic_path(target) as tmp:
            tokenizer.save(str(tmp))
        trained = True
    info = describe(tokenizer, target, eos_token, trained)
    info.path = "tokenizer/tokenizer.json"
    write_json(info_path, info.to_json())
    return info
