"""GGML block formats in NumPy: dequantizers for every supported type, quantizers for Q4_K/Q6_K/Q8_0.

Dequantization is bit-exact with gguf-py's `gguf.quants.dequantize` (and so with GGML's
dequantize_row_*): every product is a float32 operation in the same order, e.g. Q4_K is
`(d * sc) * q - (dmin * m)` and Q6_K `(d * sc) * q`. NumPy ufuncs never fuse a multiply and an
add, so nothing is rounded differently.

Quantizers port GGML's reference (`quantize_row_*_ref`, i.e. what llama.cpp writes without an
importance matrix) with its float32 arithmetic, sequential sums and `nearest_int` rounding,
vectorized over all blocks instead of looping over them.

Byte layouts (little-endian, per block; see apr-v2-format.md §5):
  Q4_0 (32 values, 18 B): f16 d | 16 B nibbles (low nibbles = values 0-15, high = 16-31); v = d*(q-8)
  Q4_1 (32, 20 B): f16 d | f16 m | 16 B nibbles; v = d*q + m
  Q5_0 (32, 22 B): f16 d | u32 high bits (bit j -> value j) | 16 B nibbles; v = d*(q-16)
  Q8_0 (32, 34 B): f16 d | 32 x int8; v = d*q
  Q4_K (256, 144 B): f16 d | f16 dmin | 12 B packed 6-bit (scale, min) x 8 | 128 B nibbles
  Q5_K (256, 176 B): f16 d | f16 dmin | 12 B scales | 32 B high bits | 128 B nibbles
  Q6_K (256, 210 B): 128 B low nibbles | 64 B high 2-bit pairs | 16 x int8 scales | f16 d
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .dtypes import SUPPORTED, TYPE_INFO, GGMLType, row_bytes
from .errors import FormatError, InputError, UnsupportedError
from .tensors import QTensor

QUANTIZABLE: frozenset[GGMLType] = frozenset(
    {GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K}
)

# Work on about this many values at a time: the temporaries of a chunk stay in cache, and a whole
# token embedding (167M values for Gemma 3) never needs several full-size float32 temporaries.
_CHUNK_VALUES = 1 << 18

_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")
_U16 = np.dtype("<u2")


# ----------------------------------------------------------------------------------------------
# shared helpers


def _as_type(dtype: GGMLType | int) -> GGMLType:
    try:
        return GGMLType(int(dtype))
    except ValueError:
        raise UnsupportedError(f"GGML type code {int(dtype)} is unknown") from None


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows, (shape[-1] if shape else 1)


def _unpack(x: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Split each byte of x[..., L] into `count` fields of `bits` bits: out[..., k, l] = field k of x[..., l].

    Field 0 is the least significant. This one rule covers every GGML packing: nibble pairs
    (low field first), Q6_K's 2-bit high pairs and the 1-bit high masks of Q5_K.
    """
    shifts = np.arange(0, bits * count, bits, dtype=np.uint8).reshape(count, 1)
    return (x[..., None, :] >> shifts) & np.uint8((1 << bits) - 1)


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 at byte `offset` of every block, as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view(_F16).astype(np.float32)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 [n] -> its IEEE half (round to nearest even, as GGML_FP32_TO_FP16) as bytes [n, 2]."""
    return values.astype(_F16).reshape(-1, 1).view(np.uint8)


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """GGML's nearest_int: add 1.5*2^23 in float32 and read the low mantissa bits.

    That is round-half-to-even for |v| < 2^22. It is emulated bit for bit, so that the odd inputs
    the reference code can produce (inf, NaN, huge values) also give GGML's result.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        biased = (v.astype(np.float32, copy=False) + np.float32(12582912.0)).view(np.int32)
    return (biased & 0x007FFFFF) - 0x00400000


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum a[n, g] over axis 0 strictly in order, in float32, as GGML's C loops do.

    np.sum adds pairwise and rounds differently. The quantizers keep values first ([n, groups])
    so that each step here is one contiguous vector add over all groups.
    """
    total = a[0].astype(np.float32)
    for row in a[1:]:
        total += row
    return total


# ----------------------------------------------------------------------------------------------
# dequantization: one function per block type, blocks [n, type_size] uint8 -> out [n, block_size]


def _dq_q4_0(b: np.ndarray, out: np.ndarray) -> None:
    q = _unpack(b[:, 2:], 4, 2).reshape(len(b), 32).view(np.int8) - np.int8(8)
    np.multiply(q, _f16_field(b, 0), out=out)


def _dq_q4_1(b: np.ndarray, out: np.ndarray) -> None:
    q = _unpack(b[:, 4:], 4, 2).reshape(len(b), 32)
    np.multiply(q, _f16_field(b, 0), out=out)
    out += _f16_field(b, 2)


def _dq_q5_0(b: np.ndarray, out: np.ndarray) -> None:
    high = np.unpackbits(b[:, 2:6], axis=1, bitorder="little")  # bit j of the LE u32 -> value j
    q = (_unpack(b[:, 6:], 4, 2).reshape(len(b), 32) | (high << np.uint8(4))).view(np.int8) - np.int8(16)
    np.multiply(q, _f16_field(b, 0), out=out)


def _dq_q8_0(b: np.ndarray, out: np.ndarray) -> None:
    np.multiply(b[:, 2:].view(np.int8), _f16_field(b, 0), out=out)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> (scales [n, 8], mins [n, 8]), GGML's get_scale_min_k4.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales/mins 4-7 keep their
    low nibbles in bytes 8-11 and their top 2 bits in the spare top bits of bytes 0-3 / 4-7.
    """
    lo_sc, lo_m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], axis=1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc, mn


