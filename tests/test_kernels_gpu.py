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


def need_path(path: str | None) -> None:
    """Skip (saying why) a test of the wgmma path on a GPU that is not Hopper."""
    if path == "wgmma" and not mm.has_wgmma(cp.cuda.runtime.getDevice()):
        pytest.skip("path 'wgmma' runs on Hopper (sm_90) only")


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


@pytest.mark.parametrize("rows,cols", [(3000, 2304), (5000, 2304), (9000, 2304), (70001, 256)])
@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_gemv_m1_launch_configs(rng, dtype, rows, cols):
    """The M = 1 k-quant kernel at each of its launch configurations (matmul.py _gemv1_config: one
    or two rows per lane, one or more row tiles per warp, a ragged last tile; 9 super-blocks a row
    = one full step of 8 and a partial one)."""
    dev = cp.cuda.runtime.getDevice()
    w, w_ref, x = setup(rng, dtype, rows, cols, 1)
    assert mm._use_gemv1(w, dev)
    print(f"{dtype.name} {rows}x{cols}: (R, T, grid) = {mm._gemv1_config(rows, dev)}")
    check(run(x, w, "gemv"), x, w_ref, TOL_FP32)


@pytest.mark.parametrize("m", [1, 9, 17, 40, 100, 300])
@pytest.mark.parametrize("path", ["mma", "wgmma", "cublas"])
@pytest.mark.parametrize("dtype", ALL, ids=lambda t: t.name)
def test_gemm(rng, dtype, path, m):
    """Every tile of the fused GEMMs (mma: 16, 32, 64, 128 tokens; wgmma: 64, 128; 300 = three tiles,
    the last ragged), 300 rows = three row tiles, the last ragged; rows with a padded tail."""
    need_path(path)
    w, w_ref, x = setup(rng, dtype, 300, cols_for(dtype, True), m)
    check(run(x, w, path), x, w_ref, TOL_F16)


