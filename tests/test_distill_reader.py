"""engine/distill/reader.py on signal directories written to the documented layout with pyarrow and
safetensors directly (tests/signals_dirs.py): every value comes back, batches pad as the engine
does, checksums and inconsistencies are caught with the file named."""
from __future__ import annotations

import json

import numpy as np
import pytest

from q4k_engine.distill.reader import open_signals, read_manifest
from q4k_engine.errors import FormatError, InputError

from signals_dirs import topk_columns, write_signals


def _rows(rng, n=8, vocab=37):
    out = []
    for _ in range(n):
        t = int(rng.integers(1, 15))
        mask = rng.random(t) < 0.8
        mask[-1] = False
        out.append((rng.integers(0, vocab, t).astype(np.int32), mask, rng.normal(0, 3, (t, vocab)).astype(np.float32)))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_topk_rows_round_trip(tmp_path, rng, dtype):
    rows = _rows(rng)
    k, temperature = int(rng.integers(1, 37)), float(rng.uniform(0.5, 3))
    d = write_signals(tmp_path / "s", rows, "topk", k=k, temperature=temperature, dtype=dtype,
                      shard_rows=int(rng.integers(1, 5)))
    sig = open_signals(d, verify=True)
    assert sig.kind == "topk" and len(sig) == len(rows) and sig.manifest.k == k
    assert sig.manifest.temperature == temperature
    got = list(sig.rows())
    assert [r.row_index for r in got] == list(range(len(rows)))
    for (ids, mask, logits), r in zip(rows, got):
        tid, tlp, ttail = topk_columns(logits, k, temperature)
        np.testing.assert_array_equal(r.input_ids, ids)
        np.testing.assert_array_equal(r.target_mask, mask)
        np.testing.assert_array_equal(r.token_ids, tid)
        np.testing.assert_array_equal(r.logprobs, tlp.astype(dtype))
        np.testing.assert_array_equal(r.tail, ttail)
        assert r.logprobs.dtype == np.dtype(dtype) and r.logits is None


def test_dense_rows_round_trip(tmp_path, rng):
    rows = _rows(rng, n=7)
    sig = open_signals(write_signals(tmp_path / "d", rows, "dense", shard_rows=3), verify=True)
    assert sig.kind == "dense" and [s.file for s in sig.manifest.shards][-1] == "shard-00002.safetensors"
    for (ids, mask, logits), r in zip(rows, sig.rows(), strict=True):
        np.testing.assert_array_equal(r.input_ids, ids)
        np.testing.assert_array_equal(r.target_mask, mask)
        np.testing.assert_array_equal(r.logits, logits)


@pytest.mark.parametrize("kind", ["topk", "dense"])
def test_skipped_rows_keep_their_indices(tmp_path, rng, kind):
    """Bad rows a run skipped (--skip-bad-lines) leave gaps in row_index; shards still cover fixed ranges."""
    rows = _rows(rng, n=6)
    indices = [0, 2, 3, 7, 8, 9]  # rows 1, 4, 5, 6 skipped: shards of 3 indices hold 2, 1, 2, 1 rows
    sig = open_signals(write_signals(tmp_path / kind, rows, kind, indices=indices), verify=True)
    assert len(sig) == 6 and sig.manifest.rows == 10
    assert [s.n_rows for s in sig.manifest.shards] == [2, 1, 2, 1]
    got = list(sig.rows())
    assert [r.row_index for r in got] == indices
    for (ids, _, _), r in zip(rows, got):
        np.testing.assert_array_equal(r.input_ids, ids)


def test_batches_pad_like_the_engine(tmp_path, rng):
    rows = _rows(rng, n=5)
    sig = open_signals(write_signals(tmp_path / "s", rows, "topk", k=4))
    batches = list(sig.batches(2, pad_id=7))
    assert [len(b.row_index) for b in batches] == [2, 2, 1]
    b = batches[0]
    n0, n1 = (len(r[0]) for r in rows[:2])
    t = max(n0, n1)
    assert b.input_ids.shape == (2, t) and b.token_ids.shape == (2, t, 4) and list(b.lengths) == [n0, n1]
    short = int(np.argmin([n0, n1]))
    n = min(n0, n1)
    assert (b.input_ids[short, n:] == 7).all() and not b.attention_mask[short, n:].any()
    assert not b.target_mask[short, n:].any() and (b.token_ids[short, n:] == -1).all()
    assert np.isneginf(b.logprobs[short, n:]).all() and np.isneginf(b.tail[short, n:]).all()
    tt = b.to_torch()
    assert tt["logprobs"].dtype.is_floating_point and tt["token_ids"].shape == (2, t, 4) and "logits" not in tt
    dense = list(open_signals(write_signals(tmp_path / "d", rows, "dense")).batches(3))
    assert dense[1].logits.shape == (2, max(len(r[0]) for r in rows[3:]), 37)
    assert not dense[1].logits[dense[1].attention_mask == 0].any()
    with pytest.raises(InputError, match="batch_size"):
        next(sig.batches(0))


