"""The FP8 mode's kernels (engine/fp8.py; kernels/ops.cu quant_rows_e4m3, fp8_rescale, glu_pair_fp8;
kernels/matmul.cu row_scales_e4m3, prep_e4m3; kernels/cublaslt.py) against the NumPy rules of
engine/fp8.py, and the CUDA backend's FP8 forward against the NumPy backend's emulation of it.

The e4m3 bytes must be exactly NumPy's (both round float32 products, ties to even); products
differ from NumPy's float64 sums by fp32 rounding only. Outputs are poisoned (NaN) first.
"""
from __future__ import annotations

import numpy as np
import pytest

from q4k_engine import fp8
from q4k_engine.backend import Batch
from q4k_engine.distill.stats import compare_logits
from q4k_engine.dtypes import GGMLType
from q4k_engine.tensors import QTensor

from conftest import synthetic_kernel_model

cp = pytest.importorskip("cupy")
mm = pytest.importorskip("q4k_engine.kernels.matmul")
ops = pytest.importorskip("q4k_engine.kernels.ops")

from test_kernels_gpu import dequantize_ref, random_weight  # noqa: E402  (needs CuPy too)

pytestmark = pytest.mark.gpu


def e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes (0x7F / 0xFF: NaN)."""
    c = np.arange(256)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e, m = (c >> 3) & 0xF, c & 7
    v = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0)) * sign
    v[(c & 0x7F) == 0x7F] = np.nan
    return v.astype(np.float32)


TABLE = e4m3_table()


def values(b) -> np.ndarray:
    return TABLE[cp.asnumpy(b)]


def codes(v: np.ndarray) -> np.ndarray:
    """e4m3 codes of values already on the e4m3 grid."""
    lut = {float(x): i for i, x in enumerate(TABLE) if np.isfinite(x) and i != 0x80}
    return np.vectorize(lambda x: lut[float(x)], otypes=[np.uint8])(v)


def test_decoding_table_is_torchs():
    torch = pytest.importorskip("torch")
    ref = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    np.testing.assert_array_equal(TABLE, ref)


@pytest.mark.parametrize("m,cols,kpad", [(1, 7, 32), (3, 644, 768), (130, 3584, 3584), (5, 18944, 18944)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quant_rows_e4m3_is_numpys(rng, m, cols, kpad, dtype):
    x = (rng.standard_normal((m, cols)) * rng.choice([1e-3, 1.0, 50.0], (m, 1))).astype(dtype)
    x[0, : cols // 2] *= 300  # a row with a wide range: small values go subnormal or to zero
    if m > 2:
        x[2] = 0  # an all-zero row: scale 0, values 0
    out = cp.full((m, kpad), 0x7F, cp.uint8)  # NaN codes
    scale = cp.full(m, np.nan, cp.float32)
    ops.quant_rows_e4m3(cp.asarray(x), kpad, out=out, scale=scale)
    q, s = fp8.quantize_rows(x.astype(np.float32))
    got = values(out)
    np.testing.assert_array_equal(got[:, :cols], q)
    assert (got[:, cols:] == 0).all()
    np.testing.assert_array_equal(cp.asnumpy(scale), s)


def test_quant_rows_e4m3_reads_a_row_strided_view(rng):
    big = cp.asarray(rng.standard_normal((150, 1000)).astype(np.float32))
    x = big[:, 100:900]  # rows 1000 apart, 800 values each
    out, scale = ops.quant_rows_e4m3(x, 800)
    q, s = fp8.quantize_rows(cp.asnumpy(x))
    np.testing.assert_array_equal(values(out), q)
    np.testing.assert_array_equal(cp.asnumpy(scale), s)


@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q5_K, GGMLType.Q8_0, GGMLType.Q5_0,
                                   GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.F16, GGMLType.BF16, GGMLType.F32])
@pytest.mark.parametrize("cols", [768, 644])  # 644: a last 32-value block whose bytes run past the row
def test_row_scales_and_prep_e4m3_are_numpys(rng, dtype, cols):
    rows = 203
    if cols % 256 and dtype in (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q5_K):
        pytest.skip("k-quant rows are whole 256-value super-blocks")
    raw = random_weight(rng, dtype, rows, cols)
    w = mm.with_fp8_scales(mm.prepare_weight(dtype, (rows, cols), cp.asarray(raw)))
    ref = dequantize_ref(raw, dtype, (rows, cols)).astype(np.float32)
    scale, inv = fp8.row_scales(np.abs(ref).max(axis=1))
    np.testing.assert_array_equal(cp.asnumpy(w.fp8_scale[0]), scale)
    np.testing.assert_array_equal(cp.asnumpy(w.fp8_scale[1]), inv)
    for r0, n in ((0, 64), (64, 139)):
        out = cp.full((n + 3, w.kpad), 0x7F, cp.uint8)
        mm._prep_e4m3(w, r0, n, out)
        np.testing.assert_array_equal(values(out[:n, :cols]), fp8.e4m3(ref[r0:r0 + n] * inv[r0:r0 + n, None]))
        assert (values(out[:n, cols:]) == 0).all()  # the padding is zeros
        assert (cp.asnumpy(out[n:]) == 0x7F).all()  # nothing past the n rows


@pytest.mark.parametrize("n,m,k", [(64, 129, 512), (208, 300, 3584), (2 * 1152, 131, 768)])
def test_gemm_e4m3_sums_exactly(rng, n, m, k):
    """Small integers on both sides: every fp32 sum is exact, so cuBLASLt must match NumPy exactly."""
    from q4k_engine.kernels import cublaslt

    wv = rng.integers(-8, 9, (n, k)).astype(np.float32)
    xv = rng.integers(-8, 9, (m, k)).astype(np.float32)
    w8, x8 = cp.asarray(codes(wv)), cp.asarray(codes(xv))
    ld = n + 16  # columns past n: must stay untouched
    y = cp.full((m, ld), np.nan, cp.float32)
    cublaslt.gemm_e4m3(w8, n, x8, m, k, y.data.ptr, ld)
    got = cp.asnumpy(y)
    np.testing.assert_array_equal(got[:, :n], xv.astype(np.float64) @ wv.T.astype(np.float64))
    assert np.isnan(got[:, n:]).all()


def qtensor(raw: np.ndarray, dtype: GGMLType, rows: int, cols: int, name: str = "w") -> QTensor:
    return QTensor(name, dtype, (rows, cols), raw)


def abs_products(x: np.ndarray, raw: np.ndarray, dtype: GGMLType, rows: int, cols: int) -> np.ndarray:
    """sum_k |x8[m, k]| |W8[n, k]| a[m] w[n]: the scale of an FP8 product's summation error."""
    wd = dequantize_ref(raw, dtype, (rows, cols)).astype(np.float32)
    ws, winv = fp8.row_scales(np.abs(wd).max(axis=1))
    x8, a = fp8.quantize_rows(x)
    return (np.abs(x8).astype(np.float64) @ np.abs(fp8.e4m3(wd * winv[:, None])).T.astype(np.float64)
            * a[:, None] * ws[None, :])