@pytest.mark.parametrize("rows,cols", [(300, 644), (517, 2304), (17001, 256), (64, 18944)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_mmv(rng, dtype, m, rows, cols):
    """Q4_K and Q6_K on tensor cores for 1..8 tokens, W decoded into the mma fragments (mmv): a
    padded row (644 values in 3 super-blocks), 9 super-blocks a row (warp 0 takes two, the others
    one), one per row (most warps idle), 74 (long rows); ragged row groups; 17001 rows (1063
    blocks); fp32 and f16 x (what the GLU hands the down projection); fp32 and f16 out. The f16 x
    operand is exact here: x is drawn as f16 values."""
    w, w_ref, x = setup(rng, dtype, rows, cols, m)
    x = x.astype(np.float16).astype(np.float32)
    check(run(x, w, "mmv"), x, w_ref, TOL_F16)
    y16 = cp.full((m, rows), np.nan, dtype=cp.float16)
    mm.matmul(cp.asarray(x).astype(cp.float16), w, out=y16, path="mmv")
    check(y16.astype(cp.float32), x, w_ref, TOL_F16 + 2.0 ** -11)
    assert mm._default_path(m, dtype) == ("mmv" if mm.MMV_MIN_M <= m else "gemv")


@pytest.mark.parametrize("cols", [2304, 644], ids=["whole", "padded"])
@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_dependent_launch_in_graph(rng, dtype, m, cols):
    """Captured into a CUDA graph, the k-quant GEMV and mmv (each where the default dispatch takes
    it) launch as programmatic dependents on sm_90 and later: they start while the kernel before
    them runs and must still read x as that kernel wrote it. The graph: x = 3 * src (a kernel), then
    a matmul and a gate/up pair of x. Each replay gets a fresh src; its outputs must equal eager
    (plain) launches bit for bit and the oracle within tolerance."""
    from q4k_engine.kernels import build

    dev = cp.cuda.runtime.getDevice()
    if int(cp.cuda.Device(dev).compute_capability) >= 90:
        assert build.dependent_launch_available(dev), "sm_90+ without cuda-bindings: no dependent launch"
    rows = 3000
    w, w_ref, _ = setup(rng, dtype, rows, cols, m)
    wg, g_ref, _ = setup(rng, dtype, rows, cols, m)
    wu, u_ref, _ = setup(rng, dtype, rows, cols, m)
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()
    src = cp.zeros((m, cols), dtype=cp.float32)
    x = cp.empty_like(src)
    y = cp.full((m, rows), np.nan, dtype=cp.float32)
    held = {}

    def step():
        cp.multiply(src, np.float32(3), out=x)
        mm.matmul(x, w, out=y)
        held["glu"] = mm.glu_matmul(x, wg, wu, "silu")

    with stream:
        step()  # compiled and loaded before the capture
        with cp.cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            step()
            graph = stream.end_capture()
        for i in range(4):
            xs = (rng.standard_normal((m, cols)) / 3).astype(np.float16).astype(np.float32)
            xs = scaled_for_glu(xs, g_ref, u_ref).astype(np.float16).astype(np.float32) / 3
            src.set(xs)
            graph.launch(stream)
            stream.synchronize()
            got_y, got_g = cp.asnumpy(y), cp.asnumpy(held["glu"])
            x3 = 3 * xs
            check(cp.asarray(got_y), x3, w_ref, TOL_FP32 if mm._default_path(m, dtype, rows) == "gemv" else TOL_F16)
            check_glu(cp.asarray(got_g), x3, g_ref, u_ref, "silu", m > 1, False)
            eager_y = cp.asnumpy(mm.matmul(cp.asarray(x3), w))
            eager_g = cp.asnumpy(mm.glu_matmul(cp.asarray(x3), wg, wu, "silu"))
            assert got_y.tobytes() == eager_y.tobytes(), f"replay {i}: matmul differs from eager launches"
            assert got_g.tobytes() == eager_g.tobytes(), f"replay {i}: gate/up pair differs from eager launches"


@pytest.mark.parametrize("m", [1, 3, 8])
def test_mmv_reads_the_producers_operand(rng, m):
    """matmul / glu_matmul given x's MmvOperand (what a norm or decode attention writes beside x) read
    it instead of converting x: the same bits as without it when it holds x, other bits when it is
    planted with other values (so it is read); a Q6_K weight ignores it (its mmv has its own order)."""
    rows, cols = 517, 2304
    w, w_ref, x = setup(rng, GGMLType.Q4_K, rows, cols, m)
    wg, g_ref, _ = setup(rng, GGMLType.Q4_K, rows, cols, m)
    w6, w6_ref, _ = setup(rng, GGMLType.Q6_K, rows, cols, m)
    x = scaled_for_glu(x, g_ref, w_ref).astype(np.float16).astype(np.float32)
    dx = cp.asarray(x)
    xq = mm.mmv_operand(m, cols)
    mm.write_mmv_operand(dx, xq)
    y = mm.matmul(dx, w, path="mmv", xq=xq)
    check(y, x, w_ref, TOL_F16)
    assert y.get().tobytes() == mm.matmul(dx, w, path="mmv").get().tobytes()
    g = mm.glu_matmul(dx, wg, w, "silu", path="mmv", xq=xq)
    assert g.get().tobytes() == mm.glu_matmul(dx, wg, w, "silu", path="mmv").get().tobytes()
    assert mm.matmul(dx, w6, path="mmv", xq=xq).get().tobytes() == mm.matmul(dx, w6, path="mmv").get().tobytes()
    other = mm.mmv_operand(m, cols)
    mm.write_mmv_operand(dx * 2, other)
    check(mm.matmul(dx, w, path="mmv", xq=other), 2 * x, w_ref, TOL_F16)


def test_mmv_refuses_other_types_and_m(rng):
    w, _, x = setup(rng, GGMLType.Q8_0, 64, 256, 2)
    with pytest.raises(mm.UnsupportedError, match="mmv"):
        mm.matmul(cp.asarray(x), w, path="mmv")
    w, _, x = setup(rng, GGMLType.Q4_K, 64, 256, 9)
    with pytest.raises(mm.UnsupportedError, match="mmv"):
        mm.matmul(cp.asarray(x), w, path="mmv")


@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("rows", [203, 18944])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_mmv(rng, act, rows, m):
    """Gate and up (Q4_K) and the activation for 1..8 tokens in one mmv_glu launch (8 gate rows
    and the same up rows a block; 203 rows: a ragged last block, 18944: 2368 blocks), NaN-poisoned output."""
    cols = 3584 if rows > 1000 else 644
    wg, g_ref, x = setup(rng, GGMLType.Q4_K, rows, cols, m)
    wu, u_ref, _ = setup(rng, GGMLType.Q4_K, rows, cols, m)
    x = scaled_for_glu(x, g_ref, u_ref).astype(np.float16).astype(np.float32)
    out = cp.full((m, rows), np.nan, dtype=cp.float32)
    assert mm._glu_mmv(cp.asarray(x), wg, wu, act, out=out) is out
    check_glu(out, x, g_ref, u_ref, act, True, False)
    if mm.MMV_MIN_M <= m:
        y = mm.glu_matmul(cp.asarray(x), wg, wu, act)
        assert y.dtype == np.float32 and cp.asnumpy(y).tobytes() == cp.asnumpy(out).tobytes()


@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("m", [1, 13, 50, 130])
@pytest.mark.parametrize("path", ["mma", "wgmma"])
@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
def test_gemm_fused_split_k(rng, dtype, path, m, out_dtype):
    """Short matrices with long rows run split over k (parts summed in order by splitk_sum): the
    split is checked to happen; fp32 and f16 output."""
    need_path(path)
    rows, cols = 200, 4096 + 64
    w, w_ref, x = setup(rng, dtype, rows, cols, m)
    dev = cp.cuda.runtime.getDevice()
    plan = (mm._fused_plan(m, mm.smem_optin(dev)) if path == "mma" else mm._wgmma_plan_for(m, mm.smem_optin(dev)))
    splits = mm._fused_splits(-(-m // plan.bt) * -(-rows // mm.FUSED_ROWS), -(-w.kpad // 128), plan.per_sm, dev)
    print(f"{dtype.name} {rows}x{cols} M={m}: {plan.kernel}, {splits} splits")
    assert splits > 1
    out = cp.full((m, rows), np.nan, dtype=out_dtype)
    y = mm.matmul(cp.asarray(x), w, out=out, path=path)
    assert y is out
    check(y, x, w_ref, TOL_F16 + (2.0 ** -11 if out_dtype == np.float16 else 0.0))


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 100, 300, 2048])
@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_dispatch(rng, dtype, m):
    """The default choice per M, at a model-like row length (3584 = 14 super-blocks); at M = 1 a
    Q4_K matrix of few rows takes mmv, one of many rows the GEMV; on Hopper the fused GEMM's range
    from WGMMA_MIN_M takes wgmma."""
    hopper = mm.has_wgmma(cp.cuda.runtime.getDevice())
    for rows in (520, mm.MMV_M1_MAX_ROWS + 16):
        w, w_ref, x = setup(rng, dtype, rows, 3584, m)
        path = mm._default_path(m, dtype, rows, hopper)
        if m == 1:
            assert path == ("mmv" if dtype == GGMLType.Q4_K and rows <= mm.MMV_M1_MAX_ROWS else "gemv")
        if m == 100:
            assert path == ("wgmma" if hopper else "mma")
        check(run(x, w, None), x, w_ref, TOL_FP32 if path == "gemv" else TOL_F16)


@pytest.mark.parametrize("rows,m", [(300, 40), (1000, 300)])
@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_gemm_cublas_chunks(rng, dtype, rows, m, monkeypatch):
    """The peer path with a scratch smaller than W: several row chunks (3 or 8), a ragged last one."""
    w, w_ref, x = setup(rng, dtype, rows, 512, m)
    monkeypatch.setattr(mm, "SCRATCH_BYTES", 512 * 2 * 128)
    check(run(x, w, "cublas"), x, w_ref, TOL_F16)


def test_cublas_path_runs_on_the_current_stream(rng):
    """The cuBLAS handle keeps the stream its last user set: the path must put it on the caller's."""
    from q4k_engine.kernels import cublaslt

    w, w_ref, x = setup(rng, GGMLType.Q4_K, 300, 512, 40)
    mm.matmul(cp.asarray(x), w, path="cublas")  # the handle on the default stream
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        y = mm.matmul(cp.asarray(x), w, path="cublas")
        assert cublaslt._device().blas_stream == stream.ptr
    stream.synchronize()
    check(y, x, w_ref, TOL_F16)


def test_cublas_path_replays_from_a_cuda_graph(rng, monkeypatch):
    """The cuBLAS path (dequantize into a scratch, GemmEx, the GLU epilogue) captured in a CUDA graph
    and replayed on new x gives the eager product bit for bit: CuPy's own cuBLAS binding refuses
    capture, kernels/cublaslt.py's GemmEx does not. Scratch cut so that W takes 3 chunks."""
    w, _, x = setup(rng, GGMLType.Q4_K, 300, 512, 140)
    wu, _, _ = setup(rng, GGMLType.Q4_K, 300, 512, 1)
    monkeypatch.setattr(mm, "SCRATCH_BYTES", 512 * 2 * 128)
    xd = cp.asarray(x)
    mm.matmul(xd, w, path="cublas"), mm.glu_matmul(xd, w, wu, "silu", path="cublas")  # eager first
    pool, stream, out = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True), []
    with cp.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        out += [mm.matmul(xd, w, path="cublas"), mm.glu_matmul(xd, w, wu, "silu", path="cublas")]
        graph = stream.end_capture()
    for _ in range(2):
        xd[...] = cp.asarray(rng.standard_normal(x.shape).astype(np.float32))
        graph.launch()
        ref = [mm.matmul(xd, w, path="cublas"), mm.glu_matmul(xd, w, wu, "silu", path="cublas")]
        for got, want in zip(out, ref):
            cp.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("path", ["gemv", "mma", "wgmma", "cublas"])
def test_matmul_f16_in_and_out(rng, path):
    """f16 x (glu_matmul's output) and f16 y (the LM head's logits): values as the fp32 product of
    the f16-rounded x, plus the f16 rounding of the output, on both paths; x with a padded tail."""
    need_path(path)
    dtype = GGMLType.Q6_K
    w, w_ref, x = setup(rng, dtype, 300, cols_for(dtype, True), 8 if path == "gemv" else 77)
    x16 = x.astype(np.float16)
    out = cp.full((x.shape[0], w.rows), np.nan, dtype=cp.float16)
    y = mm.matmul(cp.asarray(x16), w, out=out, path=path)
    assert y is out and y.dtype == np.float16
    check(y, x16.astype(np.float32), w_ref, TOL_F16)


def act_ref(g: np.ndarray, act: str) -> np.ndarray:
    if act == "silu":
        return g / (1 + np.exp(-g))
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))


