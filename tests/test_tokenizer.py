from __future__ import annotations

import pytest

from pipeline.document import make_document, write_documents
from pipeline.tokenizer import TokenizerError, load_tokenizer, prepare_tokenizer, sample_texts, train_bpe
from tests.conftest import run_cli

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    book = (corpus.root / "books/austen-persuasion.txt").read_text()
    code = [p.read_text() for p in sorted((corpus.root / "code").rglob("*.py"))]
    return [p for p in book.split("\n\n") if p.strip()] + code


def test_training_is_deterministic_and_round_trips(texts):
    a = train_bpe(texts, 1024, "<|endoftext|>")
    b = train_bpe(texts, 1024, "<|endoftext|>")
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 1024 and a.token_to_id("<|endoftext|>") == 0
    for text in texts[:50] + ["naïve café — 東京 🙂"]:
        ids = a.encode(text, add_special_tokens=False).ids
        assert a.decode(ids) == text


def test_prepare_trains_once_then_reuses(texts, tmp_path):
    parquet = tmp_path / "u.parquet"
    write_documents(parquet, (make_document(t, "s", "book", str(i)) for i, t in enumerate(texts)))
    assert sum(1 for _ in sample_texts([parquet], 10_000)) < len(texts)
    info = prepare_tokenizer(tmp_path / "run", None, "<|endoftext|>", 512, 2, 1 << 20, [parquet])
    assert info.trained and info.vocab_size == 512 and info.eos_id == 0
    again = prepare_tokenizer(tmp_path / "run", None, "<|endoftext|>", 4096, 2, 1 << 20, [parquet])
    assert again == info  # resume: the stored tokenizer, not a new one


def test_external_tokenizer_json_and_missing_eos(texts, tmp_path):
    tok = train_bpe(texts, 600, "</s>")
    tok.save(str(tmp_path / "tokenizer.json"))
    info = prepare_tokenizer(tmp_path / "run", str(tmp_path / "tokenizer.json"), "</s>", 0, 2, 0, [])
    assert not info.trained and info.vocab_size == 600
    assert load_tokenizer(tmp_path / "run" / info.path).to_str() == tok.to_str()
    with pytest.raises(TokenizerError, match="tokenize.eos_token: '<eos>' is not in the tokenizer"):
        prepare_tokenizer(tmp_path / "run2", str(tmp_path / "tokenizer.json"), "<eos>", 0, 2, 0, [])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path / "broken.json")


def test_train_tokenizer_cli(corpus, tmp_path):
    out = tmp_path / "tok.json"
    proc = run_cli("train-tokenizer", str(corpus.root / "books/austen-persuasion.txt"), "--output", str(out),
                   "--vocab-size", "700")
    assert proc.returncode == 0, proc.stderr
    assert "vocab 700" in proc.stdout and load_tokenizer(out).get_vocab_size() == 700
