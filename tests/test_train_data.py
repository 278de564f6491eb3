"""Training data: token streams from shards, keyed permutations, the block mixture (exact weights, each
window once per epoch, sample i from i alone), rank sharding, exact resume, bounded open shards, document
boundaries, and clear errors before training."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

import train.data as data
from pipeline.shards import Manifest, ShardWriter, build_totals
from pipeline.tokenizer import train_bpe
from train.data import DataError, MixtureSampler, RankLoader, SamplerState, load_streams, segments_from_eos

pytestmark = pytest.mark.realdata
EOS = 0


def _texts(corpus) -> dict[str, list[str]]:
    books = {p.stem: p.read_text() for p in sorted((corpus.root / "books").glob("austen-*.txt"))}
    docs = {name: [t for t in text.split("\n\n\n") if t.strip()] for name, text in books.items()}
    docs["stdlib"] = [p.read_text() for p in sorted((corpus.root / "code").rglob("*.py"))]
    return docs


def _write_run(run: Path, docs: dict[str, list[str]], tokenizer, target_bytes: int, batch_rows: int) -> Path:
    shards = []
    for name, texts in docs.items():
        writer = ShardWriter(run, f"{name}-00000", 1024, EOS, "fp", target_bytes=target_bytes, batch_rows=batch_rows)
        for i, text in enumerate(texts):
            ids = tokenizer.encode(text, add_special_tokens=False).ids + [EOS]
            writer.add(f"{name}{i}", name, "code" if name == "stdlib" else "book", np.array(ids))
        shards += writer.close()
    kinds = {n: ("code" if n == "stdlib" else "book") for n in docs}
    Manifest(1, "cfg", {"fingerprint": "fp", "vocab_size": 1024, "eos_id": EOS}, shards,
             build_totals(shards, kinds)).save(run)
    return run


@pytest.fixture(scope="module")
def tokenizer_and_docs(corpus):
    docs = _texts(corpus)
    return train_bpe([t for ds in docs.values() for t in ds], 1024, "<|endoftext|>"), docs


@pytest.fixture(scope="module")
def run_dir(tokenizer_and_docs, tmp_path_factory) -> Path:
    """A small pipeline-format run made directly from real text: two book sources and one code source."""
    tokenizer, docs = tokenizer_and_docs
    return _write_run(tmp_path_factory.mktemp("run"), docs, tokenizer, target_bytes=200_000, batch_rows=50)


# ------------------------------------------------------------------------------------------- permute
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 13, 31, 61, 64, 97, 127, 128, 129, 1000, 4096, 4099,
                               65535, 65536, 65537, 1 << 20, 1_000_003])
def test_permute_is_a_bijection(n):
    for key in (0, 1, 2**64 - 1):
        out = data.permute(np.arange(n), n, key)
        assert out.dtype == np.uint64 and np.array_equal(np.sort(out), np.arange(n))


def test_permute_many_sizes_mixed_in_one_call_deterministic_and_keyed():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 3000, 150)
    # one call over all sizes at once, each element its own n and key: the loader's case (sources differ)
    index = np.concatenate([np.arange(n) for n in sizes])
    n = np.repeat(sizes, sizes)
    key = np.repeat(np.arange(len(sizes), dtype=np.uint64) * 7919, sizes)
    out = data.permute(index, n, key)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for i, size in enumerate(sizes):
        part = out[bounds[i]:bounds[i + 1]]
        assert np.array_equal(np.sort(part), np.arange(size))
        if i < 10:   # the same as a call on that size alone
            assert np.array_equal(part, data.permute(np.arange(size), int(size), i * 7919))
    assert np.array_equal(data.permute(np.arange(1000), 1000, 5), data.permute(np.arange(1000), 1000, 5))
    # different keys give unrelated permutations: as many agreements as two random ones (~1), not more
    a, b = data.permute(np.arange(10_000), 10_000, 1), data.permute(np.arange(10_000), 10_000, 2)
    assert (a == b).sum() < 20
    # and they shuffle: position hardly correlates with index, for a power of two and a size just above one
    for size in (1 << 16, (1 << 16) + 1):
        assert abs(np.corrcoef(np.arange(size), data.permute(np.arange(size), size, 9).astype(np.float64))[0, 1]) < 0.02


def test_permute_at_a_huge_size():
    n = 10**12 + 39
    x = np.arange(n - 1_000_000, n, dtype=np.uint64)   # the top of the domain, where a bad mask would show
    out = data.permute(x, n, 3)
    assert out.max() < n and len(np.unique(out)) == len(x)
    assert out.min() < n // 2   # spread over the whole domain, not clustered near the inputs
    with pytest.raises(ValueError, match="index out of range"):
        data.permute(n, n, 3)


# ------------------------------------------------------------------------------------------- streams
def test_streams_cover_every_token(run_dir):
    streams, tok = load_streams([run_dir], model_vocab=1024)
    manifest = Manifest.load(run_dir)
    assert {n: s.tokens for n, s in streams.items()} == {n: t["tokens"] for n, t in manifest.totals.items()}
    stream = streams["stdlib"]
    whole = stream.window(0, stream.tokens)
    assert (whole == EOS).sum() == manifest.totals["stdlib"]["rows"] and whole[-1] == EOS
    assert np.array_equal(stream.window(100, 50), whole[100:150])
    # a window across every piece boundary equals the slice of the whole stream
    for start in stream.piece_start[1:-1]:
        assert np.array_equal(stream.window(int(start) - 7, 20), whole[start - 7:start + 13])
    assert tok["fingerprint"] == "fp"
    with pytest.raises(IndexError):
        stream.window(stream.tokens - 5, 10)
    # a record batch's tokens are decoded once per open shard, not per window read
    reader = stream.readers.get(stream.files[0])
    assert reader.batch_tokens(0)[0] is reader.batch_tokens(0)[0]


def test_repeated_stream_wraps_around(run_dir):
    streams, _ = load_streams([run_dir], model_vocab=1024)
    stream = streams["austen-persuasion"]
    whole = stream.window(0, stream.tokens)
    three = stream.repeated(3)
    assert three.tokens == 3 * stream.tokens and len(three.piece_start) == len(stream.piece_start)
    assert np.array_equal(three.window(stream.tokens - 10, 25), np.concatenate([whole[-10:], whole[:15]]))
    assert np.array_equal(three.window(2 * stream.tokens + 33, 40), whole[33:73])
    with pytest.raises(IndexError):
        three.window(3 * stream.tokens - 1, 2)


def _mapped_shards(run: Path) -> set[str]:
    """Shard files of ``run`` mapped into this process now."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if str(run) in line and line.endswith(".arrow")}