@pytest.mark.parametrize("m,path", [(1, None), (8, None), (9, "mma"), (40, "mma"), (64, "mma"), (100, "mma"),
                                    (300, "mma"), (9, "wgmma"), (64, "wgmma"), (100, "wgmma"), (300, "wgmma"),
                                    (9, "cublas"), (300, "cublas")])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F16], ids=lambda t: t.name)
def test_glu_matmul(rng, dtype, act, m, path, monkeypatch):
    """act(x Wg^T) * (x Wu^T): fp32 on the GEMV (M = 1 of the k-quants: gemv1_glu) and on mmv (2..8
    tokens of the k-quants); f16 from the fused gate/up launch (mma: 64 gate rows and their up rows
    a tile, 200 rows = a ragged last tile) or the cuBLAS path, built in row blocks (a scratch of 64
    rows per weight forces 4, the last one ragged; f16 products). Bound: check_glu."""
    need_path(path)
    rows, cols = 200, cols_for(dtype, True)
    wg, g_ref, x = setup(rng, dtype, rows, cols, m)
    wu, u_ref, _ = setup(rng, dtype, rows, cols, m)
    x = scaled_for_glu(x, g_ref, u_ref)
    monkeypatch.setattr(mm, "SCRATCH_BYTES", 2 * 64 * wg.kpad * 2)
    y = mm.glu_matmul(cp.asarray(x), wg, wu, act, path=path)
    taken = path or mm._default_path(m, dtype)
    assert y.shape == (m, rows) and y.dtype == (np.float16 if taken in ("mma", "wgmma", "cublas") else np.float32)
    check_glu(y, x, g_ref, u_ref, act, taken != "gemv", y.dtype == np.float16)