# Hopper's FP8 tensor cores sum with fewer bits than fp32 (cuBLASLt without fast accumulation still
# measured 1.2e-4 of the sum of |products| at K = 512): the tolerance of a product against float64 sums.
SUM_TOL = 5e-4


@pytest.mark.parametrize("m,n,ld", [(70, 136, 288), (65600, 8, 16)])
def test_fp8_epilogues_vector_path_is_the_scalar_path(rng, m, n, ld, monkeypatch):
    """fp8_rescale and glu_pair_fp8 with 16-byte accesses (aligned blocks) give the bits of the
    value-at-a-time path; the rescale is exactly NumPy's two float32 products."""
    from test_kernels_gpu import act_ref, recording_alignment

    d = cp.asarray((rng.standard_normal((m, ld)) * 50).astype(np.float32))
    a = cp.asarray((rng.random(m) * 0.01).astype(np.float32))
    wg = cp.asarray((rng.random(n) * 0.02).astype(np.float32))
    wu = cp.asarray((rng.random(n) * 0.02).astype(np.float32))
    runs = []
    seen = recording_alignment(monkeypatch, ops)
    for scalar in (False, True):
        if scalar:
            monkeypatch.setattr(ops, "_aligned", lambda *v: False)
        out = cp.full((m, n + 8), np.nan, cp.float16)
        ops.glu_pair_fp8(d, a, wg, wu, "silu", out, 8, n)
        y = cp.ascontiguousarray(d[:, :n])
        ops.fp8_rescale(y, a, wg)
        runs.append((cp.asnumpy(out), cp.asnumpy(y)))
    assert seen == [True, True]
    (out, y), (out_s, y_s) = runs
    np.testing.assert_array_equal(out.view(np.uint16), out_s.view(np.uint16))
    np.testing.assert_array_equal(y, y_s)
    dn, an, gn, un = (cp.asnumpy(v) for v in (d, a, wg, wu))
    np.testing.assert_array_equal(y, (dn[:, :n] * an[:, None]) * gn)
    gate, up = (dn[:, :n] * an[:, None]) * gn, (dn[:, n:2 * n] * an[:, None]) * un
    ref = act_ref(gate.astype(np.float64), "silu") * up
    got = out.astype(np.float64)
    np.testing.assert_allclose(got[:, 8:8 + n], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert np.isnan(got[:, :8]).all() and np.isnan(got[:, 8 + n:]).all()


def emulated(x: np.ndarray, t: QTensor) -> np.ndarray:
    from q4k_engine.backend_cpu import NumpyBackend

    return NumpyBackend("fp8")._matmul_fp8(x, t)


@pytest.mark.parametrize("dtype,rows,cols,m", [(GGMLType.Q4_K, 203, 768, 129), (GGMLType.Q6_K, 1100, 512, 300),
                                               (GGMLType.Q8_0, 64, 644, 131), (GGMLType.F16, 130, 256, 200)])
def test_matmul_fp8_is_the_emulation(rng, dtype, rows, cols, m, monkeypatch):
    monkeypatch.setattr(mm, "SCRATCH_BYTES", 64 * 1024)  # several chunks of rows
    raw = random_weight(rng, dtype, rows, cols)
    w = mm.with_fp8_scales(mm.prepare_weight(dtype, (rows, cols), cp.asarray(raw)))
    x = rng.standard_normal((m, cols)).astype(np.float32)
    out = cp.full((m, rows), np.nan, cp.float32)
    y = cp.asnumpy(mm.matmul_fp8(cp.asarray(x), w, out=out))
    ref = emulated(x, qtensor(raw, dtype, rows, cols))
    assert np.isfinite(y).all()
    # the same e4m3 operands and scales: only the GPU's sums against float64 ones
    err = np.abs(y - ref) / (abs_products(x, raw, dtype, rows, cols) + 1e-30)
    print(f"{dtype.name} {rows}x{cols} M={m}: max error / sum |products| {err.max():.2e}")
    assert err.max() < SUM_TOL


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype,m", [(GGMLType.Q4_K, 129), (GGMLType.Q6_K, 257)])
def test_glu_matmul_fp8_is_the_emulation(rng, dtype, act, m, monkeypatch):
    from q4k_engine.backend_cpu import NumpyBackend

    monkeypatch.setattr(mm, "SCRATCH_BYTES", 256 * 1024)  # several blocks of rows
    rows, cols = 600, 512
    rg, ru = random_weight(rng, dtype, rows, cols), random_weight(rng, dtype, rows, cols)
    # x small enough that act(gate) * up stays inside f16's range (random weights run large)
    wg = mm.with_fp8_scales(mm.prepare_weight(dtype, (rows, cols), cp.asarray(rg)))
    wu = mm.with_fp8_scales(mm.prepare_weight(dtype, (rows, cols), cp.asarray(ru)))
    x = (rng.standard_normal((m, cols)) * 0.02).astype(np.float32)
    y = cp.asnumpy(mm.glu_matmul_fp8(cp.asarray(x), wg, wu, act)).astype(np.float64)
    be = NumpyBackend("fp8")
    gate, up = be._matmul_fp8(x, qtensor(rg, dtype, rows, cols, "g")), be._matmul_fp8(x, qtensor(ru, dtype, rows, cols, "u"))
    ref = be.glu(gate, up, act).astype(np.float64)
    assert np.isfinite(y).all()
    # error of act(g) * u from the sums' errors (|act'| <= 1.13 for silu and gelu_tanh), then f16
    bound = (1.13 * abs_products(x, rg, dtype, rows, cols) * np.abs(up)
             + np.abs(be.glu(gate, np.ones_like(up), act)) * abs_products(x, ru, dtype, rows, cols))
    err = (np.abs(y - ref) - 2.0 ** -11 * np.abs(ref) - 2.0 ** -24) / (bound + 1e-30)
    print(f"{dtype.name} {act} M={m}: max error / its bound {err.max():.2e}")
    assert err.max() < SUM_TOL


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def synthetic_model(request, tmp_path_factory):
    return synthetic_kernel_model(tmp_path_factory, request.param)


def test_fp8_forward_is_the_numpy_emulation(synthetic_model, rng):
    """The CUDA FP8 forward reproduces the NumPy backend's FP8 emulation far more closely than
    either is to the fp16 reference: the GPU runs the same roundings, not just some FP8."""
    from q4k_engine.backend_cpu import NumpyBackend
    from q4k_engine.backend_cuda import CudaBackend
    from q4k_engine.forward import forward, upload

    cfg = synthetic_model.config
    batch = Batch.from_lengths([1, 7, 65, 130])  # 203 tokens: the FP8 products
    ids = rng.integers(0, cfg.vocab_size, batch.n_tokens).astype(np.int32)
    ref16, ref8 = (forward(cfg, upload(synthetic_model, b), b, ids, batch)
                   for b in (NumpyBackend(), NumpyBackend("fp8")))
    gpu = CudaBackend(precision="fp8")
    got = gpu.to_numpy(forward(cfg, upload(synthetic_model, gpu), gpu, ids, batch))
    same, drift = compare_logits(ref8, got), compare_logits(ref16, ref8)
    print(f"{cfg.arch}: CUDA fp8 vs NumPy fp8: mean KL {same.kld.mean:.2e}, top-1 {same.same_top_p:.4f}; "
          f"NumPy fp8 vs fp16 reference: mean KL {drift.kld.mean:.2e}, top-1 {drift.same_top_p:.4f}")
    # Inputs that differ by the fp16 path's own roundings (f16 attention operands) flip some e4m3
    # roundings, so the two FP8 runs are not identical; FP8 with other roundings (or none) would
    # be as far from the emulation as the drift itself, or twice it.
    assert same.kld.mean <= 0.5 * drift.kld.mean


def test_fp8_short_batches_take_the_fp16_kernels(synthetic_model, rng):
    """Below fp8.FP8_MIN_ROWS tokens nothing runs in e4m3: the logits are the fp16 backend's, bit for bit."""
    from q4k_engine.backend_cuda import CudaBackend
    from q4k_engine.forward import forward, upload

    cfg = synthetic_model.config
    batch = Batch.from_lengths([60, 68])  # 128 tokens
    ids = rng.integers(0, cfg.vocab_size, batch.n_tokens).astype(np.int32)
    a, b = CudaBackend(), CudaBackend(precision="fp8")
    ya = a.to_numpy(forward(cfg, upload(synthetic_model, a), a, ids, batch))
    yb = b.to_numpy(forward(cfg, upload(synthetic_model, b), b, ids, batch))
    np.testing.assert_array_equal(ya, yb)


def test_teacher_fp8_end_to_end(rng):
    import q4k_engine

    t = q4k_engine.load("demo", device="cuda", precision="fp8")
    assert t.precision == "fp8" and "precision=fp8" in repr(t)
    ids = [rng.integers(0, t.vocab_size, 200).tolist()]
    got = np.asarray(t.logits_per_position(ids)[0])
    ref = np.asarray(q4k_engine.load("demo", device="cpu", precision="fp8").logits_per_position(ids)[0])
    r = compare_logits(ref.reshape(200, -1), got.reshape(200, -1))
    assert r.kld.mean <= 1e-4, r.kld.mean
