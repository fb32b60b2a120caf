"""Quantized matmul on the GPU: y[M, out] = x[M, in] . W^T with W kept in its GGML blocks.

Paths (kernels/matmul.cu, one compiled module per GGML type):
- "gemv"   M <= 8: one pass over W for all M tokens, fp32 activations and accumulation; at M = 1
           the k-quants' gate/up pair and its activation in one launch (gemv1_glu).
- "mmv"    Q4_K / Q6_K, M <= 8: tensor cores with W decoded straight into the mma fragments (no
           shared-memory tile), x as f16; its time barely grows with M (the GEMV's fp32 FMAs do).
           Q4_K's gate/up pair and activation in one launch.
- "mma"    fused tensor-core GEMM: W dequantized a tile at a time into shared memory as f16 (never
           into a global scratch), x as f16, mma.sync with fp32 sums; split-K for short matrices;
           gate and up of a gated MLP in one launch with the activation in the epilogue. Token
           tiles as large as the device's shared memory allows (on ~99 KiB parts such as GB10:
           32 tokens); where none fits, the default dispatch says so and takes the cuBLAS path.
- "wgmma"  Hopper (sm_90) only: the fused GEMM on wgmma (asynchronous warpgroup MMA, operands in
           shared memory), its W tile of the next k step dequantized while the tensor cores work on
           this one; the same arguments, tiles, split-K and gate/up epilogue as "mma", its portable twin.
- "cublas" peer: W dequantized to f16 in chunks of rows into a bounded scratch, then cuBLAS
           (f16 operands, fp32 accumulation and output).
FP8 mode (precision="fp8", engine/fp8.py): `matmul_fp8` and `glu_matmul_fp8` expand W to e4m3 in
chunks of rows like the cuBLAS path's f16 and multiply through cuBLASLt (kernels/cublaslt.py); the
CUDA backend takes them for prefill's products, never for decode's or the LM head.
`matmul` and `glu_matmul` pick gemv for M = 1, mmv for 2..8 tokens of Q4_K/Q6_K (other types:
gemv up to GEMV_MAX_M), mma up to FUSED_MAX_M tokens (on Hopper wgmma from WGMMA_MIN_M) and the
cuBLAS path above: the crossovers measured in bench/RESULTS.md; `path=` forces one (tests, benchmarks).
While a CUDA graph is captured (decode steps), the k-quant GEMV (gemv1_*) and mmv's two kernels
launch as programmatic dependents on sm_90 and later (kernels/build.py launch): their first weight
loads overlap the kernel before them, which they wait for before reading x.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from q4k_engine.dtypes import TYPE_INFO, SUPPORTED, GGMLType, row_bytes
from q4k_engine.errors import FallbackWarning, InputError, UnsupportedError
from q4k_engine.tensors import QTensor

from .build import _arch, _cupy, launch, module, sm_count as _sm_count

# The GEMV is the default up to GEMV_MAX_M tokens (Q4_K/Q6_K: mmv from MMV_MIN_M on), the fused
# GEMM's 16-token tile above: on the 7B's matrices (H200, bench/RESULTS.md "decode's M") the GEMV,
# whose fp32 FMAs grow with M, beat that tile at M <= 2 and lost from 3 on (Q4_K, sum a layer at
# M = 3: 187 vs 162 us).
GEMV_MAX_M = 2
# gemv_m<M> exists for M = 1..8: a forced "gemv" path walks larger M in chunks of this many tokens.
_GEMV_TOKENS = 8
# The fused GEMM (path "mma") is the default for GEMV_MAX_M < M <= FUSED_MAX_M, the dequantize +
# cuBLAS peer above: where the two crossed on the 7B's shapes on an H200 (bench/RESULTS.md, "a
# fused quantized GEMM": kernel tables, and the 7B's 1x128 forward, 1.25x faster with 128 than 64).
FUSED_MAX_M = 128
# matmul.cu gemm_bt<BT>: W tile rows (BO), tokens per tile (BT), f16 values a shared-memory row (LDS).
FUSED_ROWS = 128
FUSED_TILES = (16, 32, 64, 128)
_FUSED_LDS = 128 + 8
# Cap of the cuBLAS path's f16 scratch (and of glu_matmul's product blocks). 64 MB keeps the
# chunks large enough for cuBLAS (a 7B MLP weight in 3 chunks, its LM head in 17) while a 7B
# teacher's peak stays near its weights (bench/RESULTS.md, "Model").
SCRATCH_BYTES = 64 << 20
# Plain float types have no blocks; the kernels walk them in units of 32 values.
_UNIT = 32
# The dequantize kernels index their 8-value pieces (or 32-value units) with 32-bit integers.
_MAX_PIECES = 1 << 30


def padded_cols(dtype: GGMLType, cols: int) -> int:
    """Row length the kernels walk for a weight of `cols` columns: whole blocks (float types: whole
    32-value units); x is zero-padded to it."""
    unit = max(TYPE_INFO[GGMLType(dtype)].block_size, _UNIT)
    return -(-cols // unit) * unit


@dataclass(frozen=True)
class GpuWeight:
    """A weight matrix [out, in] on the GPU in its stored GGML type.

    `data` holds the file's bytes; for Q6_K they are permuted once into per-tensor planes
    (ql | qh | scales | d) so that every quant load is 16-byte aligned (same size, no dequantized copy).
    """

    dtype: GGMLType
    shape: tuple[int, int]
    data: object  # cupy uint8 [rows * row_bytes]
    fp8_scale: tuple | None = None  # the FP8 mode's (scale, inverse) per row, fp32 [rows]: with_fp8_scales

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
        return padded_cols(self.dtype, self.cols)

    @functools.cached_property
    def pieces_per_row(self) -> int:
        """8-value pieces per row (kpad / 8): the work items of prep_f16 and gather_f32."""
        return self.kpad // 8

    @functools.cached_property
    def units_per_row(self) -> int:
        """32-value units per row (kpad / 32): the work items of the e4m3 kernels on W."""
        return self.kpad // 32

    @functools.cached_property
    def _args(self) -> tuple:
        # Cached: every launch passes them, and a matmul at a few hundred tokens is launch-bound.
        return (self.data, np.int64(self.row_bytes), np.int64(self.rows * self.blocks_per_row),
                np.int32(self.blocks_per_row), np.int32(self.cols))

    def kernel_args(self) -> tuple:
        """(base, row_bytes, total blocks, blocks per row, cols) as matmul.cu's WDesc wants them."""
        return self._args


