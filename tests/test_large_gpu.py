"""No 32-bit index overflow at 72B sizes (issue 16), checked on the tensors where offsets pass 2^31
without a whole 72B model: each test allocates just the large tensor, reads rows and positions
beyond the 2^31 (bytes or elements) boundary and compares them with the NumPy oracle on a slice.

- a quantized matrix taller than 2^31 bytes (every plane of Q6_K's repacked layout past it): GEMV
  (M = 1 and 5), the cuBLAS path, the fused mma GEMM and the row gather, on rows past the boundary;
- the 72B LM head (152064 x 8192 Q6_K) over 14336 positions: logits [14336, 152064] (> 2^31
  elements) in fp32 and fp16, checked on rows past the boundary; the embedding gather of its last rows;
- log-softmax and top-64 over [14200, 152064] fp32 (> 2^31 elements);
- a KV cache of one layer with > 2^31 elements (8 slots x 300k positions x 8 KV heads x 128): cache
  write, decode and prefill attention of the slot past the boundary.

Each test holds at most ~25 GB of GPU memory and runs in seconds on an H200. Outputs are poisoned
(NaN) first; inputs are fresh random (seed printed; Q4K_SEED replays).

    python -m pytest -m gpu -q -s tests/test_large_gpu.py
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from q4k_engine.dtypes import GGMLType, TYPE_INFO, row_bytes
from q4k_engine.quants import dequantize
from q4k_engine.shapes import tensor_bytes_for

cp = pytest.importorskip("cupy")
mm = pytest.importorskip("q4k_engine.kernels.matmul")
ops = pytest.importorskip("q4k_engine.kernels.ops")
from test_kernels_gpu import TOL_F16, TOL_FP32, check  # noqa: E402
from test_ops_gpu import ATT_F16_BOUND, ATT_FP32_BOUND, ref_attention, rel_err  # noqa: E402

pytestmark = pytest.mark.gpu

LIMIT = 1 << 31
VOCAB, HIDDEN, FFN_72B = 152064, 8192, 29568
WORKERS = os.cpu_count() or 1


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31))


def _cupy_rng(rng: np.random.Generator):
    return cp.random.default_rng(_seed(rng))


def _rows_past_limit(dtype: GGMLType, cols: int) -> int:
    """Rows whose bytes pass 2^31 in every plane the kernels index (for Q6_K, its first plane of
    128 bytes per block, repacked by matmul.prepare_weight, too), plus 64."""
    nb = cols // TYPE_INFO[dtype].block_size
    per_row = nb * 128 if dtype == GGMLType.Q6_K else row_bytes(dtype, cols)
    return LIMIT // per_row + 64


def _boundary_rows(dtype: GGMLType, rows: int, cols: int) -> np.ndarray:
    """Rows whose bytes straddle 2^31 in each plane (Q6_K: ql 128 | qh 64 | scales 16 | d 2 bytes per
    block, whole planes one after another), the first and the last rows."""
    nb = cols // TYPE_INFO[dtype].block_size
    if dtype == GGMLType.Q6_K:
        nblk, planes, base = rows * nb, (128, 64, 16, 2), 0
        cross = []
        for size in planes:
            if base * nblk <= LIMIT < (base + size) * nblk:
                cross.append((LIMIT - base * nblk) // (size * nb))
            base += size
    else:
        cross = [LIMIT // row_bytes(dtype, cols)]
    picks = {0, 1, rows - 3, rows - 2, rows - 1}
    for r in cross:
        picks |= {r - 1, r, r + 1}
    return np.array(sorted(p for p in picks if 0 <= p < rows), np.int64)


def _ref_rows(raw: np.ndarray, dtype: GGMLType, cols: int, sel: np.ndarray) -> np.ndarray:
    rb = row_bytes(dtype, cols)
    return np.stack([dequantize(raw[r * rb:(r + 1) * rb], dtype, (1, cols))[0] for r in sel]).astype(np.float64)


def _poisoned(shape, dtype=np.float32):
    return cp.full(shape, np.nan, dtype=dtype)


@pytest.mark.parametrize("dtype,cols", [(GGMLType.Q4_K, HIDDEN), (GGMLType.Q6_K, HIDDEN),
                                        (GGMLType.Q5_0, FFN_72B), (GGMLType.Q8_0, FFN_72B)])
def test_matrix_rows_past_2g_bytes(rng, dtype, cols):
    """Every matmul path and the gather on rows whose bytes lie past 2^31 (72B ffn_down's Q5_0/Q8_0
    row length for the 32-value types)."""
    rows = _rows_past_limit(dtype, cols)
    raw = tensor_bytes_for("tall", (rows, cols), dtype, _seed(rng), WORKERS)
    assert raw.size > LIMIT
    w = mm.prepare_weight(dtype, (rows, cols), cp.asarray(raw))
    sel = _boundary_rows(dtype, rows, cols)
    w_ref = _ref_rows(raw, dtype, cols, sel)
    del raw
    for m, path, tol in ((1, "gemv", TOL_FP32), (5, "gemv", TOL_FP32), (16, "cublas", TOL_F16), (16, "mma", TOL_F16)):
        x = rng.standard_normal((m, cols)).astype(np.float32)
        out = _poisoned((m, rows))
        mm.matmul(cp.asarray(x), w, out=out, path=path)
        err = check(out[:, cp.asarray(sel)], x, w_ref, tol)
        print(f"{dtype.name} [{rows}, {cols}] ({rows * row_bytes(dtype, cols) / 1e9:.2f} GB) M={m} {path}: "
              f"max rel err {err:.2e} on rows {sel.tolist()}")
    got = cp.asnumpy(mm.gather_rows(w, cp.asarray(sel.astype(np.int32))))
    np.testing.assert_allclose(got, w_ref, rtol=1e-6, atol=1e-6 * np.abs(w_ref).max())


def test_lm_head_logits_past_2g_elements(rng):
    """The 72B head over 14336 positions: 2.18 G logits, fp32 and fp16 (cuBLAS writes both)."""
    dtype = GGMLType.Q6_K
    raw = tensor_bytes_for("output.weight", (VOCAB, HIDDEN), dtype, _seed(rng), WORKERS)
    w = mm.prepare_weight(dtype, (VOCAB, HIDDEN), cp.asarray(raw))
    m = 14336
    assert m * VOCAB > LIMIT
    x = _cupy_rng(rng).standard_normal((m, HIDDEN), dtype=cp.float32)
    rows = np.array([0, LIMIT // VOCAB, LIMIT // VOCAB + 1, m - 1])  # positions before/after 2^31
    cols = np.unique(np.concatenate([rng.choice(VOCAB, 256, replace=False), [0, VOCAB - 1]]))
    w_ref = _ref_rows(raw, dtype, HIDDEN, cols)
    del raw
    x_rows = cp.asnumpy(x[cp.asarray(rows)])
    for out_dtype, tol in ((np.float32, TOL_F16), (np.float16, 2 * TOL_F16)):
        out = _poisoned((m, VOCAB), out_dtype)
        mm.matmul(x, w, out=out, path="cublas")
        got = out[cp.asarray(rows)][:, cp.asarray(cols)].astype(cp.float32)
        err = check(got, x_rows, w_ref, tol)
        print(f"LM head [{m}, {VOCAB}] {np.dtype(out_dtype).name}: max rel err {err:.2e}")
        del out
    # The embedding gather from a vocabulary-sized table (the last rows included).
    got = cp.asnumpy(mm.gather_rows(w, cp.asarray(cols.astype(np.int32))))
    np.testing.assert_allclose(got, w_ref, rtol=1e-6, atol=1e-6 * np.abs(w_ref).max())


def test_log_softmax_and_topk_past_2g_elements(rng):
    """Log-softmax values (against float64) and top-64 (against NumPy's order) of rows whose
    elements lie past 2^31, the row straddling it included."""
    rows, k, t = 14200, 64, 1.5
    assert rows * VOCAB > LIMIT
    x = _cupy_rng(rng).standard_normal((rows, VOCAB), dtype=cp.float32)
    x *= 4.0
    check_rows = np.array([0, LIMIT // VOCAB - 1, LIMIT // VOCAB, LIMIT // VOCAB + 1, rows - 1])
    z = cp.asnumpy(x[cp.asarray(check_rows)]).astype(np.float64) / t
    ls = ops.log_softmax(x, t, out=_poisoned((rows, VOCAB)))
    del x
    ref = z - z.max(1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(1, keepdims=True))
    got = cp.asnumpy(ls[cp.asarray(check_rows)])
    err = rel_err(got, ref)
    assert err < 1e-5, f"log-softmax max rel err {err:.2e}"
    vals, idx = ops.topk(ls, k)
    for i, r in enumerate(check_rows):
        order = np.argsort(-got[i], kind="stable")[:k]  # ties (equal fp32 values) go to the lower id
        np.testing.assert_array_equal(cp.asnumpy(idx[int(r)]), order, err_msg=f"top-{k} ids of row {r}")
        np.testing.assert_array_equal(cp.asnumpy(vals[int(r)]), got[i][order])
    print(f"log-softmax + top-{k} over [{rows}, {VOCAB}] ({rows * VOCAB / 1e9:.2f} G elements): rows "
          f"{check_rows.tolist()}, max rel err {err:.2e}")


def test_kv_cache_past_2g_elements(rng):
    """One layer's cache of 8 slots x 300032 positions x 8 KV heads x 128 (2.46 G elements, 9.8 GB
    each for K and V): the last slot lies past 2^31 elements. Cache write, decode and a prefill
    chunk on that slot (and on slot 0) against the float64 reference."""
    n_seqs, max_len, hkv, hq, d = 8, 300_032, 8, 64, 128
    rows_total = n_seqs * max_len
    assert (n_seqs - 1) * max_len * hkv * d > LIMIT
    ck = _poisoned((rows_total, hkv, d))
    cv = _poisoned((rows_total, hkv, d))
    slots = np.array([0, n_seqs - 1])
    past = np.array([300, 700])  # 700 keys: more than one decode chunk
    slot0 = slots * max_len
    keys = [rng.standard_normal((p, hkv, d)).astype(np.float32) for p in past]
    vals = [rng.standard_normal((p, hkv, d)).astype(np.float32) for p in past]
    for s0, kk, vv in zip(slot0, keys, vals):
        ck[int(s0):int(s0) + len(kk)] = cp.asarray(kk)
        cv[int(s0):int(s0) + len(vv)] = cp.asarray(vv)
    scale = d ** -0.5
    for new in ([1, 1], [5, 17]):  # decode kernel, then the tensor-core prefill onto the cache
        new = np.array(new)
        cu = np.concatenate([[0], np.cumsum(new)])
        k_new = rng.standard_normal((int(cu[-1]), hkv, d)).astype(np.float32)
        v_new = rng.standard_normal((int(cu[-1]), hkv, d)).astype(np.float32)
        dest = np.concatenate([s + p + np.arange(n) for s, p, n in zip(slot0, past, new)]).astype(np.int32)
        assert int(dest[-1]) * hkv * d > LIMIT
        ops.kv_write(cp.asarray(k_new), cp.asarray(v_new), ck, cv, cp.asarray(dest))
        np.testing.assert_array_equal(cp.asnumpy(ck[cp.asarray(dest)]), k_new)
        np.testing.assert_array_equal(cp.asnumpy(cv[cp.asarray(dest)]), v_new)
        q = rng.standard_normal((int(cu[-1]), hq, d)).astype(np.float32)
        layout = ops.SeqLayout.build(cu[:-1], new, past, slot0, past + new)
        assert layout.decode == bool((new == 1).all())
        out = _poisoned(q.shape)
        ops.attention(cp.asarray(q), ck, cv, layout, scale, 0, out=out)
        got = cp.asnumpy(out)
        bound = ATT_FP32_BOUND if layout.decode else ATT_F16_BOUND
        for i in range(len(slots)):
            kk = np.concatenate([keys[i], k_new[cu[i]:cu[i + 1]]])
            vv = np.concatenate([vals[i], v_new[cu[i]:cu[i + 1]]])
            ref = ref_attention(q[cu[i]:cu[i + 1]], kk, vv, past[i] + np.arange(new[i]), len(kk), scale, 0)
            err = rel_err(got[cu[i]:cu[i + 1]], ref)
            print(f"KV cache slot {slots[i]} (first element {slot0[i] * hkv * d / 1e9:.2f} G) new={new[i]}: "
                  f"err {err:.2e} (bound {bound:.0e})")
            assert err < bound
        # The next step sees these tokens as cached.
        keys = [np.concatenate([keys[i], k_new[cu[i]:cu[i + 1]]]) for i in range(len(slots))]
        vals = [np.concatenate([vals[i], v_new[cu[i]:cu[i + 1]]]) for i in range(len(slots))]
        past = past + new
