"""The provider API: q4k_engine.load(...) -> TeacherModel, on the cpu device with synthetic models."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import q4k_engine
from q4k_engine import DeviceError, InputError, UnsupportedError
from q4k_engine.convert import save_model
from q4k_engine.synthetic import synthetic_model, write_synthetic

from q4k_engine.gpu import probe


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, module_seed):
    path = write_synthetic(tmp_path_factory.mktemp("m") / "qwen2.gguf", "qwen2", "gguf", seed=module_seed)
    return q4k_engine.load(path, device="cpu")


def random_batch(rng, vocab: int, lengths=(9, 1, 17, 4)) -> list[list[int]]:
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_basics(teacher):
    assert teacher.device == "cpu"
    assert teacher.vocab_size == teacher.config.vocab_size == 433
    assert "qwen2" in repr(teacher)


def test_last_position_and_per_position_agree(teacher, rng):
    batch = random_batch(rng, teacher.vocab_size)
    last = teacher.logits_for_batch(batch)
    assert isinstance(last, np.ndarray) and last.dtype == np.float32 and last.shape == (4, teacher.vocab_size)
    full, lengths = teacher.logits_per_position(batch)
    assert full.shape == (4, 17, teacher.vocab_size) and full.dtype == np.float32
    assert lengths.tolist() == [9, 1, 17, 4] and lengths.dtype == np.int64
    for b, n in enumerate(lengths):
        assert np.array_equal(full[b, n - 1], last[b])
        assert np.all(full[b, n:] == 0.0)  # documented padding
        assert np.all(np.isfinite(full[b, :n]))
    # a sequence's rows do not depend on its neighbours
    alone, _ = teacher.logits_per_position([batch[0]])
    assert np.array_equal(alone[0], full[0, :9])


def test_grouping_by_max_batch_tokens_changes_nothing(teacher, rng):
    batch = random_batch(rng, teacher.vocab_size)
    small = q4k_engine.TeacherModel(teacher.model, teacher.backend, max_batch_tokens=5)
    assert np.array_equal(small.logits_per_position(batch)[0], teacher.logits_per_position(batch)[0])
    assert np.array_equal(small.logits_for_batch(batch), teacher.logits_for_batch(batch))


def test_accepts_arrays(teacher, rng):
    arr = rng.integers(0, teacher.vocab_size, (3, 6))
    assert np.array_equal(teacher.logits_for_batch(arr), teacher.logits_for_batch(arr.tolist()))
    mixed = [[np.int64(5), 7], np.array([1, 2], np.uint16), (3, 4)]
    assert np.array_equal(teacher.logits_for_batch(mixed), teacher.logits_for_batch([[5, 7], [1, 2], [3, 4]]))
    torch = pytest.importorskip("torch")
    assert np.array_equal(teacher.logits_for_batch(torch.tensor(arr)), teacher.logits_for_batch(arr))


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_log_softmax_and_topk(teacher, rng):
    batch = random_batch(rng, teacher.vocab_size)
    full, lengths = teacher.logits_per_position(batch)
    t = float(rng.uniform(0.5, 3.0))
    ls, ls_lengths = teacher.log_softmax(batch, temperature=t)
    assert np.array_equal(ls_lengths, lengths)
    ref = _log_softmax64(full / t)
    k = 7
    top = teacher.topk_logprobs(batch, k, temperature=t)
    vals, idx = top.values, top.indices
    assert vals.shape == idx.shape == (4, 17, k) and idx.dtype == np.int64
    assert top.tail is None and top.dropped is None and top.lengths.tolist() == lengths.tolist()
    for b, n in enumerate(lengths):
        assert np.abs(ls[b, :n] - ref[b, :n]).max() < 1e-5
        # padding is never a real token or probability 1
        assert np.all(ls[b, n:] == -np.inf) and np.all(vals[b, n:] == -np.inf) and np.all(idx[b, n:] == -1)
        order = np.argsort(-full[b, :n], axis=-1, kind="stable")[:, :k]
        assert np.array_equal(idx[b, :n], order)
        assert np.abs(vals[b, :n] - np.take_along_axis(ref[b, :n], order, -1)).max() < 1e-5
    last = teacher.topk_logprobs(batch, k, temperature=t, positions="last")
    assert last.values.shape == (4, k)
    assert np.array_equal(last.indices, idx[np.arange(4), lengths - 1])
    assert np.array_equal(teacher.log_softmax(batch, t, positions="last").values, ls[np.arange(4), lengths - 1])


def test_topk_tail_log_mass(teacher, rng):
    """tail = log(1 - sum p(top-k)) from the logsumexp of the other tokens: right where the naive
    1 - sum cancels (a sharp distribution at a low temperature) and -inf when k covers the vocabulary."""
    batch = random_batch(rng, teacher.vocab_size)
    full, lengths = teacher.logits_per_position(batch)
    for t, k in ((float(rng.uniform(0.5, 2.0)), 5), (0.01, 3)):
        top = teacher.topk_logprobs(batch, k, temperature=t, tail=True)
        assert top.tail.shape == (4, 17) and top.tail.dtype == np.float32
        for b, n in enumerate(lengths):
            lp = _log_softmax64(full[b, :n] / t)
            rest = lp.copy()
            np.put_along_axis(rest, top.indices[b, :n], -np.inf, -1)
            m = rest.max(-1, keepdims=True)
            ref = (m + np.log(np.exp(rest - m).sum(-1, keepdims=True)))[:, 0]
            assert np.abs(top.tail[b, :n] - ref).max() < 1e-4, (t, k)
            assert np.all(top.tail[b, n:] == -np.inf)
            # the definition, where the float32 top-k values still tell 1 - sum from 0
            with np.errstate(invalid="ignore", divide="ignore"):
                naive = np.log1p(-np.exp(top.values[b, :n].astype(np.float64)).sum(-1))
            ok = naive > -8
            assert np.all(np.abs(top.tail[b, :n][ok] - naive[ok]) < 1e-3)
    everything = teacher.topk_logprobs(batch, teacher.vocab_size, tail=True)
    assert np.all(everything.tail == -np.inf)


def test_position_chunks_change_nothing(teacher, rng):
    """The LM head and every reduction run on chunks of positions; any chunk size gives the same
    values, and logits_chunks delivers exactly logits_per_position's rows."""
    batch = random_batch(rng, teacher.vocab_size)
    chunked = q4k_engine.TeacherModel(teacher.model, teacher.backend, chunk_tokens=int(rng.integers(1, 6)),
                                      max_batch_tokens=int(rng.integers(5, 40)))
    full, lengths = teacher.logits_per_position(batch)
    assert np.array_equal(chunked.logits_per_position(batch).values, full)
    assert np.array_equal(chunked.logits_for_batch(batch), teacher.logits_for_batch(batch))
    a, b = teacher.topk_logprobs(batch, 4, tail=True), chunked.topk_logprobs(batch, 4, tail=True)
    for x, y in zip(a[:4], b[:4]):
        assert np.array_equal(x, y)
    assert np.array_equal(teacher.log_softmax(batch).values, chunked.log_softmax(batch).values)
    seen = {b: np.zeros(n, bool) for b, n in enumerate(lengths)}
    order = []
    for c in chunked.logits_chunks(batch, dtype="float16"):
        n = c.logits.shape[0]
        assert c.logits.dtype == np.float16 and c.dropped is None and n <= chunked.chunk_tokens
        assert np.array_equal(c.logits, full[c.sequence, c.start:c.start + n].astype(np.float16))
        assert not seen[c.sequence][c.start:c.start + n].any()
        seen[c.sequence][c.start:c.start + n] = True
        order.append((c.sequence, c.start))
    assert all(v.all() for v in seen.values()) and order == sorted(order)