def _repack_q6k(raw, nblk: int):
    """Q6_K blocks (ql[128] qh[64] scales[16] d[2], 210 B, 2-byte aligned) -> four planes, copied
    plane by plane into one new array: the upload's peak is twice the tensor, not four times."""
    cp = _cupy()
    b = raw.reshape(nblk, 210)
    out = cp.empty(raw.size, cp.uint8)
    at = 0
    for lo, hi in ((0, 128), (128, 192), (192, 208), (208, 210)):
        out[at:at + nblk * (hi - lo)].reshape(nblk, hi - lo)[...] = b[:, lo:hi]
        at += nblk * (hi - lo)
    return out


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


def module_defines(dtype: GGMLType) -> dict[str, int]:
    """The -D defines of matmul.cu's module for one GGML type (kernels/check.py compiles every one)."""
    return dict(QTYPE=int(dtype))


@functools.lru_cache(maxsize=None)
def _function(dtype: GGMLType, name: str, device: int):
    """A kernel of matmul.cu for one type, looked up once per device (launch overhead matters)."""
    return module("matmul.cu", **module_defines(dtype)).get_function(name)


def _kernel(w: GpuWeight, name: str):
    return _function(w.dtype, name, _cupy().cuda.runtime.getDevice())


def _padded_x(x, w: GpuWeight):
    """x (C-contiguous float32 [M, cols]) as [M, kpad] with a zero tail: the layout gemv/mma read."""
    if w.kpad == w.cols:
        return x
    cp = _cupy()
    xp = cp.zeros((x.shape[0], w.kpad), dtype=cp.float32)
    xp[:, : w.cols] = x
    return xp


def _gemv_rows(m: int) -> int:
    """Rows per lane of gemv_m<m> (matmul.cu gemv_rows); a block covers 4 times as many."""
    return 2 if m == 1 else 8 if m == 8 else 4


# gemv1_r<R> (M = 1, Q4_K / Q6_K): x staged in shared memory, so the row length is bounded.
_GEMV1_TYPES = (GGMLType.Q4_K, GGMLType.Q6_K)
_GEMV1_MAX_SMEM = 160 << 10
_GEMV1_WARPS = 8