def scaled_for_glu(x: np.ndarray, g_ref: np.ndarray, u_ref: np.ndarray) -> np.ndarray:
    """x scaled so that |gate|, |up| <= 8, as in a real MLP (random blocks give products in the
    thousands; an f16 output overflows at 65504)."""
    x64 = x.astype(np.float64)
    return x * np.float32(8 / max(np.abs(x64 @ g_ref.T).max(), np.abs(x64 @ u_ref.T).max()))


def check_glu(y, x: np.ndarray, g_ref: np.ndarray, u_ref: np.ndarray, act: str, f16: bool,
              f16_out: bool | None = None) -> None:
    """Each product's error is at most tol * sum(|x||W|) (as in check(); TOL_F16 with f16
    operands); through act(g) * u (|act'| <= 1.1 for silu and gelu) that is
    tol * (1.1 * S_g * |u| + |act(g)| * S_u), plus the f16 rounding of the output (2^-11
    relative) when it is f16 (f16_out, by default as f16)."""
    f16_out = f16 if f16_out is None else f16_out
    got = cp.asnumpy(y).astype(np.float64)
    assert np.isfinite(got).all(), "non-finite output (unwritten or NaN)"
    x64 = x.astype(np.float64)
    g, u = x64 @ g_ref.T, x64 @ u_ref.T
    a = act_ref(g, act)
    ref = a * u
    scale = 1.1 * (np.abs(x64) @ np.abs(g_ref).T) * np.abs(u) + np.abs(a) * (np.abs(x64) @ np.abs(u_ref).T)
    rounding = 2.0 ** -11 * np.abs(ref) if f16_out else 0.0
    tol = TOL_F16 if f16 else TOL_FP32
    err = float(((np.abs(got - ref) - rounding) / (scale + 1e-30)).max())
    assert err <= tol, f"glu_matmul error {err:.3e} > {tol}"