def _dq_kquant_affine(b: np.ndarray, out: np.ndarray, q: np.ndarray) -> None:
    """Shared tail of Q4_K and Q5_K: out = (d*sc) * q - (dmin*m) per 32-value sub-block."""
    sc, mn = _k4_scales(b[:, 4:16])
    o = out.reshape(len(b), 8, 32)
    np.multiply(q, (_f16_field(b, 0) * sc)[:, :, None], out=o)
    o -= (_f16_field(b, 2) * mn)[:, :, None]


def _dq_q4_k(b: np.ndarray, out: np.ndarray) -> None:
    # qs: 4 chunks of 32 bytes; low nibbles are sub-block 2c, high nibbles sub-block 2c+1
    q = _unpack(b[:, 16:].reshape(len(b), 4, 32), 4, 2).reshape(len(b), 8, 32)
    _dq_kquant_affine(b, out, q)


def _dq_q5_k(b: np.ndarray, out: np.ndarray) -> None:
    low = _unpack(b[:, 48:].reshape(len(b), 4, 32), 4, 2).reshape(len(b), 8, 32)
    high = _unpack(b[:, 16:48], 1, 8)  # bit j of qh[l] is the 5th bit of sub-block j, value l
    _dq_kquant_affine(b, out, low | (high << np.uint8(4)))