def test_student_vocab_crop_and_pad(teacher, rng):
    batch = random_batch(rng, teacher.vocab_size)
    full, lengths = teacher.logits_per_position(batch)
    t = float(rng.uniform(0.5, 2.0))
    n = int(rng.integers(50, teacher.vocab_size - 10))
    crop = teacher.topk_logprobs(batch, 6, temperature=t, tail=True, vocab_size=n)
    ls = teacher.log_softmax(batch, t, vocab_size=n).values
    assert ls.shape == (4, 17, n) and crop.dropped.shape == (4, 17)
    for b, m in enumerate(lengths):
        ref = _log_softmax64(full[b, :m, :n] / t)  # renormalised over the kept tokens
        assert np.abs(ls[b, :m] - ref).max() < 1e-5
        assert np.array_equal(crop.indices[b, :m], np.argsort(-full[b, :m, :n], -1, kind="stable")[:, :6])
        assert crop.indices[b, :m].max() < n
        gone = np.exp(_log_softmax64(full[b, :m] / t))[:, n:].sum(-1)
        assert np.abs(crop.dropped[b, :m] - gone).max() < 1e-5
        assert np.all(crop.dropped[b, m:] == 0.0)
    big = teacher.vocab_size + int(rng.integers(1, 50))
    pad = teacher.log_softmax(batch, t, vocab_size=big).values
    assert pad.shape == (4, 17, big) and np.all(pad[:, :, teacher.vocab_size:] == -np.inf)
    assert np.array_equal(pad[:, :, :teacher.vocab_size], teacher.log_softmax(batch, t).values)
    same = teacher.topk_logprobs(batch, 6, temperature=t, tail=True, vocab_size=big)
    plain = teacher.topk_logprobs(batch, 6, temperature=t, tail=True)
    assert same.dropped is None and all(np.array_equal(x, y) for x, y in zip(same[:4], plain[:4]))
    chunks = list(teacher.logits_chunks(batch, vocab_size=n))
    for c in chunks:
        rows = full[c.sequence, c.start:c.start + c.logits.shape[0]]
        assert np.array_equal(c.logits, rows[:, :n])
        assert np.abs(c.dropped - np.exp(_log_softmax64(rows))[:, n:].sum(-1)).max() < 1e-5
    c = next(iter(teacher.logits_chunks(batch, vocab_size=big)))
    assert c.logits.shape[1] == big and np.all(c.logits[:, teacher.vocab_size:] == -np.inf)
    with pytest.raises(InputError, match="k must be"):
        teacher.topk_logprobs(batch, n + 1, vocab_size=n)
    with pytest.raises(InputError, match="vocab_size"):
        teacher.log_softmax(batch, vocab_size=0)


