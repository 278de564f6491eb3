import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.shards import (
    Manifest,
    ShardReader,
    ShardWriter,
    build_totals,
    sha256_file,
    token_dtype,
    verify_run,
)


def write_docs(run_dir, docs, vocab=65536, target=1 << 20, prefix="u-00000"):
    writer = ShardWriter(run_dir, prefix, vocab, eos_id=0, tokenizer_fingerprint="fp", target_bytes=target,
                         batch_rows=7)
    for i, toks in enumerate(docs):
        writer.add(f"d{i}", "src" if i % 2 else "other", "web", np.asarray(toks))
    return writer.close()


def publish(run_dir, shards):
    manifest = Manifest(1, "cfg", {"fingerprint": "fp", "vocab_size": 65536, "eos_id": 0}, shards,
                        build_totals(shards, {"src": "web", "other": "web"}))
    manifest.save(run_dir)
    return manifest


@pytest.mark.parametrize(("vocab", "dtype"), [(65536, np.uint16), (65537, np.uint32), (200_000, np.uint32)])
def test_token_dtype_by_vocabulary(vocab, dtype):
    assert token_dtype(vocab) == dtype


def test_roundtrip_documents_and_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 65535, size=rng.integers(1, 50)), 0) for _ in range(40)]
    shards = write_docs(tmp_path, docs)
    assert len(shards) == 1 and shards[0].rows == 40
    assert shards[0].tokens == sum(len(d) for d in docs)
    with ShardReader(tmp_path / shards[0].path) as reader:
        assert reader.vocab_size == 65536 and reader.eos_id == 0
        got = [t.copy() for _, _, t in reader.documents()]
        assert all(np.array_equal(a, b) for a, b in zip(got, docs)) and len(got) == len(docs)
        flat_all, ends = [], []
        for flat, offsets in reader.token_batches():
            assert offsets[0] == 0 and offsets[-1] == len(flat)
            assert np.all(flat[offsets[1:] - 1] == 0)  # every document ends with EOS
            flat_all.append(flat.copy())
            ends.extend(np.diff(offsets))
        assert np.array_equal(np.concatenate(flat_all), np.concatenate(docs))
        assert ends == [len(d) for d in docs]


def test_reader_is_zero_copy_on_the_mapped_file(tmp_path):
    shards = write_docs(tmp_path, [np.arange(1, 1000), np.arange(5, 10)])
    with ShardReader(tmp_path / shards[0].path) as reader:
        flat, _ = next(reader.token_batches())
        assert not flat.flags.owndata and not flat.flags.writeable  # a view of the read-only mapping
        assert flat.dtype == np.uint16


def test_uint32_tokens_for_large_vocabularies(tmp_path):
    shards = write_docs(tmp_path, [[70000, 1, 0]], vocab=100_000)
    with ShardReader(tmp_path / shards[0].path) as reader:
        assert reader.documents().__next__()[2].tolist() == [70000, 1, 0]
        assert next(reader.token_batches())[0].dtype == np.uint32


def test_rolls_over_at_target_size_and_names_parts(tmp_path):
    docs = [np.ones(1000) for _ in range(70)]
    shards = write_docs(tmp_path, docs, target=4000)
    assert len(shards) > 3
    assert [s.path for s in shards][:2] == ["shards/u-00000-0000.arrow", "shards/u-00000-0001.arrow"]
    assert sum(s.rows for s in shards) == 70
    assert not list((tmp_path / "shards").glob(".*"))  # no temporary files left behind


def test_same_input_gives_byte_identical_shards(tmp_path):
    docs = [np.arange(i + 2) for i in range(100)]
    a = write_docs(tmp_path / "a", docs, target=2000)
    b = write_docs(tmp_path / "b", docs, target=2000)
    assert [s.sha256 for s in a] == [s.sha256 for s in b]
    assert a[0].sha256 == sha256_file(tmp_path / "a" / a[0].path)


def test_manifest_totals_and_verification(tmp_path):
    shards = write_docs(tmp_path, [np.arange(1, 5)] * 9, target=30)
    manifest = publish(tmp_path, shards)
    loaded = Manifest.load(tmp_path)
    assert loaded.total_rows == 9 and loaded.total_tokens == 36
    assert loaded.totals == {"other": {"kind": "web", "rows": 5, "tokens": 20},
                             "src": {"kind": "web", "rows": 4, "tokens": 16}}
    assert json.loads((tmp_path / "manifest.json").read_text())["total_tokens"] == 36
    assert verify_run(tmp_path) == []

    victim = tmp_path / manifest.shards[-1].path
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    victim.write_bytes(bytes(data))
    (tmp_path / manifest.shards[0].path).unlink()
    (tmp_path / "shards" / "stray.arrow").write_bytes(b"")
    problems = verify_run(tmp_path)
    assert any("sha256 mismatch" in p for p in problems)
    assert any(p.endswith("missing") for p in problems)
    assert any("stray.arrow: not in the manifest" in p for p in problems)


def test_foreign_arrow_file_is_rejected(tmp_path):
    path = tmp_path / "x.arrow"
    table = pa.table({"a": [1, 2]})
    with pa.ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)
    with pytest.raises(ValueError, match="not a jamba-pretrain shard"):
        ShardReader(path)


def test_shard_module_is_light():
    import subprocess
    import sys

    code = "import sys, pipeline.shards; bad = {'ray', 'datatrove', 'torch', 'tokenizers'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_pipeline_does_not_start_or_import_ray():
    import subprocess
    import sys

    code = "import sys, pipeline, pipeline.cli, pipeline.config; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
