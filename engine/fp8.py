"""The FP8 mode's numerics, in one place (issue 12, item 3): what both backends compute when a
teacher is loaded with precision="fp8".

A product with at least FP8_MIN_ROWS rows (prefill, where the GEMM is compute-bound) runs in
float8 e4m3 with fp32 sums:
- x [M, K] is rounded to e4m3 with one scale per row: a[m] = amax|x[m]| / 448, x8 = e4m3(x * (448 / amax));
- W [N, K] (dequantized from its stored type on the fly) the same way, one scale per output row:
  w[n] = amax|W[n]| / 448, W8 = e4m3(W * (448 / amax)); the row scales are computed once per matrix;
- y[m, n] = (sum_k x8[m, k] * W8[n, k]) * a[m] * w[n], the sum in fp32, then the two multiplies
  in fp32 in that order.
- the gated MLP's act(gate) * up, the down projection's input, is rounded to f16 (as the fp16
  path's cuBLAS route does) before that product rounds it to e4m3.
Every rounding above is float32 and ties-to-even, as the GPU's `cvt.rn.satfinite.e4m3x2.f32`
does, so the NumPy backend reproduces the CUDA kernels' e4m3 bytes exactly for the same input.
Products of fewer rows (decode, short prompts) are weight-bound, not compute-bound: they keep the
fp16 path's kernels, as does the LM head (an fp8 head added 40-50% to the drift in bench/fp8_drift.py).
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

PRECISIONS = ("fp16", "fp8")
E4M3_MAX = 448.0
FP8_MIN_ROWS = 129  # the fp16 path's cuBLAS rows (kernels/matmul.py FUSED_MAX_M + 1): compute-bound there

_E4M3_MIN_EXP = -6  # smallest normal exponent; below it the spacing stays 2^-9 (subnormals)
_MANT_BITS = 3


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def uses_fp8(precision: str, rows: int) -> bool:
    """Whether a product of `rows` rows runs in e4m3 under `precision`."""
    return precision == "fp8" and rows >= FP8_MIN_ROWS


def e4m3(x: np.ndarray) -> np.ndarray:
    """float32 x rounded to the nearest float8 e4m3fn value (ties to even), saturated to +-448
    (satfinite: overflow gives +-448, not NaN), NaN kept; returned as float32."""
    x = np.asarray(x, np.float32)
    ax = np.abs(x)
    # exponent of each value's binade, clamped at the subnormal range: spacing 2^(e - 3)
    _, e = np.frexp(np.where(ax > 0, ax, np.float32(1)))
    e = np.maximum(e.astype(np.int32) - 1, _E4M3_MIN_EXP)
    step = np.ldexp(np.float32(1), e - _MANT_BITS).astype(np.float32)
    q = (np.rint(ax / step) * step).astype(np.float32)  # ax / step is exact (a power of two)
    q = np.minimum(q, np.float32(E4M3_MAX))
    return np.where(np.isnan(x), x, np.copysign(q, x)).astype(np.float32)


def row_scales(amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, inverse) of rows whose largest |value| is amax (float32): scale = amax / 448 and
    inverse = 448 / amax, both one float32 division; an all-zero row gets scale 0 and inverse 0."""
    amax = np.asarray(amax, np.float32)
    zero = amax == 0
    safe = np.where(zero, np.float32(1), amax)
    scale = np.where(zero, np.float32(0), safe / np.float32(E4M3_MAX)).astype(np.float32)
    inv = np.where(zero, np.float32(0), np.float32(E4M3_MAX) / safe).astype(np.float32)
    return scale, inv


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [rows, K] (float32, or float16 taken exactly) as e4m3 values (float32 array holding them)
    and each row's scale (float32 [rows]): x ~= q * scale[:, None]."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    scale, inv = row_scales(amax)
    return e4m3(x * inv[:, None]), scale


def rescale(d: np.ndarray, a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The product's epilogue: fp32 sums d [M, N] times a[m], then times w[n], float32."""
    d = np.asarray(d, np.float32)
    return (d * np.asarray(a, np.float32)[:, None]) * np.asarray(w, np.float32)[None, :]