def test_pad_id(tmp_path, module_seed):
    model = synthetic_model("llama", seed=module_seed)
    assert q4k_engine.TeacherModel(model, teacher_backend()).pad_id is None
    spec = dataclasses.replace(model.tokenizer, pad_id=3)
    for fmt in ("gguf", "apr"):
        path = save_model(tmp_path / f"pad.{fmt}", dataclasses.replace(model, tokenizer=spec), fmt)
        assert q4k_engine.load(path, device="cpu").pad_id == 3


def teacher_backend():
    from q4k_engine.provider import make_backend

    return make_backend("cpu")


def test_output_kinds_and_dtypes(teacher, rng):
    torch = pytest.importorskip("torch")
    batch = random_batch(rng, teacher.vocab_size, (3, 5))
    ref = teacher.logits_for_batch(batch)
    half = teacher.logits_for_batch(batch, dtype="float16")
    assert half.dtype == np.float16 and np.array_equal(half, ref.astype(np.float16))
    t = teacher.logits_for_batch(batch, output="torch")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and np.array_equal(t.numpy(), ref)
    d = teacher.logits_for_batch(batch, output="dlpack")
    assert np.array_equal(torch.from_dlpack(d).numpy(), ref)
    x, lengths = teacher.logits_per_position(batch, output="torch", dtype="float16")
    assert x.dtype == torch.float16 and lengths.dtype == torch.int64 and lengths.tolist() == [3, 5]
    top = teacher.topk_logprobs(batch, 3, output="torch", tail=True)
    assert top.indices.dtype == torch.int64 and top.lengths.dtype == torch.int64  # ready for torch.gather
    assert top.tail.dtype == torch.float32 and top.tail.shape == (2, 5)
    default16 = q4k_engine.TeacherModel(teacher.model, teacher.backend, output="torch", dtype="float16")
    assert default16.logits_for_batch(batch).dtype == torch.float16


