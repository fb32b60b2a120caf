"""GPU matmul kernels (kernels/matmul.py) against the NumPy dequantization in float64.

Metric: for each output element, |y - ref| / (|x| . |W|^T) (the sum of absolute products, the scale
of the rounding error of a dot product); its maximum must stay under 1e-5 for the fp32 GEMV and
5e-3 for the f16-operand GEMM paths. Outputs are NaN-poisoned before each launch and NaN never passes.
"""
from __future__ import annotations

import numpy as np
import pytest

from q4k_engine.dtypes import GGMLType, TYPE_INFO, row_bytes

cp = pytest.importorskip("cupy")
mm = pytest.importorskip("q4k_engine.kernels.matmul")

pytestmark = pytest.mark.gpu

QUANT = [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q5_K, GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_0,
         GGMLType.Q4_1]
FLOAT = [GGMLType.F16, GGMLType.BF16, GGMLType.F32]
ALL = QUANT + FLOAT
# Byte offsets of the f16 scale fields inside one block; they are set to sane values, the rest is random.
F16_FIELDS = {GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.Q8_0: (0,),
              GGMLType.Q5_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2)}
TOL_FP32, TOL_F16 = 1e-5, 5e-3


def dequantize_ref(raw: np.ndarray, dtype: GGMLType, shape: tuple[int, int]) -> np.ndarray:
    try:
        from q4k_engine.quants import dequantize
    except ImportError:  # the project's quants module not there yet: gguf's, bit-identical
        import gguf

        rows, cols = shape
        return gguf.quants.dequantize(raw.reshape(rows, row_bytes(dtype, cols)),
                                      gguf.GGMLQuantizationType(int(dtype)))[:, :cols]
    return dequantize(raw, dtype, shape)


def random_weight(rng: np.random.Generator, dtype: GGMLType, rows: int, cols: int) -> np.ndarray:
    """Raw bytes of a random [rows, cols] tensor: random quants, finite f16 scales of both signs."""
    if dtype in FLOAT:
        v = rng.standard_normal((rows, cols)).astype(np.float32)
        if dtype == GGMLType.F16:
            return v.astype(np.float16).view(np.uint8).ravel()
        if dtype == GGMLType.BF16:
            return (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).ravel()
        return v.view(np.uint8).ravel()
    info = TYPE_INFO[dtype]
    nblk = rows * (row_bytes(dtype, cols) // info.type_size)
    blocks = rng.integers(0, 256, (nblk, info.type_size), dtype=np.uint8)
    for off in F16_FIELDS[dtype]:
        scale = (rng.uniform(1e-3, 2e-2, nblk) * rng.choice([-1.0, 1.0], nblk)).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(nblk, 2)
    return blocks.ravel()


def check(y, x: np.ndarray, w_ref: np.ndarray, tol: float) -> float:
    y = cp.asnumpy(y).astype(np.float64)
    assert np.isfinite(y).all(), "non-finite output (unwritten or NaN)"
    x64 = x.astype(np.float64)
    ref = x64 @ w_ref.T
    scale = np.abs(x64) @ np.abs(w_ref).T + 1e-30
    err = float((np.abs(y - ref) / scale).max())
    assert err <= tol, f"max |y-ref|/(|x||W|) = {err:.3e} > {tol}"
    return err


def setup(rng, dtype, rows, cols, m):
    raw = random_weight(rng, dtype, rows, cols)
    w = mm.prepare_weight(dtype, (rows, cols), cp.asarray(raw))
    w_ref = dequantize_ref(raw, dtype, (rows, cols)).astype(np.float64)
    x = rng.standard_normal((m, cols)).astype(np.float32)
    return w, w_ref, x


def run(x: np.ndarray, w, path: str | None):
    out = cp.full((x.shape[0], w.rows), np.nan, dtype=cp.float32)
    y = mm.matmul(cp.asarray(x), w, out=out, path=path)
    assert y is out
    return y


def cols_for(dtype: GGMLType, padded: bool) -> int:
    """A row length: whole blocks, or one that leaves a padded tail in the last block."""
    if dtype in FLOAT:
        return 200 if padded else 256
    block = TYPE_INFO[dtype].block_size
    return 2 * block + (block // 2 + 4 if padded else 0)


@pytest.mark.parametrize("padded", [False, True], ids=["whole", "padded"])
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("dtype", ALL, ids=lambda t: t.name)
def test_gemv(rng, dtype, m, padded):
    w, w_ref, x = setup(rng, dtype, 300, cols_for(dtype, padded), m)
    check(run(x, w, "gemv"), x, w_ref, TOL_FP32)


@pytest.mark.parametrize("m", [1, 9, 17, 300])
@pytest.mark.parametrize("path", ["mma", "cublas"])
@pytest.mark.parametrize("dtype", ALL, ids=lambda t: t.name)
def test_gemm(rng, dtype, path, m):
    w, w_ref, x = setup(rng, dtype, 300, cols_for(dtype, True), m)
    check(run(x, w, path), x, w_ref, TOL_F16)


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 300, 2048])
@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_dispatch(rng, dtype, m):
    """The default choice per M, at a model-like row length (3584 = 14 super-blocks)."""
    w, w_ref, x = setup(rng, dtype, 520, 3584, m)
    check(run(x, w, None), x, w_ref, TOL_FP32 if m <= mm.GEMV_MAX_M else TOL_F16)


@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_gemm_cublas_chunks(rng, dtype, monkeypatch):
    """The peer path with a scratch smaller than W: several row chunks, a ragged last one."""
    w, w_ref, x = setup(rng, dtype, 300, 512, 40)
    monkeypatch.setattr(mm, "SCRATCH_BYTES", 512 * 2 * 128)
    check(run(x, w, "cublas"), x, w_ref, TOL_F16)


@pytest.mark.parametrize("dtype", ALL, ids=lambda t: t.name)
def test_gather_rows(rng, dtype):
    rows, cols = 50, cols_for(dtype, True)
    raw = random_weight(rng, dtype, rows, cols)
    w = mm.prepare_weight(dtype, (rows, cols), cp.asarray(raw))
    ids = rng.integers(0, rows, 37).astype(np.int32)
    got = cp.asnumpy(mm.gather_rows(w, cp.asarray(ids)))
    ref = dequantize_ref(raw, dtype, (rows, cols))[ids]
    assert got.shape == (37, cols) and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_q6k_repack_is_a_permutation(rng):
    raw = random_weight(rng, GGMLType.Q6_K, 3, 512)
    w = mm.prepare_weight(GGMLType.Q6_K, (3, 512), cp.asarray(raw))
    packed = cp.asnumpy(w.data)
    assert packed.size == raw.size
    assert np.array_equal(np.sort(packed), np.sort(raw))
    assert np.array_equal(packed[:128], raw[:128])  # first block's ql leads the ql plane


def test_bad_inputs(rng):
    from q4k_engine.errors import InputError

    w, _, x = setup(rng, GGMLType.Q4_K, 16, 256, 2)
    with pytest.raises(InputError):
        mm.matmul(cp.asarray(x[:, :128]), w)
    with pytest.raises(InputError):
        mm.matmul(cp.asarray(x), w, out=cp.empty((2, 15), cp.float32))
    with pytest.raises(InputError):
        mm.prepare_weight(GGMLType.Q4_K, (16, 256), cp.zeros(10, cp.uint8))
