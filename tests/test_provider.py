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


def test_log_softmax_and_topk(teacher, rng):
    batch = random_batch(rng, teacher.vocab_size)
    full, lengths = teacher.logits_per_position(batch)
    t = float(rng.uniform(0.5, 3.0))
    ls = teacher.log_softmax(batch, temperature=t)
    x = full.astype(np.float64) / t
    ref = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    k = 7
    vals, idx = teacher.topk_logprobs(batch, k, temperature=t)
    assert vals.shape == idx.shape == (4, 17, k) and idx.dtype == np.int64
    for b, n in enumerate(lengths):
        assert np.abs(ls[b, :n] - ref[b, :n]).max() < 1e-5
        assert np.all(ls[b, n:] == 0.0) and np.all(vals[b, n:] == 0.0) and np.all(idx[b, n:] == 0)
        order = np.argsort(-full[b, :n], axis=-1, kind="stable")[:, :k]
        assert np.array_equal(idx[b, :n], order)
        assert np.abs(vals[b, :n] - np.take_along_axis(ref[b, :n], order, -1)).max() < 1e-5
    lv, li = teacher.topk_logprobs(batch, k, temperature=t, positions="last")
    assert lv.shape == (4, k)
    assert np.array_equal(li, idx[np.arange(4), lengths - 1])
    assert np.array_equal(teacher.log_softmax(batch, t, positions="last"), ls[np.arange(4), lengths - 1])


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
    v, i = teacher.topk_logprobs(batch, 3, output="torch")
    assert i.dtype == torch.int64  # ready for torch.gather
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
