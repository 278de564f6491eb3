"""Training data: token streams from shards, deterministic weighted mixture, rank sharding, exact resume,
document boundaries, and clear errors before training."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from pipeline.shards import Manifest, ShardWriter, build_totals
from pipeline.tokenizer import train_bpe
from train.data import DataError, MixtureSampler, RankLoader, load_streams, segments_from_eos

pytestmark = pytest.mark.realdata
EOS = 0


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    """A small pipeline-format run made directly from real text: two book sources and one code source."""
    books = {p.stem: p.read_text() for p in sorted((corpus.root / "books").glob("austen-*.txt"))}
    code = [p.read_text() for p in sorted((corpus.root / "code").rglob("*.py"))]
    docs = {name: [t for t in text.split("\n\n\n") if t.strip()] for name, text in books.items()}
    docs["stdlib"] = code
    tokenizer = train_bpe([t for ds in docs.values() for t in ds], 1024, "<|endoftext|>")
    run = tmp_path_factory.mktemp("run")
    shards = []
    for name, texts in docs.items():
        writer = ShardWriter(run, f"{name}-00000", 1024, EOS, "fp", target_bytes=200_000, batch_rows=50)
        for i, text in enumerate(texts):
            ids = tokenizer.encode(text, add_special_tokens=False).ids + [EOS]
            writer.add(f"{name}{i}", name, "code" if name == "stdlib" else "book", np.array(ids))
        shards += writer.close()
    kinds = {n: ("code" if n == "stdlib" else "book") for n in docs}
    Manifest(1, "cfg", {"fingerprint": "fp", "vocab_size": 1024, "eos_id": EOS}, shards,
             build_totals(shards, kinds)).save(run)
    return run


def test_streams_cover_every_token(run_dir):
    streams, tok = load_streams([run_dir], model_vocab=1024)
    manifest = Manifest.load(run_dir)
    assert {n: s.tokens for n, s in streams.items()} == {n: t["tokens"] for n, t in manifest.totals.items()}
    stream = streams["stdlib"]
    whole = stream.window(0, stream.tokens)
    assert (whole == EOS).sum() == manifest.totals["stdlib"]["rows"] and whole[-1] == EOS
    assert np.array_equal(stream.window(100, 50), whole[100:150])
    assert tok["fingerprint"] == "fp"


def test_mixture_is_deterministic_weighted_and_resumable(run_dir):
    streams, _ = load_streams([run_dir], model_vocab=1024)
    weights = {"austen-persuasion": 3.0, "austen-northangerabbey": 1.0, "stdlib": 0.0}
    a = MixtureSampler(streams, weights, seq_len=64, seed=7)
    b = MixtureSampler(streams, weights, seq_len=64, seed=7)
    first = [a.next() for _ in range(400)]
    assert [(n, w.tolist()) for n, w in first[:50]] == [(n, w.tolist()) for n, w in (b.next() for _ in range(50))]
    counts = {n: sum(1 for s, _ in first if s == n) for n in weights}
    assert counts["stdlib"] == 0 and 2.2 < counts["austen-persuasion"] / counts["austen-northangerabbey"] < 4.2
    # resume: a sampler restored from a saved state continues with exactly the next samples
    saved = copy.deepcopy(a.state)
    expected = [a.next() for _ in range(30)]
    c = MixtureSampler(streams, weights, seq_len=64, seed=7)
    c.state = saved
    assert all(n1 == n2 and np.array_equal(w1, w2) for (n1, w1), (n2, w2) in zip(expected, (c.next() for _ in range(30))))
    other_seed = MixtureSampler(streams, weights, seq_len=64, seed=8)
    assert [w.tolist() for _, w in (other_seed.next() for _ in range(5))] != [w.tolist() for _, w in first[:5]]


def test_ranks_partition_the_global_sample_sequence(run_dir):
    streams, _ = load_streams([run_dir], model_vocab=1024)
    single = RankLoader(MixtureSampler(streams, None, 32, 0), micro_batch=4, rank=0, world=1, eos_id=EOS)
    global_rows = single.next_batch().input_ids
    r0 = RankLoader(MixtureSampler(streams, None, 32, 0), micro_batch=2, rank=0, world=2, eos_id=EOS)
    r1 = RankLoader(MixtureSampler(streams, None, 32, 0), micro_batch=2, rank=1, world=2, eos_id=EOS)
    b0, b1 = r0.next_batch().input_ids, r1.next_batch().input_ids
    assert np.array_equal(b0, global_rows[[0, 2]]) and np.array_equal(b1, global_rows[[1, 3]])


def test_boundaries_segments_and_masked_targets(run_dir):
    tokens = np.array([5, 6, EOS, 7, 8, 9, EOS, 3])
    assert segments_from_eos(tokens, EOS).tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    streams, _ = load_streams([run_dir], model_vocab=1024)
    loader = RankLoader(MixtureSampler(streams, {"stdlib": 1.0}, 512, 0), 2, 0, 1, EOS, pack="boundaries")
    batch = loader.next_batch()
    assert batch.input_ids.shape == batch.targets.shape == batch.segment.shape == (2, 512)
    assert (batch.targets[batch.input_ids == EOS] == -100).all()
    assert (batch.segment[:, 1:] >= batch.segment[:, :-1]).all()
    concat = RankLoader(MixtureSampler(streams, {"stdlib": 1.0}, 512, 0), 2, 0, 1, EOS, pack="concat").next_batch()
    assert (concat.segment == 0).all() and not (concat.targets == -100).any()
    assert np.array_equal(concat.targets[:, :-1], concat.input_ids[:, 1:])  # targets are the next tokens


def test_errors_before_training(run_dir, tmp_path):
    with pytest.raises(DataError, match="shards use a tokenizer with vocab 1,024 but the model's vocab_size is 512"):
        load_streams([run_dir], model_vocab=512)
    with pytest.raises(DataError, match="no manifest.json"):
        load_streams([tmp_path], model_vocab=1024)
    with pytest.raises(DataError, match="no shards for source 'wiki'"):
        load_streams([run_dir], model_vocab=1024, sources={"wiki": 1.0})
    streams, _ = load_streams([run_dir], model_vocab=1024)
    with pytest.raises(DataError, match="no source has at least seq_len"):
        MixtureSampler(streams, None, seq_len=10**9, seed=0)
    with pytest.raises(DataError, match="data.weights: source 'stdlib' has fewer than seq_len"):
        MixtureSampler(streams, {"stdlib": 1.0}, seq_len=streams["stdlib"].tokens, seed=0)
    # by default a source too short for one window is skipped, the others still train
    longest = max(s.tokens for s in streams.values())
    shortest = min(s.tokens for s in streams.values())
    sampler = MixtureSampler(streams, None, seq_len=(shortest + longest) // 2, seed=0)
    assert len(sampler.names) < len(streams)