def test_open_shards_are_bounded(tokenizer_and_docs, tmp_path):
    tokenizer, docs = tokenizer_and_docs
    books = [t for name, texts in docs.items() if name != "stdlib" for t in texts]   # chapters
    run = _write_run(tmp_path, {"books": books}, tokenizer, target_bytes=20_000, batch_rows=2)
    shards = len(Manifest.load(run).shards)
    assert shards >= 20
    rng = np.random.default_rng(0)
    for bound in (3, 1000):
        streams, _ = load_streams([run], model_vocab=1024, max_open_shards=bound)
        stream = streams["books"]
        assert _mapped_shards(run) == set()   # indexing closed every shard it opened
        seen: set[str] = set()
        peak = 0
        for start in rng.integers(0, stream.tokens - 300, 400):
            stream.window(int(start), 300)
            mapped = _mapped_shards(run)
            seen |= mapped
            peak = max(peak, len(mapped))
        assert len(seen) == shards   # the reads touched every shard ...
        assert peak == min(bound, shards)   # ... with at most `bound` mapped at any time
        stream.readers.close()
        assert _mapped_shards(run) == set()


# ------------------------------------------------------------------------------------------- mixture
def test_apportion_is_exact_to_one_part():
    weights = np.array([3.0, 1.0, 0.0, 1e-9, 2.5])
    counts = data.apportion(weights, 1 << 16)
    assert counts.sum() == 1 << 16 and counts[2] == 0
    assert (np.abs(counts / (1 << 16) - weights / weights.sum()) < 1 / (1 << 16)).all()
    assert data.apportion(np.array([1.0, 1.0, 1.0]), 4).tolist() == [2, 1, 1]


def test_mixture_is_deterministic_weighted_and_resumable(run_dir):
    streams, _ = load_streams([run_dir], model_vocab=1024)
    weights = {"austen-persuasion": 3.0, "austen-northangerabbey": 1.0, "stdlib": 0.0}
    a = MixtureSampler(streams, weights, seq_len=64, seed=7)
    b = MixtureSampler(streams, weights, seq_len=64, seed=7)
    first = [a.next() for _ in range(400)]
    assert [(n, w.tolist()) for n, w in first[:50]] == [(n, w.tolist()) for n, w in (b.next() for _ in range(50))]
    counts = {n: sum(1 for s, _ in first if s == n) for n in weights}
    assert counts["stdlib"] == 0 and 2.2 < counts["austen-persuasion"] / counts["austen-northangerabbey"] < 4.2
    # every block of 2^16 samples holds exactly 3/4 and 1/4 of them
    names = np.array(a.names)
    for block in (0, 1, 12345):
        where = a.locate(np.arange(block << 16, (block + 1) << 16))
        got = {n: int((names[where.source] == n).sum()) for n in weights}
        assert got == {"austen-persuasion": 49152, "austen-northangerabbey": 16384, "stdlib": 0}
    # resume: a sampler restored from a saved state continues with exactly the next samples
    saved = copy.deepcopy(a.state)
    expected = [a.next() for _ in range(30)]
    c = MixtureSampler(streams, weights, seq_len=64, seed=7)
    c.state = saved
    assert all(n1 == n2 and np.array_equal(w1, w2) for (n1, w1), (n2, w2) in zip(expected, (c.next() for _ in range(30))))
    other_seed = MixtureSampler(streams, weights, seq_len=64, seed=8)
    assert [w.tolist() for _, w in (other_seed.next() for _ in range(5))] != [w.tolist() for _, w in first[:5]]


