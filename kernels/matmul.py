"""Quantized matmul on the GPU: y[M, out] = x[M, in] . W^T with W kept in its GGML blocks.

Paths (kernels/matmul.cu, one compiled module per GGML type):
- "gemv"   M <= 8: one pass over W for all M tokens, fp32 activations and accumulation.
- "mma"    fused tensor-core GEMM: W tiles dequantized into shared memory as f16, mma.sync.
- "cublas" peer: W dequantized to f16 in chunks of rows into a bounded scratch, then cuBLAS
           (f16 operands, fp32 accumulation and output).
`matmul` picks gemv for M <= 8 and, above, the GEMM path measured faster for that M
(bench/RESULTS.md, "Kernels"); `path=` forces one (tests, benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from q4k_engine.dtypes import TYPE_INFO, SUPPORTED, GGMLType, row_bytes
from q4k_engine.errors import InputError, UnsupportedError
from q4k_engine.tensors import QTensor

from .build import _cupy, module

GEMV_MAX_M = 8
GEMV_ROWS_PER_BLOCK = 16  # 4 row slots x GEMV_ROWS (matmul.cu)
GEMM_TILE = 128  # BO = BT in matmul.cu
GEMM_SMEM_BYTES = (128 + 128) * (128 + 8) * 2
# Dequantize + cuBLAS beats the fused mma.sync kernel from 512 tokens on, and already at 128 tokens
# when rows are long and few (cols >= 2 * rows: too few 128-row tiles to fill the GPU); measured on
# an H200, bench/RESULTS.md "Kernels". Elsewhere the fused kernel avoids writing the f16 scratch.
CUBLAS_MIN_M = 512
CUBLAS_MIN_M_LONG_ROWS = 128
SCRATCH_BYTES = 256 << 20  # cap of the f16 scratch of the cuBLAS path
# Plain float types have no blocks; the kernels walk them in units of 32 values.
_UNIT = 32


@dataclass(frozen=True)
class GpuWeight:
    """A weight matrix [out, in] on the GPU in its stored GGML type.

    `data` holds the file's bytes; for Q6_K they are permuted once into per-tensor planes
    (ql | qh | scales | d) so that every quant load is 16-byte aligned (same size, no dequantized copy).
    """

    dtype: GGMLType
    shape: tuple[int, int]
    data: object  # cupy uint8 [rows * row_bytes]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.dtype, self.cols)

    @property
    def block_values(self) -> int:
        return max(TYPE_INFO[self.dtype].block_size, _UNIT)

    @property
    def blocks_per_row(self) -> int:
        """Units of `block_values` per row (for float types: 32-value units, the last one partial)."""
        return -(-self.cols // self.block_values)

    @property
    def kpad(self) -> int:
        """Row length the kernels walk: whole blocks; x is zero-padded to it."""
        return self.blocks_per_row * self.block_values

    def kernel_args(self) -> tuple:
        """(base, row_bytes, total blocks, blocks per row, cols) as matmul.cu's WDesc wants them."""
        return (self.data, np.int64(self.row_bytes), np.int64(self.rows * self.blocks_per_row),
                np.int32(self.blocks_per_row), np.int32(self.cols))


def _repack_q6k(raw, nblk: int):
    """Q6_K blocks (ql[128] qh[64] scales[16] d[2], 210 B, 2-byte aligned) -> four planes."""
    cp = _cupy()
    b = raw.reshape(nblk, 210)
    return cp.concatenate([b[:, :128].ravel(), b[:, 128:192].ravel(), b[:, 192:208].ravel(), b[:, 208:].ravel()])