@pytest.mark.skipif(probe().usable, reason="checks the error raised without a GPU")
def test_cuda_without_gpu_is_a_device_error(teacher):
    with pytest.raises(DeviceError):
        q4k_engine.load(teacher.model.path, device="cuda")
    with pytest.warns(q4k_engine.FallbackWarning, match=re.escape(probe().reason)):
        assert q4k_engine.load(teacher.model.path, device="auto").device == "cpu"
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(DeviceError, match="CuPy"):
            teacher.logits_for_batch([[1, 2]], output="cupy")


@pytest.mark.parametrize("bad, message", [
    ([[1, -1]], r"sequence 0, position 1: token id -1 is outside \[0, 433\)"),
    ([[3], [1, 2, 433]], r"sequence 1, position 2: token id 433 is outside"),
    ([[1, 2], [4, 2.0]], r"sequence 1, position 1: 2.0 is not an integer token id"),
    ([[1], [True, 2]], r"sequence 1, position 0: True is not an integer"),
    ([[1], ["7"]], r"sequence 1, position 0: '7' is not an integer"),
    ([[1], []], r"sequence 1 is empty"),
    ([], r"batch is empty"),
    ("hello", r"batch is text"),
    ([[1, 2], "hi"], r"sequence 1 is text"),
    ([[1, [2, 3]]], r"sequence 0 must be a flat list"),
    ([[[1, 2], [3, 4]]], r"sequence 0 must be a flat list"),
    (np.array([1, 2, 3]), r"wrap it in a list"),
    ([np.array([1.5, 2.0])], r"sequence 0, position 0: 1.5 is not an integer"),
    ([[2**70]], r"token id 1180591620717411303424 is outside"),
])
def test_bad_token_ids_name_sequence_and_position(teacher, bad, message):
    for call in (teacher.logits_for_batch, lambda b: teacher.logits_per_position(b),
                 lambda b: teacher.topk_logprobs(b, 3)):
        with pytest.raises(InputError, match=message):
            call(bad)


def test_bad_options(teacher):
    with pytest.raises(InputError, match="output"):
        teacher.logits_for_batch([[1]], output="jax")
    with pytest.raises(InputError, match="dtype"):
        teacher.logits_for_batch([[1]], dtype="bfloat16")
    with pytest.raises(InputError, match="positions"):
        teacher.log_softmax([[1]], positions="first")
    for k in (0, teacher.vocab_size + 1, 2.0, True):
        with pytest.raises(InputError, match="k must be"):
            teacher.topk_logprobs([[1]], k)
    for t in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="temperature"):
            teacher.topk_logprobs([[1]], 3, temperature=t)
    with pytest.raises(InputError, match="device"):
        q4k_engine.load(teacher.model.path, device="tpu")
    with pytest.raises(InputError, match="no such model"):
        q4k_engine.load(teacher.model.path.parent / "missing.gguf")


def test_text_roundtrip_and_bos(teacher):
    text = "The cat sat on the mat, 42 times!"
    ids = teacher.encode(text)
    spec = teacher.model.tokenizer
    assert ids[0] == spec.bos_id  # add_bos_token is set in the synthetic files
    assert teacher.encode(text, add_bos=False) == ids[1:]
    assert teacher.decode(ids, skip_special=True) == text
    assert teacher.logits_for_batch([ids]).shape == (1, teacher.vocab_size)


def test_model_without_tokenizer(tmp_path, module_seed):
    model = dataclasses.replace(synthetic_model("llama", seed=module_seed), tokenizer=None)
    path = save_model(tmp_path / "notok.apr", model, "apr")
    t = q4k_engine.load(path, device="cpu")
    assert t.logits_for_batch([[1, 2, 3]]).shape == (1, t.vocab_size)
    with pytest.raises(UnsupportedError, match="no tokenizer"):
        t.encode("hi")


def test_demo_model_loads():
    t = q4k_engine.load("demo", device="cpu")
    ids = t.encode("hello world")
    assert t.logits_for_batch([ids]).shape == (1, t.vocab_size)
