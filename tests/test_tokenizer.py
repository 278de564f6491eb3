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


def _units(tmp_path, count: int, docs: int, chars: int) -> list:
    files = []
    for u in range(count):
        path = tmp_path / f"u{u:05d}.parquet"
        write_documents(path, (make_document(f"unit {u} document {i} ".ljust(chars, "x"), "s", "web", f"{u}-{i}")
                               for i in range(docs)))
        files.append(path)
    return files


def test_sampling_opens_a_bounded_number_of_units_deterministically(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    files = _units(tmp_path, 300, docs=10, chars=1000)            # 10,000 characters per unit
    opened: list = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    budget = 200_000                                              # 64 units of 3,125 characters
    sample = list(sample_texts(files, budget))
    assert len(opened) == len(set(opened)) <= 64 and sum(map(len, sample)) >= budget
    assert max(sum(t.startswith(f"unit {int(p.stem[1:])} ") for t in sample) for p in opened) <= 4   # capped
    first = list(opened)
    opened.clear()
    assert list(sample_texts(list(reversed(files)), budget)) == sample and opened == first   # however listed
    opened.clear()
    everything = list(sample_texts(files, 10**9, max_files=50))   # a budget beyond the corpus: a hard cap
    assert len(opened) == 50 and len(everything) == 500
    opened.clear()
    few = list(sample_texts(files[:3], 9_000))                   # fewer units than the spread: equal shares
    assert len(opened) == 3 and len(few) == 9


@pytest.mark.slow
def test_training_in_a_ray_task_gives_the_same_tokenizer(texts, tmp_path):
    """The runner trains in a Ray task (not the driver); for the same sample the tokenizer file is the one
    training in-process writes, byte for byte."""
    import types

    from pipeline.runner import PipelineRun, init_ray, shutdown_ray
    from pipeline.tokenizer import train_sample

    files = []
    for part in range(3):
        files.append(tmp_path / f"unit{part}.parquet")
        write_documents(files[-1], (make_document(t, "s", "book", f"{part}-{i}")
                                    for i, t in enumerate(texts[part::3])))
    local = prepare_tokenizer(tmp_path / "local", None, "<|endoftext|>", 700, 2, 400_000, files)
    direct = train_bpe(sample_texts(files, 400_000), 700, "<|endoftext|>", 2)
    direct.save(str(tmp_path / "direct.json"))
    init_ray(None, 2)
    try:
        runner = types.SimpleNamespace(config=types.SimpleNamespace(run=types.SimpleNamespace(max_task_retries=0)),
                                       wall_seconds={})
        remote = prepare_tokenizer(tmp_path / "remote", None, "<|endoftext|>", 700, 2, 400_000, files,
                                   train=lambda *a: PipelineRun._train_tokenizer(runner, *a))
    finally:
        shutdown_ray()
    assert remote == local and "tokenizer_training" in runner.wall_seconds
    assert (tmp_path / "remote/tokenizer/tokenizer.json").read_bytes() == \
        (tmp_path / "local/tokenizer/tokenizer.json").read_bytes() == (tmp_path / "direct.json").read_bytes()
    assert train_sample(files, 400_000, 700, "<|endoftext|>", 2) == direct.to_str()