def test_every_window_once_per_epoch(run_dir):
    streams, _ = load_streams([run_dir], model_vocab=1024)
    sampler = MixtureSampler(streams, None, seq_len=64, seed=3)
    m = {n: sampler.slots[n] for n in sampler.names}
    assert all(v > 0 for v in m.values()) and sum(m.values()) == sampler.block
    blocks = max(math.ceil(2 * sampler.n_windows[n] / m[n]) for n in sampler.names)   # two epochs of each
    where = sampler.locate(np.arange(blocks * sampler.block))
    for s, name in enumerate(sampler.names):
        n = sampler.n_windows[name]
        mine = where.source == s
        draws, windows = where.draw[mine], where.window[mine]
        # the source's draws are numbered 0, 1, ... without gap or repeat ...
        assert np.array_equal(np.sort(draws), np.arange(blocks * m[name]))
        windows = windows[np.argsort(draws)]
        epochs = len(windows) // n
        assert epochs >= 2
        # ... and each epoch's n draws are the n windows, each once, in a new order
        for e in range(epochs):
            assert np.array_equal(np.sort(windows[e * n:(e + 1) * n]), np.arange(n)), (name, e)
        assert not np.array_equal(windows[:n], windows[n:2 * n])


def test_ranks_partition_the_global_sample_sequence(run_dir):
    streams, _ = load_streams([run_dir], model_vocab=1024)
    single = RankLoader(MixtureSampler(streams, None, 32, 0), micro_batch=12, rank=0, world=1, eos_id=EOS)
    global_rows = np.concatenate([single.next_batch().input_ids for _ in range(2)])   # samples 0..23
    for world in (2, 3, 4):
        loaders = [RankLoader(MixtureSampler(streams, None, 32, 0), 12 // world, r, world, EOS) for r in range(world)]
        for step in range(2):
            for r, loader in enumerate(loaders):
                rows = loader.next_batch().input_ids
                indices = [step * 12 + r + world * t for t in range(12 // world)]
                assert np.array_equal(rows, global_rows[indices]), (world, r, step)


def test_a_rank_computes_only_its_own_samples_at_any_point(run_dir, monkeypatch):
    streams, _ = load_streams([run_dir], model_vocab=1024)
    world, rank, micro = 1_000_000, 12_345, 2
    sampler = MixtureSampler(streams, None, 32, 0)
    sampler.state = SamplerState(drawn=10**12)   # step 500,000 of a million-rank run
    permuted, reads = [], []
    real_permute, real_read = data.permute, data.SourceStream.read_into
    monkeypatch.setattr(data, "permute", lambda i, n, k: permuted.append(np.size(i)) or real_permute(i, n, k))
    monkeypatch.setattr(data.SourceStream, "read_into", lambda self, s, out: reads.append(s) or real_read(self, s, out))
    batch = RankLoader(sampler, micro, rank, world, EOS).next_batch()
    # one permutation of the block slots and one of the windows, over this rank's two samples only
    assert permuted == [micro, micro] and len(reads) == micro
    assert sampler.state.drawn == 10**12 + world * micro
    # the same rows as global samples 10^12 + r and 10^12 + r + w taken one at a time by a single rank
    monkeypatch.undo()
    one = MixtureSampler(streams, None, 32, 0)
    for t in range(micro):
        one.state = SamplerState(drawn=10**12 + rank + world * t)
        assert np.array_equal(RankLoader(one, 1, 0, 1, EOS).next_batch().input_ids[0], batch.input_ids[t])
    # samples that far in are still windows of their source, in the exact block mixture
    block = 10**12 // sampler.block
    where = sampler.locate(np.arange(block * sampler.block, (block + 1) * sampler.block))
    names = np.array(sampler.names)
    assert {n: int((names[where.source] == n).sum()) for n in sampler.names} == sampler.slots
    assert (where.window < np.array([sampler.n_windows[n] for n in names[where.source]])).all()
    for s, name in enumerate(sampler.names):   # and they are that block's draws of each source
        m = sampler.slots[name]
        assert np.array_equal(np.sort(where.draw[where.source == s]), np.arange(block * m, (block + 1) * m))


def test_loader_resumes_exactly_from_a_saved_state(run_dir):
    streams, _ = load_streams([run_dir], model_vocab=1024)
    weights = {"austen-persuasion": 1.0, "austen-northangerabbey": 1.0, "stdlib": 2.0}
    loader = RankLoader(MixtureSampler(streams, weights, 48, 11), micro_batch=3, rank=1, world=2, eos_id=EOS)
    for _ in range(4):
        loader.next_batch()
    saved = asdict(loader.sampler.state)   # what the engine puts in a checkpoint
    expected = [loader.next_batch() for _ in range(3)]
    resumed = RankLoader(MixtureSampler(streams, weights, 48, 11), 3, 1, 2, EOS)
    resumed.sampler.state = SamplerState(**saved)
    for want, got in zip(expected, (resumed.next_batch() for _ in range(3))):
        assert want.sources == got.sources
        for field in ("input_ids", "targets", "segment"):
            assert np.array_equal(getattr(want, field), getattr(got, field))


def test_boundaries_segments_and_masked_targets(run_dir):
    tokens = np.array([5, 6, EOS, 7, 8, 9, EOS, 3])
    assert segments_from_eos(tokens, EOS).tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert segments_from_eos(np.stack([tokens, tokens[::-1]]), EOS)[1].tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    streams, _ = load_streams([run_dir], model_vocab=1024)
    loader = RankLoader(MixtureSampler(streams, {"stdlib": 1.0}, 512, 0), 2, 0, 1, EOS, pack="boundaries")
    batch = loader.next_batch()
    assert batch.input_ids.shape == batch.targets.shape == batch.segment.shape == (2, 512)
    assert batch.input_ids.dtype == batch.targets.dtype == batch.segment.dtype == np.int64
    assert (batch.targets[batch.input_ids == EOS] == -100).all()
    assert (batch.segment[:, 1:] >= batch.segment[:, :-1]).all()
    assert batch.segment[:, -1].tolist() == [(row[:-1] == EOS).sum() for row in batch.input_ids]
    concat = RankLoader(MixtureSampler(streams, {"stdlib": 1.0}, 512, 0), 2, 0, 1, EOS, pack="concat").next_batch()
    assert (concat.segment == 0).all() and not (concat.targets == -100).any()
    assert np.array_equal(concat.targets[:, :-1], concat.input_ids[:, 1:])  # targets are the next tokens
    # each row is a window of the stream: seq_len + 1 tokens at a multiple of seq_len + 1
    whole = streams["stdlib"].window(0, streams["stdlib"].tokens)
    sampler = MixtureSampler(streams, {"stdlib": 1.0}, 512, 0)
    for t in range(2):
        start = int(sampler.locate(t).window[0]) * 513
        assert np.array_equal(concat.input_ids[t], whole[start:start + 512])
        assert np.array_equal(concat.targets[t], whole[start + 1:start + 513])


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
    assert sum(sampler.slots.values()) == sampler.block


def test_context_parallel_ranks_take_contiguous_chunks_of_the_same_packed_samples(run_dir):
    """The cp ranks of a replica read the replica's samples and keep their columns; concatenated they are the
    replica's batch, document ids included (consistent across the cut), with a document crossing a cut."""
    streams, _ = load_streams([run_dir], model_vocab=1024)
    whole = RankLoader(MixtureSampler(streams, None, 64, 5), micro_batch=3, rank=1, world=2, eos_id=EOS)
    parts = [RankLoader(MixtureSampler(streams, None, 64, 5), 3, 1, 2, EOS, cp_rank=c, cp_size=4) for c in range(4)]
    crossed = False
    for _ in range(3):
        want = whole.next_batch()
        got = [p.next_batch() for p in parts]
        for field in ("input_ids", "targets", "segment"):
            assert all(getattr(g, field).shape == (3, 16) for g in got)
            assert np.array_equal(np.concatenate([getattr(g, field) for g in got], axis=1), getattr(want, field))
        crossed |= bool((want.segment[:, 15] == want.segment[:, 16]).any())
        assert all(g.sources == want.sources for g in got)
    assert crossed
    assert all(p.sampler.state == whole.sampler.state for p in parts)   # every cp rank advances the same state
    with pytest.raises(DataError, match="parallel.cp_size: 3 must divide data.seq_len 64"):
        RankLoader(MixtureSampler(streams, None, 64, 5), 3, 1, 2, EOS, cp_rank=0, cp_size=3)