@pytest.mark.parametrize("rows", [3000, 9001, 40000])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_glu_gemv1(rng, dtype, act, rows, monkeypatch):
    """One token's gate/up pair and activation in one launch (gemv1_glu): the default at M = 1 for
    the k-quants; its tilings (one tile a warp, 2 and more; an odd row count, the last tile half
    empty) against the oracle on a NaN-poisoned output, and against the three-launch path."""
    cols = 2304
    wg, g_ref, x = setup(rng, dtype, rows, cols, 1)
    wu, u_ref, _ = setup(rng, dtype, rows, cols, 1)
    x = scaled_for_glu(x, g_ref, u_ref)
    print(f"{dtype.name} {rows}x{cols}: (T, grid) = {mm._gemv1_tiling(-(-rows // 2), cp.cuda.runtime.getDevice())}")
    out = cp.full((1, rows), np.nan, dtype=cp.float32)
    assert mm._glu_gemv1(cp.asarray(x), wg, wu, act, out=out) is out
    check_glu(out, x, g_ref, u_ref, act, False)
    ops = pytest.importorskip("q4k_engine.kernels.ops")
    xs = cp.asarray(x)
    unfused = cp.asnumpy(ops.glu(mm.matmul(xs, wg, path="gemv"), mm.matmul(xs, wu, path="gemv"), act))
    np.testing.assert_allclose(cp.asnumpy(out), unfused, rtol=1e-5, atol=1e-6 * np.abs(unfused).max())
    if mm._default_path(1, dtype) == "gemv":  # the default at M = 1 where mmv does not take it
        calls = []
        monkeypatch.setattr(mm, "_glu_gemv1", lambda *a: calls.append(1) or out)
        assert mm.glu_matmul(xs, wg, wu, act) is out and calls