def test_checksum_mismatch_names_the_shard(tmp_path, rng):
    d = write_signals(tmp_path / "s", _rows(rng), "dense")
    shard = d / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one logit's byte: still a valid file
    shard.write_bytes(bytes(data))
    open_signals(d)  # without verify the file opens
    with pytest.raises(FormatError, match="shard-00001.safetensors: sha256 .* does not match"):
        open_signals(d, verify=True)


def test_incomplete_run(tmp_path, rng):
    d = write_signals(tmp_path / "s", _rows(rng), "topk", complete=False)
    with pytest.raises(InputError, match="not complete .* --resume"):
        open_signals(d)
    assert len(list(open_signals(d, allow_incomplete=True).rows())) == 8


def _edit_manifest(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_bad_directories(tmp_path, rng):
    with pytest.raises(InputError, match="no such directory"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(InputError, match="no manifest.json"):
        read_manifest(tmp_path)
    d = write_signals(tmp_path / "s", _rows(rng), "topk", k=5)
    _edit_manifest(d, lambda m: m["shards"][1].update(rows=[4, 6]))
    with pytest.raises(FormatError, match=r"shards\[1\]: rows \[4, 6\] do not continue .* \(next row 3\)"):
        read_manifest(d)
    d = write_signals(tmp_path / "s2", _rows(rng), "topk", k=5)
    _edit_manifest(d, lambda m: m.update(format="other"))
    with pytest.raises(FormatError, match="not a q4k-engine-signals manifest"):
        read_manifest(d)
    d = write_signals(tmp_path / "s3", _rows(rng), "topk", k=5)
    (d / "shard-00002.parquet").unlink()
    with pytest.raises(FormatError, match="shard-00002.parquet: shard listed in the manifest is missing"):
        open_signals(d)


def test_shard_disagreeing_with_its_manifest(tmp_path, rng):
    d = write_signals(tmp_path / "s", _rows(rng), "topk", k=5)
    _edit_manifest(d, lambda m: m["options"].update(k=4))
    with pytest.raises(FormatError, match="shard-00000.parquet: row 0, position 0: 5 target_token_ids, the manifest says k = 4"):
        list(open_signals(d).rows())
    d = write_signals(tmp_path / "d", _rows(rng), "dense")
    _edit_manifest(d, lambda m: m["options"].update(vocab_size=36))
    with pytest.raises(FormatError, match=r"shard-00000.safetensors: logits \[\d+, 37\], expected \[\d+, 36\]"):
        list(open_signals(d).rows())
    d = write_signals(tmp_path / "d2", _rows(rng), "dense")  # shards 0 and 1 swapped in the manifest
    _edit_manifest(d, lambda m: [a.update(file=f) for a, f in zip(m["shards"], ("shard-00001.safetensors",
                                                                              "shard-00000.safetensors"))])
    with pytest.raises(FormatError, match=r"shard-00001.safetensors: stored row 0 has row_index 3, .* rows \[0, 3\)"):
        list(open_signals(d).rows())


@pytest.mark.parametrize("kind", ["topk", "dense"])
def test_round_trip_through_the_writer(tmp_path, rng, kind):
    """Shards written by `q4k-engine logits --out` (engine/distill/shards.py) read back to the
    teacher's own values, with the rows' target masks and indices (a bad row skipped)."""
    import q4k_engine
    from q4k_engine.distill.rows import RowOptions, read_rows
    from q4k_engine.distill.shards import SignalOptions, write_signals as write_shards

    from distill_data import mixed_rows, write_jsonl

    teacher = q4k_engine.load("demo", device="cpu")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, mixed_rows(10, teacher.vocab_size, int(rng.integers(2**31))))
    lines = data.read_text().splitlines()
    lines.insert(4, "not json")  # dataset row 4: skipped
    data.write_text("\n".join(lines) + "\n")
    options = RowOptions(skip_bad_lines=True)
    opts = SignalOptions(kind=kind, k=5, temperature=1.5, shard_rows=3, rows=options)
    write_shards(teacher, data, tmp_path / "out", opts, log=lambda _: None)
    sig = open_signals(tmp_path / "out", verify=True)
    want = list(read_rows(data, teacher, options))
    got = list(sig.rows())
    assert [r.row_index for r in got] == [r.index for r in want] and 4 not in [r.row_index for r in got]
    assert sig.manifest.temperature == (1.5 if kind == "topk" else 1.0)
    for w, r in zip(want, got):
        np.testing.assert_array_equal(r.input_ids, w.input_ids)
        np.testing.assert_array_equal(r.target_mask, w.target_mask)
        if kind == "topk":
            top = teacher.topk_logprobs([w.input_ids], 5, 1.5, tail=True)
            np.testing.assert_array_equal(r.token_ids, top.indices[0])
            np.testing.assert_allclose(r.logprobs, top.values[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(r.tail, top.tail[0], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(r.logits, teacher.logits_per_position([w.input_ids])[0][0], rtol=1e-6, atol=1e-6)
