"""Consolidated shards without Ray: the pack plan (cuts at document boundaries on a fixed grid, O(shards +
units)) and packing (rows copied in order, bytes that depend only on the rows)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.shards import ShardReader, ShardWriter, pack_shard, shard_schema, verify_run
from pipeline.sources.base import Unit
from pipeline.stages.pack import PackStage, make_plan, read_num_tokens, row_weight
from pipeline.tokenizer import TokenizerInfo

VOCAB, EOS = 1000, 0
TOKENIZER = TokenizerInfo(path="tokenizer/tokenizer.json", fingerprint="fp", vocab_size=VOCAB, eos_id=EOS,
                          eos_token="<eos>", trained=True)


class _TokenDir:
    """Where ``PackStage`` finds unit token files: ``stages/tokenize/<unit>.arrow``, as the tokenize stage writes."""

    def output_path(self, run_dir, unit):
        return run_dir / "stages/tokenize" / f"{unit.id}.arrow"


def unit_files(run_dir, sizes_per_unit, batch_rows=5, seed=0):
    """Token files of units ``u000``... with documents of the given token counts; returns the plan table."""
    rng = np.random.default_rng(seed)
    table, docs = [], []
    for u, sizes in enumerate(sizes_per_unit):
        uid = f"u{u:03d}"
        writer = ShardWriter(run_dir, uid, VOCAB, EOS, "fp", target_bytes=None, batch_rows=batch_rows,
                             directory="stages/tokenize")
        for i, n in enumerate(sizes):
            tokens = np.append(rng.integers(1, VOCAB, size=n - 1), EOS)
            score = None if i % 3 == 0 else float(rng.random())
            writer.add(f"{uid}-{i}", "books" if u % 2 else "code", "book" if u % 2 else "code", tokens, score)
            docs.append((f"{uid}-{i}", tokens, score))
        writer.close()
        table.append((uid, len(sizes), int(sum(row_weight(n, 2) for n in sizes))))
    return table, docs


def pack_all(run_dir, table, target):
    plan = make_plan(table, target, 2, lambda uid: read_num_tokens(run_dir / "stages/tokenize" / f"{uid}.arrow"))
    stage = PackStage(_TokenDir(), TOKENIZER, plan)
    infos = [stage.run_unit(unit, run_dir)["shard"] for unit in stage.shard_units()]
    return plan, infos


def shard_rows(run_dir, infos):
    rows = []
    for info in infos:
        with ShardReader(run_dir / info["path"]) as reader:
            scores = reader.quality_scores()
            for (doc_id, _kind, tokens), score in zip(reader.documents(), scores):
                rows.append((doc_id, tokens.copy(), None if np.isnan(score) else float(score)))
    return rows


def test_plan_cuts_at_document_boundaries_about_the_target(tmp_path):
    rng = np.random.default_rng(1)
    sizes = [list(rng.integers(5, 200, size=rng.integers(0, 30))) for _ in range(40)]
    sizes[3] = []                      # a unit whose documents were all dropped: no file, no piece
    sizes[7] = [8000]                  # a document larger than the target: more than a shard
    table, docs = unit_files(tmp_path, [s for s in sizes], batch_rows=7)
    (tmp_path / "stages/tokenize/u003.arrow").unlink(missing_ok=True)
    target = 12000
    plan, infos = pack_all(tmp_path, table, target)
    weights = {uid: row_weight(read_num_tokens(tmp_path / f"stages/tokenize/{uid}.arrow"), 2)
               for uid, rows, _ in table if rows}
    shard_weights = [sum(int(weights[uid][a:b].sum()) for uid, a, b in s["pieces"]) for s in plan["shards"]]
    assert len(plan["shards"]) < len(table) and len(plan["shards"]) > 5
    assert all(w >= target for w in shard_weights[:-1])               # each shard (but the last) reaches it
    largest_row = max(int(w.max()) for w in weights.values())
    assert all(w < target + largest_row for w in shard_weights)        # ... and passes it by less than a row
    assert any(len({uid for uid, _, _ in s["pieces"]}) > 2 for s in plan["shards"])   # spans several units
    assert sum(len(s["pieces"]) for s in plan["shards"]) <= len(table) + len(plan["shards"])
    assert [s["name"] for s in plan["shards"][:2]] == ["shard-000000", "shard-000001"]
    # every document once, in unit order then file order, scores (and nulls) carried
    got = shard_rows(tmp_path, infos)
    assert [d for d, _, _ in got] == [d for d, _, _ in docs]
    assert all(np.array_equal(a, b) for (_, a, _), (_, b, _) in zip(got, docs))
    assert [s for _, _, s in got] == pytest.approx([s for _, _, s in docs], nan_ok=True)
    assert sum(i["rows"] for i in infos) == len(docs)


def test_plan_depends_only_on_the_data(tmp_path):
    table, _ = unit_files(tmp_path, [[50] * 10, [30] * 7, [80] * 3])
    read = lambda uid: read_num_tokens(tmp_path / "stages/tokenize" / f"{uid}.arrow")  # noqa: E731
    plan = make_plan(table, 300, 2, read)
    assert make_plan(list(reversed(table)), 300, 2, read) == plan   # however the units are listed
    assert make_plan([], 300, 2, read)["shards"] == []
    with pytest.raises(ValueError, match="does not match its marker"):
        make_plan([(table[0][0], table[0][1], table[0][2] + 1), *table[1:]], 300, 2, read)


def test_packed_bytes_depend_only_on_the_rows(tmp_path):
    """Packing the same documents from token files batched differently gives byte-identical shards, equal to
    the shard ShardWriter writes from those documents directly."""
    sizes = [[40, 3, 17, 90, 5, 5, 61], [12] * 9, [7, 300, 2]]
    table, docs = unit_files(tmp_path / "a", sizes, batch_rows=2, seed=5)
    unit_files(tmp_path / "b", sizes, batch_rows=4, seed=5)
    _, a = pack_all(tmp_path / "a", table, 1 << 20)
    _, b = pack_all(tmp_path / "b", table, 1 << 20)
    assert len(a) == 1 and a[0]["sha256"] == b[0]["sha256"]
    writer = ShardWriter(tmp_path / "c", "shard", VOCAB, EOS, "fp", target_bytes=None)
    for (doc_id, tokens, score), uid in zip(docs, [f"u{u:03d}" for u, s in enumerate(sizes) for _ in s]):
        u = int(uid[1:])
        writer.add(doc_id, "books" if u % 2 else "code", "book" if u % 2 else "code", tokens, score)
    assert writer.close()[0].sha256 == a[0]["sha256"]
    # small record batches: the same rule cuts them, whatever the sources' batching
    schema = shard_schema(VOCAB, EOS, "fp")
    pieces = [(tmp_path / "a/stages/tokenize" / f"{uid}.arrow", 0, rows) for uid, rows, _ in table]
    small_a = pack_shard(tmp_path / "a", pieces, "shards/small.arrow", schema, batch_rows=3, batch_bytes=100)
    pieces_b = [(tmp_path / "b/stages/tokenize" / f"{uid}.arrow", 0, rows) for uid, rows, _ in table]
    small_b = pack_shard(tmp_path / "b", pieces_b, "shards/small.arrow", schema, batch_rows=3, batch_bytes=100)
    assert small_a.sha256 == small_b.sha256 != a[0]["sha256"]
    with ShardReader(tmp_path / "a/shards/small.arrow") as reader:
        batches = [len(offsets) - 1 for _, offsets in reader.token_batches()]
    assert max(batches) <= 3 and sum(batches) == len(docs) and len(batches) > len(docs) // 3


def test_pack_refuses_a_token_file_of_another_tokenizer_and_leaves_nothing(tmp_path):
    table, _ = unit_files(tmp_path, [[10, 10]])
    other = shard_schema(VOCAB, EOS, "other-fingerprint")
    with pytest.raises(ValueError, match="schema or tokenizer differs"):
        pack_shard(tmp_path, [(tmp_path / "stages/tokenize/u000.arrow", 0, 2)], "shards/x.arrow", other)
    with pytest.raises(ValueError, match="the plan needs rows up to 5"):
        pack_shard(tmp_path, [(tmp_path / "stages/tokenize/u000.arrow", 0, 5)], "shards/x.arrow",
                   shard_schema(VOCAB, EOS, "fp"))
    assert not list((tmp_path / "shards").iterdir())   # no temporary file left


def test_packed_shards_verify_and_feed_the_trainer(tmp_path):
    """A shard mixes units and sources, a record batch never mixes sources (the trainer streams each source
    by record batch)."""
    from pipeline.shards import Manifest, ShardInfo, build_totals
    from train.data import load_streams

    table, _ = unit_files(tmp_path, [[20] * 12, [33] * 5, [9] * 30, [15] * 4])
    _, infos = pack_all(tmp_path, table, 3000)
    shards = [ShardInfo(**i) for i in infos]
    manifest = Manifest(2, "cfg", {"fingerprint": "fp", "vocab_size": VOCAB, "eos_id": EOS}, shards,
                        build_totals(shards, {"books": "book", "code": "code"}))
    manifest.save(tmp_path)
    assert verify_run(tmp_path) == []
    assert any(len(s.sources) == 2 for s in shards)
    for info in infos:
        with ShardReader(tmp_path / info["path"]) as reader:
            assert all(len(set(b.column("source").to_pylist())) == 1 for b in reader.batches())
    streams, _ = load_streams([tmp_path], model_vocab=VOCAB)
    assert {n: s.tokens for n, s in streams.items()} == {n: t["tokens"] for n, t in manifest.totals.items()}
    whole = streams["code"].window(0, streams["code"].tokens)
    assert (whole == EOS).sum() == manifest.totals["code"]["rows"]
    assert Unit(id="shard-000000", source="", kind="") in PackStage(_TokenDir(), TOKENIZER, {"shards": [
        {"name": "shard-000000", "pieces": []}]}).shard_units()