@pytest.mark.parametrize("gate_type,path", [(GGMLType.F16, "cublas"), (GGMLType.F16, "mma"), (GGMLType.Q6_K, "mma"),
                                             (GGMLType.Q6_K, "wgmma")],
                         ids=["F16-cublas", "F16-mma", "Q6_K-mma", "Q6_K-wgmma"])
def test_glu_matmul_mixed_types(rng, gate_type, path):
    """Gate and up of different types: the cuBLAS path cannot share one scratch when their padded
    row lengths differ (F16: 32-value units, Q4_K: 256), the fused launch needs one type: two
    matmuls and a float32 glu."""
    need_path(path)
    rows, cols, m = 96, cols_for(GGMLType.Q4_K, True), 17
    wg, g_ref, x = setup(rng, gate_type, rows, cols, m)
    wu, u_ref, _ = setup(rng, GGMLType.Q4_K, rows, cols, m)
    y = mm.glu_matmul(cp.asarray(x), wg, wu, "silu", path=path)
    assert y.dtype == np.float32 and y.shape == (m, rows)
    x64 = x.astype(np.float64)
    ref = act_ref(x64 @ g_ref.T, "silu") * (x64 @ u_ref.T)
    got = cp.asnumpy(y).astype(np.float64)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_glu_pair_f16_writes_only_its_columns(rng):
    ops = pytest.importorskip("q4k_engine.kernels.ops")
    m, n, width, col0 = 37, 70, 300, 129
    g = (rng.standard_normal((m, n)) * 3).astype(np.float16)
    u = rng.standard_normal((m, n)).astype(np.float16)
    out = cp.full((m, width), np.nan, dtype=cp.float16)
    ops.glu_pair_f16(cp.asarray(np.concatenate([g, u], axis=1)), "silu", out, col0)
    got = cp.asnumpy(out).astype(np.float64)
    ref = act_ref(g.astype(np.float64), "silu") * u.astype(np.float64)
    np.testing.assert_allclose(got[:, col0:col0 + n], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert np.isnan(got[:, :col0]).all() and np.isnan(got[:, col0 + n:]).all()


def recording_alignment(monkeypatch, ops) -> list:
    """Record what the row-wise epilogues' alignment check (ops._aligned) answers."""
    seen, aligned = [], ops._aligned
    monkeypatch.setattr(ops, "_aligned", lambda *v: seen.append(aligned(*v)) or seen[-1])
    return seen


@pytest.mark.parametrize("m,n", [(37, 64), (3, 1032), (65600, 8)])
def test_glu_pair_f16_vector_path_is_the_scalar_path(rng, m, n, monkeypatch):
    """16-byte loads and stores (aligned blocks, as the 7B's are) give the bits of the value-at-a-time
    path that every other block takes; 65,600 rows walk the grid's 65,535 rows twice."""
    ops = pytest.importorskip("q4k_engine.kernels.ops")
    prod = (rng.standard_normal((m, 2 * n)) * 3).astype(np.float16)
    seen = recording_alignment(monkeypatch, ops)
    fast = cp.full((m, n + 16), np.nan, dtype=cp.float16)
    ops.glu_pair_f16(cp.asarray(prod), "silu", fast, 8)
    assert seen == [True]
    monkeypatch.setattr(ops, "_aligned", lambda *v: False)
    slow = cp.full((m, n + 16), np.nan, dtype=cp.float16)
    ops.glu_pair_f16(cp.asarray(prod), "silu", slow, 8)
    fast, slow = cp.asnumpy(fast), cp.asnumpy(slow)
    np.testing.assert_array_equal(fast.view(np.uint16), slow.view(np.uint16))
    got = fast.astype(np.float64)
    ref = act_ref(prod[:, :n].astype(np.float64), "silu") * prod[:, n:].astype(np.float64)
    np.testing.assert_allclose(got[:, 8:8 + n], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert np.isnan(got[:, :8]).all() and np.isnan(got[:, 8 + n:]).all()


@pytest.mark.parametrize("dtype", ALL, ids=lambda t: t.name)
def test_dequantize_rows_f16(rng, dtype):
    """The cuBLAS path's scratch writer: rows [r0, r0+n) as f16, row stride kpad, nothing else written."""
    rows, cols, r0, n = 70, cols_for(dtype, True), 13, 41
    raw = random_weight(rng, dtype, rows, cols)
    w = mm.prepare_weight(dtype, (rows, cols), cp.asarray(raw))
    out = cp.full((n + 1, w.kpad), np.nan, dtype=cp.float16)
    mm.dequantize_rows_f16(w, r0, n, out)
    got = cp.asnumpy(out).astype(np.float32)
    ref = dequantize_ref(raw, dtype, (rows, cols))[r0:r0 + n].astype(np.float16).astype(np.float32)
    assert np.isfinite(got[:n]).all() and np.isnan(got[n]).all()
    np.testing.assert_allclose(got[:n, :cols], ref, rtol=2e-3, atol=1e-3 * np.abs(ref).max())


def test_gemm_cublas_unaligned_x(rng):
    """x contiguous but starting 4 bytes past an aligned address: the x -> f16 conversion must not
    use 16-byte loads there (a misaligned load would fault)."""
    w, w_ref, _ = setup(rng, GGMLType.F32, 40, 196, 1)
    flat = rng.standard_normal(1 + 8 * 196).astype(np.float32)
    x = cp.asarray(flat)[1:].reshape(8, 196)
    assert x.data.ptr % 16 == 4 and x.flags.c_contiguous
    for path in ("cublas", "mma", "wgmma"):
        if path == "wgmma" and not mm.has_wgmma(cp.cuda.runtime.getDevice()):
            continue
        out = cp.full((8, 40), np.nan, dtype=cp.float32)
        check(mm.matmul(x, w, out=out, path=path), flat[1:].reshape(8, 196), w_ref, TOL_F16)


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


@pytest.mark.parametrize("model", ["gemma", "smollm"])
def test_real_tensors(rng, model):
    """Every 2-D weight type of the two real models, on the model's own bytes (up to 1024 rows of its
    first tensor of that type): GEMV at M = 1 and 8, mmv at M = 2 and 8 (Q4_K, Q6_K), the cuBLAS
    path at M = 17, the fused GEMMs at M = 17 and 130 (mma; wgmma on Hopper), and row gather."""
    import realmodels
    from q4k_engine.loader import open_model

    mf = open_model(realmodels.gemma_path() if model == "gemma" else realmodels.smollm_path())
    seen = set()
    for t in mf.tensors.values():
        if len(t.shape) != 2 or t.dtype in seen:
            continue
        seen.add(t.dtype)
        rows = min(t.rows, 1024)
        raw = np.ascontiguousarray(t.data[: rows * t.row_bytes])
        w = mm.prepare_weight(t.dtype, (rows, t.cols), cp.asarray(raw))
        w_ref = dequantize_ref(raw, t.dtype, (rows, t.cols)).astype(np.float64)
        print(f"{model} {t.name} {t.dtype.name} {rows}x{t.cols}")
        mmv = ((2, "mmv", TOL_F16), (8, "mmv", TOL_F16)) if t.dtype in mm.MMV_TYPES else ()
        wgmma = (((17, "wgmma", TOL_F16), (130, "wgmma", TOL_F16))
                 if mm.has_wgmma(cp.cuda.runtime.getDevice()) else ())
        for m, path, tol in ((1, "gemv", TOL_FP32), (8, "gemv", TOL_FP32), *mmv, (17, "cublas", TOL_F16),
                             (17, "mma", TOL_F16), (130, "mma", TOL_F16), *wgmma):
            x = rng.standard_normal((m, t.cols)).astype(np.float32)
            check(run(x, w, path), x, w_ref, tol)
        ids = rng.integers(0, rows, 9).astype(np.int32)
        np.testing.assert_allclose(cp.asnumpy(mm.gather_rows(w, cp.asarray(ids))), w_ref[ids], rtol=1e-6, atol=1e-6)
    assert len(seen) >= 2, f"{model}: expected several weight types, saw {sorted(x.name for x in seen)}"