@functools.lru_cache(maxsize=None)
def smem_optin(device: int) -> int:
    """The most dynamic shared memory a block may opt in to on `device` (H100/H200: 227 KiB)."""
    return int(_cupy().cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"])


def _gemv1_smem(w: GpuWeight) -> int:
    """x as fp32 [kpad] plus one fp32 sum per scale group (Q4_K: 32 values, Q6_K: 16)."""
    return w.kpad * 4 + w.kpad // (32 if w.dtype == GGMLType.Q4_K else 16) * 4


@functools.lru_cache(maxsize=None)
def _gemv1_config(rows: int, device: int) -> tuple[int, int, int]:
    """(R, T, grid) for `rows` rows: R rows per lane (a warp owns 2R rows), T row tiles per warp,
    grid blocks of 8 warps, 2 of which are resident per SM (a "wave" = 2 * SMs blocks).
    Measured on an H200 (bench/bench_kernels.py and variants): two rows per lane once the rows fill
    a wave with them (each x value serves both; 18944 rows: +10%, 3584 rows: -8%); two tiles per
    warp when that brings 1-2 waves down to one (14336 rows: +10%; 18944 rows, 2.2 waves: -10%);
    waves/4 tiles per warp from 8 waves on (x staged once per block for more rows; LM head +17%)."""
    r = 2 if rows >= 2 * 2 * _GEMV1_WARPS * 2 * _sm_count(device) else 1
    return (r, *_gemv1_tiling(-(-rows // (2 * r)), device))


def _gemv1_tiling(tiles: int, device: int) -> tuple[int, int]:
    """(T, grid) for `tiles` warp tiles: T tiles per warp, grid blocks of 8 warps (_gemv1_config)."""
    waves = tiles / (_GEMV1_WARPS * 2 * _sm_count(device))
    t = 2 if 1 < waves <= 2 else max(1, int(waves) // 4)
    return t, -(-tiles // (_GEMV1_WARPS * t))


def _use_gemv1(w: GpuWeight, device: int) -> bool:
    """gemv1 for Q4_K always; for Q6_K except long rows (> 4096 values) in matrices too short for 2
    rows per lane, where the generic gemv_m1 measured as fast or faster (H200, 3584x18944: 0.45 vs
    0.43 of copy bandwidth; 4096x14336: 0.49 vs 0.50)."""
    if w.dtype not in _GEMV1_TYPES or _gemv1_smem(w) > min(_GEMV1_MAX_SMEM, smem_optin(device)):
        return False
    return w.dtype == GGMLType.Q4_K or w.kpad <= 4096 or _gemv1_config(w.rows, device)[0] == 2


def _gemv1_kernel(w: GpuWeight, name: str, dev: int):
    """(kernel, dynamic shared memory) of a gemv1 kernel for W, opted in above the 48 KiB default
    when x's row is long."""
    kern = _function(w.dtype, name, dev)
    smem = _gemv1_smem(w)
    if smem > 48 << 10 and kern.max_dynamic_shared_size_bytes < smem:
        kern.max_dynamic_shared_size_bytes = smem
    return kern, smem


def _gemv1(xp, w: GpuWeight, y, dev: int) -> None:
    """M = 1 on the k-quant kernel gemv1_r<R> (row 0 of xp [.., kpad] fp32 into row 0 of y [.., rows] fp32)."""
    r, t, grid = _gemv1_config(w.rows, dev)
    kern, smem = _gemv1_kernel(w, f"gemv1_r{r}", dev)
    launch(kern, (grid,), (32 * _GEMV1_WARPS,), (*w.kernel_args(), xp, y, np.int32(w.rows), np.int32(t)),
           shared_mem=smem, dependent=True)


def _glu_gemv1(x, wg: GpuWeight, wu: GpuWeight, act: str, out=None):
    """M = 1: act(x . Wg^T) * (x . Wu^T) as fp32 [1, rows] from gemv1_glu, one launch: a lane
    holds row r of gate and row r of up (as gemv1_r2 holds two rows of one matrix), so a warp tile
    is 2 rows of the output and the grid is planned as gemv1_r2's over 2 * rows rows."""
    from . import ops

    cp = _cupy()
    dev = cp.cuda.runtime.getDevice()
    xp = _padded_x(x, wg)
    y = cp.empty((1, wg.rows), dtype=cp.float32) if out is None else out
    t, grid = _gemv1_tiling(-(-wg.rows // 2), dev)
    kern, smem = _gemv1_kernel(wg, "gemv1_glu", dev)
    launch(kern, (grid,), (32 * _GEMV1_WARPS,), (*wg.kernel_args(), wu.data, xp, y, np.int32(wg.rows), np.int32(t),
                                                 np.int32(ops.ACTS[act])), shared_mem=smem, dependent=True)
    return y


def _glu_gemv1_fits(x, wg: GpuWeight, wu: GpuWeight) -> bool:
    """gemv1_glu takes one token, gate and up of one k-quant type whose x fits its shared memory."""
    dev = _cupy().cuda.runtime.getDevice()
    return (x.shape[0] == 1 and wg.dtype == wu.dtype and wg.dtype in _GEMV1_TYPES
            and _gemv1_smem(wg) <= min(_GEMV1_MAX_SMEM, smem_optin(dev)))


def _gemv(xp, w: GpuWeight, y, m0: int, m: int) -> None:
    """Tokens [m0, m0+m) (m <= 8) of xp into the same rows of y."""
    if m == 1:
        dev = _cupy().cuda.runtime.getDevice()
        if _use_gemv1(w, dev):
            _gemv1(xp[m0:] if m0 else xp, w, y[m0:] if m0 else y, dev)
            return
    kern = _kernel(w, f"gemv_m{m}")
    grid = (-(-w.rows // (4 * _gemv_rows(m))),)
    x, out = (xp[m0:], y[m0:]) if m0 else (xp, y)
    kern(grid, (256,), (*w.kernel_args(), x, np.int32(xp.shape[1]), out, np.int32(y.shape[1]), np.int32(w.rows)))


def _fused_tile(m: int) -> int:
    """Tokens per tile of the fused GEMM for M tokens: the smallest tile that holds them, else 128."""
    return next((bt for bt in FUSED_TILES if m <= bt), FUSED_TILES[-1])


@dataclass(frozen=True)
class _FusedPlan:
    """One fused launch: kernel names (plain, gate/up), tokens per tile, shared memory, blocks an SM,
    threads a block."""

    kernel: str
    glu_kernel: str
    bt: int
    smem: int
    per_sm: int
    threads: int = 256


@functools.lru_cache(maxsize=1024)  # called per matmul: a few hundred a forward at small M
def _fused_plan(m: int, smem_limit: int | None = None) -> _FusedPlan | None:
    """The launch for M tokens: the token tile that holds them (else 128), or the largest smaller
    one whose shared memory fits `smem_limit` (a device's opt-in limit per block: 227 KiB on
    H100/H200, 163 KiB on A100, about 99 KiB on consumer Blackwell and GB10, where tiles of 64 and
    128 tokens do not fit and M is covered by several 32-token tiles); None when none fits."""
    for bt in reversed([t for t in FUSED_TILES if t <= _fused_tile(m)]):
        smem = (2 * FUSED_ROWS + (3 if bt <= 32 else 2) * bt) * _FUSED_LDS * 2  # GemmShape<BT>::SMEM
        if smem_limit is None or smem <= smem_limit:
            return _FusedPlan(f"gemm_bt{bt}", f"gate_up_bt{bt}", bt, smem, 1 if bt == 128 else 2)
    return None


@functools.lru_cache(maxsize=None)
def _no_fused_tile(device: int) -> None:
    """Say once per device that the fused GEMM's smallest tile does not fit its shared memory."""
    warnings.warn(f"GPU {device}: {smem_optin(device)} bytes of shared memory per block hold no tile of the "
                  "fused quantized GEMM: matmuls of more than 8 tokens run as dequantize + cuBLAS",
                  FallbackWarning, stacklevel=4)


def _mma_plan(m: int, forced: bool) -> _FusedPlan | None:
    """The fused launch for M tokens on the current device; None (after saying why, once) when its
    shared memory holds no tile and the path was the default's choice, an error when it was forced."""
    dev = _cupy().cuda.runtime.getDevice()
    plan = _fused_plan(m, smem_optin(dev))
    if plan is None:
        if forced:
            raise UnsupportedError(f"GPU {dev}: {smem_optin(dev)} bytes of shared memory per block hold no tile "
                                   "of the fused quantized GEMM (path 'mma')")
        _no_fused_tile(dev)
    return plan


# matmul.cu wg_gemm_bt<BT> / wg_gate_up_bt<BT> (sm_90a): token tiles, and their shared memory: 3
# stages of the W tile (FUSED_ROWS x 128 f16) and 4 of the x tile (BT x 128 f16), one block of
# WGMMA_THREADS an SM.
WGMMA_TILES = (64, 128)
WGMMA_THREADS = 512


def _wgmma_smem(bt: int) -> int:
    return (3 * FUSED_ROWS + 4 * bt) * 128 * 2  # WgShape<BT>::SMEM


def has_wgmma(device: int) -> bool:
    """Whether the device runs the wgmma kernels: kernels/build.py compiles for sm_90a there (Hopper).
    Other GPUs (A100, Blackwell, GB10) take the mma.sync kernels."""
    return _arch(device) == "sm_90a"


@functools.lru_cache(maxsize=1024)
def _wgmma_plan_for(m: int, smem_limit: int) -> _FusedPlan | None:
    """The wgmma launch for M tokens: 64-token tiles up to 64 tokens, else 128 (the larger tile
    where its shared memory fits the device); None when neither fits."""
    tile = next((bt for bt in WGMMA_TILES if m <= bt), WGMMA_TILES[-1])
    for bt in reversed([t for t in WGMMA_TILES if t <= tile]):
        if _wgmma_smem(bt) <= smem_limit:
            return _FusedPlan(f"wg_gemm_bt{bt}", f"wg_gate_up_bt{bt}", bt, _wgmma_smem(bt), 1, WGMMA_THREADS)
    return None


def _wgmma_plan(m: int, forced: bool) -> _FusedPlan | None:
    """The wgmma launch on the current device; None where it cannot run (not Hopper, or too little
    shared memory), an error when the path was forced."""
    dev = _cupy().cuda.runtime.getDevice()
    plan = _wgmma_plan_for(m, smem_optin(dev)) if has_wgmma(dev) else None
    if plan is None and forced:
        raise UnsupportedError(f"GPU {dev}: path 'wgmma' needs a Hopper GPU (sm_90) with "
                               f"{_wgmma_smem(WGMMA_TILES[0])} bytes of shared memory per block")
    return plan


@functools.lru_cache(maxsize=None)
def _fused_function(dtype: GGMLType, name: str, smem: int, device: int):
    kern = _function(dtype, name, device)
    kern.max_dynamic_shared_size_bytes = smem  # above the 48 KiB default: opt in once
    return kern


def _fused_splits(tiles: int, ktiles: int, per_sm: int, device: int) -> int:
    """Splits of k for a grid of `tiles` blocks: enough blocks to fill the GPU once (`per_sm`
    resident an SM), at least 4 k tiles (of 128 values) a split, at most 16."""
    slots = _sm_count(device) * per_sm
    if 2 * tiles > slots:
        return 1
    return max(1, min(slots // tiles, ktiles // 4, 16))


def _x16(x, w: GpuWeight):
    """x as the fused GEMM's f16 operand [M, kpad] (zero tail, 16-byte aligned rows): an f16 x as
    is when it already is one, else converted (or padded) in one launch."""
    x16 = _x16_ready(x, w)
    if x16 is None:
        x16 = _cupy().empty((x.shape[0], w.kpad), dtype=np.float16)
        _prep_f16(w, 0, 0, x16, x, x16)
    return x16


def _gemm_fused(x, w: GpuWeight, y, plan: _FusedPlan) -> None:
    """y (fp32 or f16 [M, rows]) = x . W^T on gemm_bt<BT> (matmul.cu, BT from the plan), split
    over k when the row tiles alone would leave SMs idle (fp32 parts in a workspace, summed in
    order by splitk_sum)."""
    cp = _cupy()
    dev = cp.cuda.runtime.getDevice()
    m = x.shape[0]
    x16 = _x16(x, w)
    grid = (-(-m // plan.bt), -(-w.rows // FUSED_ROWS))
    s = _fused_splits(grid[0] * grid[1], -(-w.kpad // 128), plan.per_sm, dev)
    ws = cp.empty((s, m, w.rows), dtype=cp.float32) if s > 1 else None
    f16 = np.int32(y.dtype == np.float16)
    _fused_function(w.dtype, plan.kernel, plan.smem, dev)(
        (*grid, s), (plan.threads,), (*w.kernel_args(), x16, np.int32(x16.shape[1]), np.int32(m), y, np.int32(y.shape[1]),
                             f16, ws if ws is not None else y, np.int32(w.rows)), shared_mem=plan.smem)
    if ws is not None:
        n = m * w.rows
        _function(w.dtype, "splitk_sum", dev)((int(min(-(-n // 256), 8 * 65535)),), (256,),
                                             (ws, np.int32(s), np.int32(m), np.int32(w.rows), y,
                                              np.int32(y.shape[1]), f16))


def _glu_fused(x, wg: GpuWeight, wu: GpuWeight, act: str, plan: _FusedPlan):
    """act(x . Wg^T) * (x . Wu^T) as f16 [M, rows] from one fused gate/up launch (same type and
    shape of gate and up): 64 gate rows and the same 64 up rows a tile, the activation in the
    epilogue; the two [M, rows] products never exist."""
    from . import ops

    cp = _cupy()
    dev = cp.cuda.runtime.getDevice()
    m = x.shape[0]
    x16 = _x16(x, wg)
    out = cp.empty((m, wg.rows), dtype=cp.float16)
    grid = (-(-m // plan.bt), -(-wg.rows // (FUSED_ROWS // 2)))
    _fused_function(wg.dtype, plan.glu_kernel, plan.smem, dev)(
        grid, (plan.threads,), (wg.data, wu.data, *wg.kernel_args()[1:], x16, np.int32(x16.shape[1]), np.int32(m),
                       out, np.int32(wg.rows), np.int32(wg.rows), np.int32(ops.ACTS[act])),
        shared_mem=plan.smem)
    return out


def _prep_f16(w: GpuWeight, r0: int, n: int, out, x=None, x16=None) -> None:
    """Rows [r0, r0+n) of W as f16 into out[:n, :kpad] and, if x is given, x as f16 [M, kpad]
    (zero tail) into x16, in one launch. out/x16 C-contiguous, row stride kpad, 16-byte aligned."""
    m = 0 if x is None else x.shape[0]
    if max(n, m) * w.pieces_per_row >= _MAX_PIECES:
        raise InputError(f"f16 conversion of {max(n, m)} rows x {w.kpad} values at once: split it in chunks")
    wblocks = -(-n * w.pieces_per_row // 256)
    xblocks = -(-m * w.pieces_per_row // 256)
    # Without x the kernel never reads its x pointers: `out` stands in for them.
    x, x16 = (out, out) if x is None else (x, x16)
    _kernel(w, "prep_f16")((wblocks + xblocks,), (256,),
                           (*w.kernel_args(), np.int32(r0), np.int32(n), out, x, np.int32(w.cols), np.int32(m), x16))


def dequantize_rows_f16(w: GpuWeight, r0: int, n: int, out) -> None:
    """Rows [r0, r0+n) of W as f16 into out[:n, :kpad] (C-contiguous, row stride kpad)."""
    _prep_f16(w, r0, n, out)


def _chunk_rows(w: GpuWeight, scratch_bytes: int, m: int = 0, out_bytes: int = 0) -> int:
    """Rows of W per chunk: the f16 chunk within scratch_bytes (and, with out_bytes, the chunk's
    fp32 [m, rows] products within it too), split evenly over the chunks that this makes. Whole
    64-row groups keep y's column offsets 256-byte aligned for cuBLAS's fast kernels."""
    cap = scratch_bytes // (w.kpad * 2)
    if out_bytes and m:
        cap = min(cap, out_bytes // (4 * m))
    cap = max(64, cap // 64 * 64)
    if cap >= w.rows:
        return w.rows
    chunks = -(-w.rows // cap)
    return min(cap, -(-w.rows // (chunks * 64)) * 64)


def _gemm_block(w16, n: int, x16, m: int, kpad: int, c_ptr: int, c_dtype, ldc: int) -> None:
    """Column-major y^T[n, M] = W16[n, kpad] . x16^T[kpad, M] with f16 operands and fp32 sums,
    written as c_dtype (float32 or float16) at c_ptr with leading dimension ldc: y[M, ldc] row-major.
    cuBLAS GemmEx through kernels/cublaslt.py, which a CUDA graph can capture (CuPy's binding cannot)."""
    from . import cublaslt

    cublaslt.gemm_f16(w16.data.ptr, n, x16.data.ptr, m, kpad, c_ptr, np.dtype(c_dtype) == np.float16, ldc)


def _x16_ready(x, w: GpuWeight):
    """An f16 x as the [M, kpad] operand (padded copy only if kpad > cols), else None: prep_f16
    converts an fp32 x in the launch that dequantizes W's first chunk."""
    if x.dtype != np.float16:
        return None
    if w.kpad == x.shape[1] and x.data.ptr % 16 == 0:
        return x
    cp = _cupy()
    x16 = cp.zeros((x.shape[0], w.kpad), dtype=cp.float16)
    x16[:, : x.shape[1]] = x
    return x16


def _gemm_cublas(x, w: GpuWeight, y) -> None:
    """Chunks of W's rows dequantized to f16 in a scratch of at most SCRATCH_BYTES, then cuBLAS GemmEx.

    x is the unpadded fp32 (or f16) input; the first chunk's launch also writes an fp32 x as f16
    [M, kpad]. y is float32 or float16. Column-major view: y^T[out, M] = W[out, kpad] . x^T[kpad, M];
    a chunk of rows is a column block of y (pointer offset r0, leading dimension out), so no copy
    of the output either.
    """
    cp = _cupy()
    m, kpad = x.shape[0], w.kpad
    chunk = _chunk_rows(w, SCRATCH_BYTES)
    scratch = cp.empty((chunk, kpad), dtype=cp.float16)
    x16 = _x16_ready(x, w)
    convert = x16 is None
    if convert:
        x16 = cp.empty((m, kpad), dtype=cp.float16)
    for r0 in range(0, w.rows, chunk):
        n = min(chunk, w.rows - r0)
        _prep_f16(w, r0, n, scratch, x if convert and r0 == 0 else None, x16)
        _gemm_block(scratch, n, x16, m, kpad, y.data.ptr + y.itemsize * r0, y.dtype, y.shape[1])


def _glu_cublas(x, wg: GpuWeight, wu: GpuWeight, act: str):
    """act(x . Wg^T) * (x . Wu^T) as f16 [M, rows], a block of rows of both weights at a time.

    Per block, gate rows and up rows are dequantized into one f16 scratch [2n, kpad] and multiplied
    by one GemmEx into f16 products [M, 2n] (fp32 sums), which glu_pair_f16 turns into the output's
    columns. Only one block's products exist, never the two whole [M, rows] ones.
    """
    cp = _cupy()
    from . import ops

    m, kpad = x.shape[0], wg.kpad
    # A block: 2n scratch rows within SCRATCH_BYTES, products (2n x M f16 = 4M bytes a row) too.
    chunk = _chunk_rows(wg, SCRATCH_BYTES // 2, m, SCRATCH_BYTES)
    scratch = cp.empty((2 * chunk, kpad), dtype=cp.float16)
    prod = cp.empty(m * 2 * chunk, dtype=cp.float16)
    out = cp.empty((m, wg.rows), dtype=cp.float16)
    x16 = cp.empty((m, kpad), dtype=cp.float16)
    for r0 in range(0, wg.rows, chunk):
        n = min(chunk, wg.rows - r0)
        _prep_f16(wg, r0, n, scratch, x if r0 == 0 else None, x16)
        _prep_f16(wu, r0, n, scratch[n:])
        _gemm_block(scratch, 2 * n, x16, m, kpad, prod.data.ptr, np.float16, 2 * n)
        ops.glu_pair_f16(prod[: m * 2 * n].reshape(m, 2 * n), act, out, r0)
    return out


def with_fp8_scales(w: GpuWeight) -> GpuWeight:
    """w with the FP8 mode's row scales (engine/fp8.py: amax|row| / 448 and its inverse),
    computed once on the device from the stored quants."""
    cp = _cupy()
    scale, inv = cp.empty(w.rows, cp.float32), cp.empty(w.rows, cp.float32)
    if w.rows:
        _kernel(w, "row_scales_e4m3")((w.rows,), (256,), (*w.kernel_args(), scale, inv))
    return replace(w, fp8_scale=(scale, inv))


def _prep_e4m3(w: GpuWeight, r0: int, n: int, out) -> None:
    """Rows [r0, r0+n) of W as e4m3 bytes into out[:n, :kpad] (C-contiguous uint8, row stride kpad)."""
    if w.fp8_scale is None:
        raise InputError(f"FP8 product of a {w.dtype.name} {w.shape} weight without its row scales (with_fp8_scales)")
    if n * w.pieces_per_row >= _MAX_PIECES:
        raise InputError(f"e4m3 conversion of {n} rows x {w.kpad} values at once: split it in chunks")
    _kernel(w, "prep_e4m3")((-(-n * w.units_per_row // 256),), (256,),
                            (*w.kernel_args(), np.int32(r0), np.int32(n), w.fp8_scale[1], out))


def _x_e4m3(x, w: GpuWeight):
    from . import ops

    if x.ndim != 2 or x.shape[1] != w.cols or x.dtype not in (np.float32, np.float16):
        raise InputError(f"FP8 matmul: x must be float32 or float16 [M, {w.cols}], got {x.dtype} {tuple(x.shape)}")
    if x.shape[0] and x.strides[1] != x.itemsize:
        x = _cupy().ascontiguousarray(x)
    return ops.quant_rows_e4m3(x, w.kpad)


def matmul_fp8(x, w: GpuWeight, out=None):
    """The FP8 mode's product (engine/fp8.py): float32 y [M, rows] = x . W^T with x and W in e4m3
    (row scales), fp32 sums by cuBLASLt, then the scales. W is expanded to e4m3 a chunk of rows at
    a time into a scratch of at most SCRATCH_BYTES, as the fp16 path's cuBLAS route does with f16.
    out: a C-contiguous float32 [M, rows] to write (tests poison it first)."""
    from . import cublaslt, ops

    cp = _cupy()
    x8, a = _x_e4m3(x, w)
    m = x.shape[0]
    y = ops._out(out, (m, w.rows))
    if m == 0:
        return y
    # cuBLASLt's FP8 products take whole 16s of rows (cublaslt.padded): a row count of W that is
    # not one goes through a padded output and a copy; only the last chunk can be ragged.
    ld = cublaslt.padded(w.rows)
    d = y if ld == w.rows else cp.empty((m, ld), cp.float32)
    chunk = _chunk_rows(w, 2 * SCRATCH_BYTES)  # one byte a value; _chunk_rows counts two
    scratch = cp.empty((cublaslt.padded(chunk), w.kpad), cp.uint8)
    for r0 in range(0, w.rows, chunk):
        n = min(chunk, w.rows - r0)
        _prep_e4m3(w, r0, n, scratch)
        cublaslt.gemm_e4m3(scratch, cublaslt.padded(n), x8, m, w.kpad, d.data.ptr + 4 * r0, ld)
    if d is not y:
        y[...] = d[:, : w.rows]
    ops.fp8_rescale(y, a, w.fp8_scale[0])
    return y


def glu_matmul_fp8(x, wg: GpuWeight, wu: GpuWeight, act: str):
    """act(x . Wg^T) * (x . Wu^T) in the FP8 mode, as float16 [M, rows] (the fp16 path's cuBLAS
    route gives the same type): per block of rows, gate and up rows expanded to e4m3 into one
    scratch, one FP8 product into fp32 sums [M, 2n], then glu_pair_fp8 (scales, activation). Padded
    row lengths that differ take two products and a separate glu (float32), as on the fp16 path."""
    from . import cublaslt, ops

    if wg.shape != wu.shape:
        raise InputError(f"glu_matmul: gate {wg.shape} and up {wu.shape} weights differ")
    if wg.kpad != wu.kpad:
        gate = matmul_fp8(x, wg)
        return ops.glu(gate, matmul_fp8(x, wu), act, out=gate)
    cp = _cupy()
    x8, a = _x_e4m3(x, wg)
    m, kpad = x.shape[0], wg.kpad
    out = cp.empty((m, wg.rows), dtype=cp.float16)
    if m == 0:
        return out
    # A block: 2n e4m3 rows (the bytes of n f16 rows) within SCRATCH_BYTES, fp32 sums [M, 2n] too.
    chunk = _chunk_rows(wg, SCRATCH_BYTES, m, SCRATCH_BYTES // 2)
    scratch = cp.empty((cublaslt.padded(2 * chunk), kpad), dtype=cp.uint8)
    d = cp.empty(m * cublaslt.padded(2 * chunk), dtype=cp.float32)
    for r0 in range(0, wg.rows, chunk):
        n = min(chunk, wg.rows - r0)
        ld = cublaslt.padded(2 * n)  # the product's columns past 2n (a ragged last block) are not read
        _prep_e4m3(wg, r0, n, scratch)
        _prep_e4m3(wu, r0, n, scratch[n:])
        cublaslt.gemm_e4m3(scratch, ld, x8, m, kpad, d.data.ptr, ld)
        ops.glu_pair_fp8(d[: m * ld].reshape(m, ld), a, wg.fp8_scale[0][r0:r0 + n],
                         wu.fp8_scale[0][r0:r0 + n], act, out, r0, n)
    return out


_Q4K_VALUES = TYPE_INFO[GGMLType.Q4_K].block_size  # 256: values a super-block


class MmvOperand(NamedTuple):
    """x [M, cols] (M <= 8, cols whole 256-value super-blocks) as the Q4_K mmv reads it (kernels/
    mmv_x.cuh): x8 f16 [M, cols], xsub uint32 [cols / 256 * 64] (the sub-block sums of x8, hi + lo
    f16 pairs in the mins' fragment order, zeros for tokens M..7). The kernel that makes a small
    batch's x writes it beside x (ops.rmsnorm, ops.add_rmsnorm, decode attention), so that the
    products reading x need no conversion launch of their own."""

    x8: object
    xsub: object


def mmv_operand(m: int, cols: int) -> MmvOperand | None:
    """Empty buffers of x [m, cols]'s Q4_K mmv operand, for a producer to write; None where no Q4_K
    mmv could read it (m outside 1..MMV_MAX_M, or rows that are not whole super-blocks)."""
    if not 1 <= m <= MMV_MAX_M or cols % _Q4K_VALUES or not cols:
        return None
    cp = _cupy()
    return MmvOperand(cp.empty((m, cols), dtype=cp.float16), cp.empty(cols // _Q4K_VALUES * 64, dtype=cp.uint32))


def write_mmv_operand(x, xq: MmvOperand) -> None:
    """xq from x (fp32 or f16 [M, n], n <= xq's columns, zeros past n; row-contiguous) with matmul.cu's
    mmv_x: for a producer that cannot write it itself, and for an x without one."""
    m, kpad = xq.x8.shape
    if x.shape[0] != m or x.shape[1] > kpad or x.dtype not in (np.float32, np.float16) or x.strides[1] != x.itemsize:
        raise InputError(f"mmv operand of [{m}, {kpad}] from x {x.dtype} {tuple(x.shape)}")
    ldx = x.strides[0] // x.itemsize if m > 1 else x.shape[1]
    nb = kpad // _Q4K_VALUES
    launch(_function(GGMLType.Q4_K, "mmv_x", _cupy().cuda.runtime.getDevice()), (MMV_MAX_M * nb,), (256,),
           (x, np.int32(x.dtype == np.float16), np.int32(ldx), np.int32(m), np.int32(x.shape[1]), np.int32(nb),
            xq.x8, xq.xsub), dependent=True)


def _x8(x, w: GpuWeight, xq: MmvOperand | None = None):
    """x (fp32 or f16 [M, cols], M <= 8) as mmv's operands: (x8, xsub). Q4_K: the MmvOperand (xq if
    the producer of x wrote it, else from mmv_x). Q6_K: x8 is [M][blocks][256] in the order its lanes
    read (mmv_x, matmul.cu), and no xsub (x8 fills its argument)."""
    cp = _cupy()
    m = x.shape[0]
    if w.dtype == GGMLType.Q4_K:
        if xq is None or xq.x8.shape != (m, w.kpad):
            xq = mmv_operand(m, w.kpad)
            write_mmv_operand(x, xq)
        return xq
    x8 = cp.empty((m, w.kpad), dtype=cp.float16)
    n = m * w.blocks_per_row * 64
    launch(_kernel(w, "mmv_x"), (-(-n // 256),), (256,), (x, np.int32(x.dtype == np.float16), np.int32(x.shape[1]),
                                                         np.int32(m), np.int32(w.cols), np.int32(w.blocks_per_row), x8,
                                                         x8), dependent=True)
    return x8, x8


def _mmv(x, w: GpuWeight, y, xq: MmvOperand | None = None) -> None:
    """y (fp32 [M, rows], M <= 8) = x . W^T on mmv_r1 (Q4_K/Q6_K on tensor cores, W decoded into the
    mma fragments, f16 operands, fp32 sums), a block of 8 warps a group of 16 rows."""
    launch(_kernel(w, "mmv_r1"), (-(-w.rows // 16),), (256,),
           (*w.kernel_args(), *_x8(x, w, xq), np.int32(x.shape[0]), y, np.int32(y.shape[1]), np.int32(w.rows)),
           dependent=True)


def _glu_mmv(x, wg: GpuWeight, wu: GpuWeight, act: str, out=None, xq: MmvOperand | None = None):
    """act(x . Wg^T) * (x . Wu^T) as fp32 [M, rows] (M <= 8, Q4_K) from one mmv_glu launch: the mma's
    16 rows are 8 gate rows and the same 8 up rows, a block a group (other types: two mmv and a glu)."""
    from . import ops

    cp = _cupy()
    m = x.shape[0]
    y = cp.empty((m, wg.rows), dtype=cp.float32) if out is None else out
    launch(_kernel(wg, "mmv_glu"), (-(-wg.rows // 8),), (256,),
           (*wg.kernel_args(), wu.data, *_x8(x, wg, xq), np.int32(m), y, np.int32(wg.rows), np.int32(wg.rows),
            np.int32(ops.ACTS[act])), dependent=True)
    return y


PATHS = ("gemv", "mmv", "mma", "wgmma", "cublas")
# mmv takes 1..8 tokens of these types; the default from MMV_MIN_M tokens on (below, the GEMV):
# H200, 7B shapes graph-replayed, mmv beats the GEMV on every Q4_K matrix from M = 2 (e.g. the
# gate/up pair 43.9 vs 67.6 us); Q6_K from 2 on the LM head and the gate/up pair, from 3 on the
# others; one bound for both types, as batch-2 decode steps were fastest with it (1.24x the GEMV's).
MMV_TYPES = (GGMLType.Q4_K, GGMLType.Q6_K)
MMV_MAX_M = 8
MMV_MIN_M = 2
# At M = 1, Q4_K matrices of at most this many rows take mmv too (its sub-block-scaled Q4_K kernel,
# H200, graph-replayed: 3584x18944 18.2 vs the GEMV's 26.3 us, 4608x3584 8.6 vs 9.9, 3584x3584 6.0
# vs 6.7, 512x3584 3.7 vs 4.1); on more rows the GEMV keeps it (152064x3584: 110.8 vs 126.6 us).
MMV_M1_MAX_ROWS = 8192


# On Hopper the wgmma GEMM takes the fused GEMM's default range from WGMMA_MIN_M tokens on (up to
# FUSED_MAX_M; the cuBLAS path above). H200, the 7B's shapes at M = 128 (bench/RESULTS.md, eleventh
# session): wgmma / mma = 0.74 (gate/up pair), 0.80 (down), 0.72-0.82 (q+k+v, o); at M = 512 and 2048
# the cuBLAS path stays faster on most shapes. Below 65 tokens (its 64-token tile) it was not measured.
WGMMA_MIN_M = 65


def _default_path(m: int, dtype: GGMLType | None = None, rows: int | None = None, wgmma: bool = False) -> str:
    """The path for M tokens of a weight of `dtype` with `rows` rows; wgmma: the device runs it."""
    if dtype in MMV_TYPES and MMV_MIN_M <= m <= MMV_MAX_M:
        return "mmv"
    if m == 1 and dtype == GGMLType.Q4_K and rows is not None and rows <= MMV_M1_MAX_ROWS:
        return "mmv"
    if wgmma and WGMMA_MIN_M <= m <= FUSED_MAX_M:
        return "wgmma"
    return "gemv" if m <= GEMV_MAX_M else "mma" if m <= FUSED_MAX_M else "cublas"


def _check_mmv(m: int, dtype: GGMLType) -> None:
    if dtype not in MMV_TYPES or m > MMV_MAX_M:
        raise UnsupportedError(f"path 'mmv' takes {', '.join(t.name for t in MMV_TYPES)} weights and at most "
                               f"{MMV_MAX_M} tokens, got {GGMLType(dtype).name} and {m}")


def matmul(x, w: GpuWeight, out=None, path: str | None = None, xq: MmvOperand | None = None):
    """y[M, out] = x[M, in] . W^T.

    x is float32, or float16 (what glu_matmul hands the down projection: the fused and cuBLAS
    paths take it as their operand, the GEMV widens it). `out` (C-contiguous [M, out], float32 or float16) is
    written if given; else a float32 one is made. Sums are fp32 whatever the output type.
    xq: x's MmvOperand where x's producer wrote one (read by the Q4_K mmv instead of converting x).
    """
    cp = _cupy()
    if x.ndim != 2 or x.shape[1] != w.cols:
        raise InputError(f"matmul: x has shape {tuple(x.shape)}, weight is {w.shape} (need [M, {w.cols}])")
    if x.dtype not in (np.float32, np.float16):
        raise InputError(f"matmul: x must be float32 or float16, got {x.dtype}")
    x = cp.ascontiguousarray(x)
    m = x.shape[0]
    if out is None:
        out = cp.empty((m, w.rows), dtype=cp.float32)
    elif out.shape != (m, w.rows) or out.dtype not in (np.float32, np.float16) or not out.flags.c_contiguous:
        raise InputError(f"matmul: out must be C-contiguous float32/float16 {(m, w.rows)}, got {out.dtype} {out.shape}")
    if m == 0:
        return out
    forced = path is not None
    path = path or _default_path(m, w.dtype, w.rows, has_wgmma(cp.cuda.runtime.getDevice()))
    if path not in PATHS:
        raise InputError(f"matmul: unknown path {path!r}; one of {PATHS}")
    if path == "mmv":
        _check_mmv(m, w.dtype)
    plan = _mma_plan(m, forced) if path == "mma" else _wgmma_plan(m, forced) if path == "wgmma" else None
    if path == "cublas" or (path in ("mma", "wgmma") and plan is None):
        _gemm_cublas(x, w, out)
        return out
    if path in ("mma", "wgmma"):
        _gemm_fused(x, w, out, plan)
        return out
    # gemv and mmv write fp32 y (gemv reads fp32 x, mmv converts x to its own f16 operand).
    y = out if out.dtype == np.float32 else cp.empty((m, w.rows), dtype=cp.float32)
    if path == "mmv":
        _mmv(x, w, y, xq)
    else:
        xp = _padded_x(x.astype(cp.float32, copy=False), w)
        for m0 in range(0, m, _GEMV_TOKENS):
            _gemv(xp, w, y, m0, min(_GEMV_TOKENS, m - m0))
    if y is not out:
        out[...] = y
    return out


def glu_matmul(x, wg: GpuWeight, wu: GpuWeight, act: str, path: str | None = None, xq: MmvOperand | None = None):
    """act(x . Wg^T) * (x . Wu^T), the input of a gated MLP's down projection.

    On the mmv path (2..8 tokens of Q4_K/Q6_K by default) it is float32 [M, rows], from one
    launch when gate and up are Q4_K. On the mma path (up to FUSED_MAX_M tokens) with gate and up
    of one type, it is float16 [M, rows] from one fused launch (fp32 sums and activation, one rounding).
    On the cuBLAS path (M above) it is float16 [M, rows] too: the f16 operand the down
    projection's cuBLAS path would round it to anyway, built a block of rows at a time (a 7B MLP
    at 2048 tokens then holds 78 MB, not the 310 MB of two fp32 products); gate and up products
    are rounded to f16 before the activation. Otherwise it is float32: on the GEMV (one launch at
    M = 1 for the k-quants), and from two matmuls and an in-place glu where one launch cannot take
    the pair (on the mma path gate and up of two types; on the cuBLAS path padded row lengths that
    differ; check_kernel_limits warns of the last two when the model is loaded). xq: as matmul's.
    """
    from . import ops

    if wg.shape != wu.shape:
        raise InputError(f"glu_matmul: gate {wg.shape} and up {wu.shape} weights differ")
    if x.ndim != 2 or x.shape[1] != wg.cols or x.dtype != np.float32:
        raise InputError(f"glu_matmul: x must be float32 [M, {wg.cols}], got {x.dtype} {tuple(x.shape)}")
    x = _cupy().ascontiguousarray(x)
    forced = path is not None
    # No rows: at M = 1 the pair stays on gemv1_glu, which beats mmv_glu there (MMV_M1_MAX_ROWS).
    path = path or _default_path(x.shape[0], wg.dtype if wg.dtype == wu.dtype else None,
                                 wgmma=has_wgmma(_cupy().cuda.runtime.getDevice()))
    if path == "mmv" and x.shape[0]:
        _check_mmv(x.shape[0], wg.dtype)
        if wg.dtype == wu.dtype == GGMLType.Q4_K:
            return _glu_mmv(x, wg, wu, act, xq=xq)
    if path not in PATHS:
        raise InputError(f"glu_matmul: unknown path {path!r}; one of {PATHS}")
    if path in ("mma", "wgmma") and x.shape[0]:
        plan = (_mma_plan if path == "mma" else _wgmma_plan)(x.shape[0], forced)
        if plan is None:
            path = "cublas"
        elif wg.dtype == wu.dtype:
            return _glu_fused(x, wg, wu, act, plan)
    if path == "cublas" and x.shape[0] and wg.kpad == wu.kpad:
        return _glu_cublas(x, wg, wu, act)
    if path == "gemv" and _glu_gemv1_fits(x, wg, wu):
        return _glu_gemv1(x, wg, wu, act)
    gate = matmul(x, wg, path=path)
    return ops.glu(gate, matmul(x, wu, path=path), act, out=gate)


def gather_rows(w: GpuWeight, ids):
    """Rows ids (cupy int32 [N]) of W dequantized to float32 [N, cols]: embedding lookup."""
    cp = _cupy()
    ids = cp.ascontiguousarray(ids, dtype=cp.int32)
    n = ids.shape[0]
    out = cp.empty((n, w.cols), dtype=cp.float32)
    if n * w.pieces_per_row >= _MAX_PIECES:
        raise InputError(f"gather_rows: {n} rows at once is too many: split it in chunks")
    if n:
        _kernel(w, "gather_f32")((-(-n * w.pieces_per_row // 256),), (256,),
                                 (*w.kernel_args(), ids, np.int32(n), out))
    return out