def prepare_weight(dtype: GGMLType, shape: tuple[int, ...], raw) -> GpuWeight:
    """Wrap (and for Q6_K, repack) the raw bytes of a [out, in] tensor already on the GPU."""
    dtype = GGMLType(dtype)
    if dtype not in SUPPORTED:
        raise UnsupportedError(f"GPU matmul: type {dtype.name} is not supported")
    if len(shape) != 2:
        raise InputError(f"GPU matmul: weight shape {tuple(shape)} is not 2-D [out, in]")
    rows, cols = int(shape[0]), int(shape[1])
    expected = rows * row_bytes(dtype, cols)
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != expected:
        raise InputError(f"GPU matmul: {dtype.name} {shape} needs {expected} uint8 bytes, got {raw.dtype} {raw.shape}")
    if dtype == GGMLType.Q6_K:
        raw = _repack_q6k(raw, rows * (cols // 256 + (cols % 256 > 0)))
    return GpuWeight(dtype, (rows, cols), raw)


def upload_weight(t: QTensor) -> GpuWeight:
    """Copy a stored matrix to the GPU once, in its own type."""
    cp = _cupy()
    shape = (t.rows, t.cols)
    return prepare_weight(t.dtype, shape, cp.asarray(np.ascontiguousarray(t.data)))


def _module(w: GpuWeight):
    return module("matmul.cu", QTYPE=int(w.dtype))


def _padded_x(x, w: GpuWeight):
    """x as C-contiguous float32 [M, kpad] (zero tail), the layout every kernel reads."""
    cp = _cupy()
    if x.ndim != 2 or x.shape[1] != w.cols:
        raise InputError(f"matmul: x has shape {tuple(x.shape)}, weight is {w.shape} (need [M, {w.cols}])")
    if x.dtype != np.float32:
        raise InputError(f"matmul: x must be float32, got {x.dtype}")
    if w.kpad == w.cols:
        return cp.ascontiguousarray(x)
    xp = cp.zeros((x.shape[0], w.kpad), dtype=cp.float32)
    xp[:, : w.cols] = x
    return xp


def _gemv(xp, w: GpuWeight, y, m0: int, m: int) -> None:
    """Tokens [m0, m0+m) (m <= 8) of xp into the same rows of y."""
    kern = _module(w).get_function(f"gemv_m{m}")
    grid = (-(-w.rows // GEMV_ROWS_PER_BLOCK),)
    kern(grid, (256,), (*w.kernel_args(), xp[m0:], np.int32(xp.shape[1]), y[m0:], np.int32(y.shape[1]),
                        np.int32(w.rows)))


def _gemm_mma(xp, w: GpuWeight, y) -> None:
    kern = _module(w).get_function("gemm_mma")
    kern.max_dynamic_shared_size_bytes = GEMM_SMEM_BYTES
    grid = (-(-w.rows // GEMM_TILE), -(-xp.shape[0] // GEMM_TILE))
    kern(grid, (256,), (*w.kernel_args(), xp, np.int32(xp.shape[1]), np.int32(xp.shape[0]), y,
                        np.int32(y.shape[1]), np.int32(w.rows)), shared_mem=GEMM_SMEM_BYTES)


def dequantize_rows_f16(w: GpuWeight, r0: int, n: int, out) -> None:
    """Rows [r0, r0+n) of W as f16 into out[:n, :kpad] (C-contiguous, row stride kpad)."""
    kern = _module(w).get_function("dequant_f16")
    units = n * w.blocks_per_row * (w.block_values // _UNIT)
    kern((-(-units // 256),), (256,), (*w.kernel_args(), np.int32(r0), np.int32(n), out, np.int64(w.kpad)))


def _gemm_cublas(xp, w: GpuWeight, y) -> None:
    """Chunks of W's rows dequantized to f16 in a scratch of at most SCRATCH_BYTES, then cuBLAS GemmEx.

    Column-major view: y^T[out, M] = W[out, kpad] . x^T[kpad, M]; a chunk of rows is a column
    block of y (pointer offset r0, leading dimension out), so no copy of the output either.
    """
    cp = _cupy()
    from cupy.cuda import cublas, runtime

    m, kpad = xp.shape
    x16 = xp.astype(cp.float16)
    # Chunks of whole 64-row groups keep y's column offsets 256-byte aligned for cuBLAS's fast kernels.
    chunk = min(w.rows, max(64, SCRATCH_BYTES // (kpad * 2) // 64 * 64))
    scratch = cp.empty((chunk, kpad), dtype=cp.float16)
    handle = cp.cuda.device.get_cublas_handle()
    alpha, beta = np.ones(1, np.float32), np.zeros(1, np.float32)
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        for r0 in range(0, w.rows, chunk):
            n = min(chunk, w.rows - r0)
            dequantize_rows_f16(w, r0, n, scratch)
            cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, m, kpad,
                          alpha.ctypes.data, scratch.data.ptr, runtime.CUDA_R_16F, kpad,
                          x16.data.ptr, runtime.CUDA_R_16F, kpad,
                          beta.ctypes.data, y.data.ptr + 4 * r0, runtime.CUDA_R_32F, y.shape[1],
                          cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)
    finally:
        cublas.setPointerMode(handle, mode)


PATHS = ("gemv", "mma", "cublas")


def _default_path(m: int, w: GpuWeight) -> str:
    if m <= GEMV_MAX_M:
        return "gemv"
    long_rows = w.cols >= 2 * w.rows
    return "cublas" if m >= (CUBLAS_MIN_M_LONG_ROWS if long_rows else CUBLAS_MIN_M) else "mma"


def matmul(x, w: GpuWeight, out=None, path: str | None = None):
    """y[M, out] = x[M, in] . W^T, float32; `out` (C-contiguous float32 [M, out]) is written if given."""
    cp = _cupy()
    xp = _padded_x(x, w)
    m = xp.shape[0]
    if out is None:
        out = cp.empty((m, w.rows), dtype=cp.float32)
    elif out.shape != (m, w.rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise InputError(f"matmul: out must be C-contiguous float32 {(m, w.rows)}, got {out.dtype} {out.shape}")
    if m == 0:
        return out
    if path is None:
        path = _default_path(m, w)
    if path == "gemv":
        for m0 in range(0, m, GEMV_MAX_M):
            _gemv(xp, w, out, m0, min(GEMV_MAX_M, m - m0))
    elif path == "mma":
        _gemm_mma(xp, w, out)
    elif path == "cublas":
        _gemm_cublas(xp, w, out)
    else:
        raise InputError(f"matmul: unknown path {path!r}; one of {PATHS}")
    return out


def gather_rows(w: GpuWeight, ids):
    """Rows ids (cupy int32 [N]) of W dequantized to float32 [N, cols]: embedding lookup."""
    cp = _cupy()
    ids = cp.ascontiguousarray(ids, dtype=cp.int32)
    n = ids.shape[0]
    out = cp.empty((n, w.cols), dtype=cp.float32)
    if n:
        kern = _module(w).get_function("gather_f32")
        units = n * w.blocks_per_row * (w.block_values // _UNIT)
        kern((-(-units // 256),), (256,), (*w.kernel_args(), ids, np.int32(n), out))
    return out