def _dq_q6_k(b: np.ndarray, out: np.ndarray) -> None:
    n = len(b)
    # 2 halves of 128 values; in each, 32-value group k (0..3) takes the low (k<2) or high nibbles
    # of ql[64h + 32(k%2) + l] and bits 2k..2k+1 of qh[32h + l]
    low = _unpack(b[:, :128].reshape(n, 2, 64), 4, 2).reshape(n, 8, 32)
    high = _unpack(b[:, 128:192].reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
    q = (low | (high << np.uint8(4))).view(np.int8) - np.int8(32)
    scale = _f16_field(b, 208) * b[:, 192:208].view(np.int8)  # [n, 16], one per 16 values
    np.multiply(q.reshape(n, 16, 16), scale[:, :, None], out=out.reshape(n, 16, 16))


_DEQUANT: dict[GGMLType, Callable[[np.ndarray, np.ndarray], None]] = {
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q4_1: _dq_q4_1,
    GGMLType.Q5_0: _dq_q5_0,
    GGMLType.Q8_0: _dq_q8_0,
    GGMLType.Q4_K: _dq_q4_k,
    GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
}


def _dequant_floats(data: np.ndarray, dtype: GGMLType) -> np.ndarray:
    if dtype == GGMLType.F32:
        return data.view(_F32).astype(np.float32)  # a copy: never alias a read-only file mapping
    if dtype == GGMLType.F16:
        return data.view(_F16).astype(np.float32)
    return (data.view(_U16).astype(np.uint32) << np.uint32(16)).view(np.float32)  # BF16


def dequantize(
    data: np.ndarray, dtype: GGMLType | int, shape: tuple[int, ...], *, name: str = "tensor"
) -> np.ndarray:
    """Decode a row-major tensor's bytes to float32 of `shape`.

    Each row (last dim) occupies row_bytes(dtype, cols) bytes; when cols is not a multiple of the
    block size, the row's last block is padded and the padded values are dropped. `name` only
    labels error messages.
    """
    dtype = _as_type(dtype)
    if dtype not in SUPPORTED:
        raise UnsupportedError(f"{name}: cannot dequantize GGML type {dtype.name}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise FormatError(f"{name}: negative dimension in shape {shape}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise FormatError(f"{name}: expected 1-D uint8 bytes, got {data.dtype} array of shape {data.shape}")
    rows, cols = _rows_cols(shape)
    rb = row_bytes(dtype, cols)
    if data.size != rows * rb:
        raise FormatError(
            f"{name}: {dtype.name} tensor of shape {shape} needs {rows * rb} bytes "
            f"({rows} rows x {rb}), got {data.size}"
        )
    if dtype not in _DEQUANT:
        return _dequant_floats(data, dtype).reshape(shape)

    info = TYPE_INFO[dtype]
    padded_cols = rb // info.type_size * info.block_size
    out = np.empty((rows, padded_cols), np.float32)
    blocks = data.reshape(-1, info.type_size)
    out_blocks = out.reshape(-1, info.block_size)
    step = max(1, _CHUNK_VALUES // info.block_size)
    decode = _DEQUANT[dtype]
    for s in range(0, len(blocks), step):
        decode(blocks[s : s + step], out_blocks[s : s + step])
    if padded_cols != cols:
        out = np.ascontiguousarray(out[:, :cols])
    return out.reshape(shape)


def dequantize_rows(t: QTensor, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor (rows = all dims but the last) as float32 [stop-start, cols].

    Only those rows' bytes are read (a zero-copy slice), so this serves embedding lookups and
    tile-by-tile matmuls of tensors too large to decode whole.
    """
    if t.data.size != t.nbytes:
        raise FormatError(f"{t.name}: {t.dtype.name} shape {t.shape} needs {t.nbytes} bytes, holds {t.data.size}")
    if not 0 <= start <= stop <= t.rows:
        raise InputError(f"{t.name}: row range [{start}, {stop}) outside [0, {t.rows})")
    rb = t.row_bytes
    return dequantize(t.data[start * rb : stop * rb], t.dtype, (stop - start, t.cols), name=t.name)


# ----------------------------------------------------------------------------------------------
# quantization (GGML reference algorithms)


def _round_away(v: np.ndarray) -> np.ndarray:
    """C roundf (ties away from zero), exact: the fractional part v - trunc(v) is exact in float."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= 0.5, t + np.sign(v), t)


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref: d = amax/127, q = roundf(x / d) (with 1/d precomputed)."""
    d = np.abs(x).max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = _round_away(x * inv[:, None]).astype(np.int8)
    return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=1)


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGML make_qkx2_quants (squared error) over many groups, values first: x, w [n, g].

    Fits x ~ scale*L + min with L in [0, nmax], min <= 0: starts from the min/max grid, then tries
    nstep+1 grid spacings and keeps each least-squares (scale, min) refit that lowers the weighted
    error. As in GGML, `min` carries over between tries (later grids start at the best min so far).
    Returns (scale [g], -min [g], L [n, g]).
    """
    f32 = np.float32
    nmax_f = f32(nmax)
    lo = np.minimum(x.min(axis=0), f32(0))
    hi = x.max(axis=0)
    flat = hi == lo  # constant non-negative groups (e.g. all zero): scale 0, L 0
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)

    def grid(iscale: np.ndarray, lo: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.clip(_nearest_int(iscale * (x - lo)), 0, nmax)

    def error(scale: np.ndarray, lo: np.ndarray, L: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            diff = scale * L.astype(f32) + lo - x
            return _seqsum(w * (diff * diff))

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = nmax_f / (hi - lo)
        scale = f32(1) / iscale
    L = grid(iscale, lo)
    best = error(scale, lo, L)
    for step in range(nstep + 1):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + nmax_f) / (hi - lo)
            cand = grid(iscale, lo)
            lf = cand.astype(f32)
            wl = w * lf
            sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_min = np.where(clamp, f32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, cand)
        better = (D > 0) & (cur < best) & ~flat
        L = np.where(better, cand, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    return np.where(flat, f32(0), scale), -lo, np.where(flat, 0, L)


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref over blocks x [n, 256] -> [n, 144]."""
    f32 = np.float32
    n = len(x)
    xt = np.ascontiguousarray(x.reshape(n * 8, 32).T)  # [32, sub-blocks]
    av_x = np.sqrt(_seqsum(xt * xt) / f32(32))
    scales, mins, L = _make_qkx2_quants(xt, av_x + np.abs(xt), 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.T.reshape(n, 8, 32)

    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(f32)
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(f32)
    # GGML stores nearest_int(...) in a uint8 before MIN(63, .): keep that wrap-around
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d = (max_scale / f32(63)).astype(_F16)
    dmin = (max_min / f32(63)).astype(_F16)

    # Re-quantize every value against the stored (f16-rounded, 6-bit) scale and min.
    dl = d.astype(f32)[:, None] * ls  # [n, 8]
    dm = dmin.astype(f32)[:, None] * lm
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((x.reshape(n, 8, 32) + dm[:, :, None]) / dl[:, :, None]), 0, 15)
    L = np.where((dl != 0)[:, :, None], requant, L).astype(np.uint8)  # sub-blocks with d 0 keep L

    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    pairs = L.reshape(n, 4, 2, 32)  # 64-value chunk c: sub-block 2c -> low nibbles, 2c+1 -> high
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([f16_bytes(d), f16_bytes(dmin), packed, qs], axis=1)


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """GGML make_qx_quants with rmse_type 1 and no importance weights, values first: x [n, g].

    Symmetric grid L in [-nmax, nmax-1] (stored +nmax); weights x^2; tries 19 scales
    iscale = -(nmax + 0.1*k)/max, k = -9..9, keeping the one with the best sumlx^2/suml2.
    Returns (scale [g], L + nmax [n, g]).
    """
    f32 = np.float32
    cols = np.arange(x.shape[1])
    ax = np.abs(x)
    amax_i = np.argmax(ax, axis=0)  # first largest |x|, as GGML's strict '>' scan
    xmax = x[amax_i, cols]
    zero = ax[amax_i, cols] < f32(1e-15)  # GROUP_MAX_EPS
    w = x * x

    def attempt(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.errstate(over="ignore", invalid="ignore"):
            l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
            lf = l.astype(f32)
            return l, _seqsum(w * x * lf), _seqsum(w * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore"):
        L, sumlx, suml2 = attempt(f32(-nmax) / xmax)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for k in (*range(-9, 0), *range(1, 10)):
            l, slx, sl2 = attempt(-(f32(nmax) + f32(0.1) * f32(k)) / xmax)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
            L = np.where(better, l, L)
    return np.where(zero, f32(0), scale), np.where(zero, 0, L + nmax)


def _q_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref over blocks x [n, 256] -> [n, 210]."""
    f32 = np.float32
    n = len(x)
    scales, L = _make_qx_quants_rmse1(np.ascontiguousarray(x.reshape(n * 16, 16).T), 32)
    scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)

    pick = np.argmax(np.abs(scales), axis=1)  # first largest |scale|
    max_scale = scales[np.arange(n), pick]
    empty = np.abs(max_scale) < f32(1e-15)
    with np.errstate(divide="ignore"):
        iscale = np.where(empty, f32(0), f32(-128) / max_scale).astype(f32)
        d = np.where(empty, f32(0), f32(1) / iscale).astype(_F16)
    # int8 field: GGML clamps above at 127 and stores the int in an int8_t (wraps below -128)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)

    dl = d.astype(f32)[:, None] * sc  # [n, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(x.reshape(n, 16, 16) / dl[:, :, None]), -32, 31) + 32
    L = np.where((dl != 0)[:, :, None], requant, L)
    L = np.where(empty[:, None, None], 0, L).astype(np.uint8)  # an empty block is all zero bytes
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)

    # value 128h + 32k + l lives in ql[64h + 32(k%2) + l] (low nibble if k<2) and qh[32h + l] bits 2k
    groups = L.reshape(n, 2, 4, 32)  # [block, half h, group k, l]
    low, high = groups & 0xF, groups >> 4
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), f16_bytes(d)], axis=1)


_QUANT: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q8_0: _q_q8_0,
    GGMLType.Q4_K: _q_q4_k,
    GGMLType.Q6_K: _q_q6_k,
}


def _quant_floats(x: np.ndarray, dtype: GGMLType) -> np.ndarray:
    if dtype == GGMLType.F32:
        return x.astype(_F32).view(np.uint8)
    if dtype == GGMLType.F16:
        return x.astype(_F16).view(np.uint8)
    # BF16 as GGML's ggml_compute_fp32_to_bf16: round to nearest even on the dropped 16 bits
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(_U16).view(np.uint8)


def quantize(x: np.ndarray, dtype: GGMLType | int) -> np.ndarray:
    """Encode float32 [rows, cols] (any leading dims) row by row; returns 1-D uint8 bytes.

    Each row is zero-padded to whole blocks, so the result has rows * row_bytes(dtype, cols)
    bytes and `dequantize(result, dtype, x.shape)` restores the shape.
    """
    dtype = _as_type(dtype)
    if dtype not in QUANTIZABLE:
        raise UnsupportedError(f"cannot quantize to GGML type {dtype.name}")
    x = np.asarray(x)
    if x.ndim == 0:
        raise InputError("quantize needs an array with at least one dimension")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"cannot quantize non-finite values to {dtype.name}")
    rows, cols = _rows_cols(x.shape)
    x = x.reshape(rows, cols)
    if dtype not in _QUANT:
        return _quant_floats(x, dtype).reshape(-1)

    info = TYPE_INFO[dtype]
    nblk = -(-cols // info.block_size)
    if nblk * info.block_size != cols:
        x = np.pad(x, ((0, 0), (0, nblk * info.block_size - cols)))
    blocks = x.reshape(rows * nblk, info.block_size)
    out = np.empty((rows * nblk, info.type_size), np.uint8)
    step = max(1, _CHUNK_VALUES // info.block_size)
    encode = _QUANT[dtype]
    for s in range(0, len(blocks), step):
        out[s : s + step] = encode(blocks[s : s + step])
    return out.reshape(-1)
