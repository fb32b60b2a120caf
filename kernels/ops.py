"""Launchers for kernels/ops.cu: the non-matmul operations of the forward on CuPy arrays.

Every function takes and returns float32 C-contiguous CuPy arrays (ids/positions int32). `out=`
lets a caller (or a test that poisons outputs) supply the result buffer. NumPy twins: the methods of
engine/backend_cpu.NumpyBackend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from q4k_engine.errors import InputError

from .build import _cupy, kernel

ACTS = {"silu": 0, "gelu_tanh": 1}
MAX_HEAD_DIM = 256
_ATT_BQ, _ATT_BK, _ATT_THREADS, _DEC_THREADS = 32, 32, 128, 256  # must match ops.cu
_NULL = np.uint64(0)  # a null pointer argument (optional inputs of a kernel)


def _f32(x):
    cp = _cupy()
    return cp.ascontiguousarray(x, dtype=cp.float32)


def _out(out, shape, dtype=np.float32):
    cp = _cupy()
    if out is None:
        return cp.empty(shape, dtype=dtype)
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {np.dtype(dtype).name}{tuple(shape)}, got {out.dtype}{out.shape}")
    return out


def _threads_for(n: int, cap: int = 1024) -> int:
    """Block size for a row of n elements: whole warps, at most cap."""
    return int(min(cap, max(32, -(-n // 32) * 32)))


def rmsnorm(x, w, eps: float, out=None):
    """x [..., d] -> x / sqrt(mean(x^2) + eps) * w over the last dim (also [N, heads, head_dim])."""
    x, w = _f32(x), _f32(w)
    d = x.shape[-1]
    if w.shape != (d,):
        raise ValueError(f"rmsnorm weight has shape {w.shape}, rows have {d} values")
    y = _out(out, x.shape)
    rows = x.size // d if d else 0
    if rows:
        kernel("ops.cu", "rmsnorm_rows")((rows,), (_threads_for(d, 256),),
                                         (x, _NULL, w, _NULL, y, np.int32(d), np.float32(eps)))
    return y


def add_rmsnorm(h, r, w, eps: float, out_h=None, out_y=None):
    """Fused residual step: (h + r, rmsnorm(h + r) * w) in one pass over the rows."""
    h, r, w = _f32(h), _f32(r), _f32(w)
    if h.shape != r.shape:
        raise ValueError(f"add_rmsnorm: shapes {h.shape} and {r.shape} differ")
    d = h.shape[-1]
    hs = _out(out_h, h.shape)
    y = _out(out_y, h.shape)
    rows = h.size // d if d else 0
    if rows:
        kernel("ops.cu", "rmsnorm_rows")((rows,), (_threads_for(d, 256),),
                                         (h, r, w, hs, y, np.int32(d), np.float32(eps)))
    return hs, y


def rope(x, positions, theta: float, neox: bool, pos_scale: float = 1.0, freq_factors=None, out=None):
    """Rotary embedding of x [N, heads, head_dim] at per-token positions [N] (int32).

    Angle of pair i at position p: p * pos_scale * theta^(-2i/d) / freq_factors[i].
    """
    cp = _cupy()
    x = _f32(x)
    n, heads, d = x.shape
    if d % 2:
        raise ValueError(f"rope needs an even head_dim, got {d}")
    pos = cp.ascontiguousarray(positions, dtype=cp.int32)
    if pos.shape != (n,):
        raise ValueError(f"rope: {pos.shape[0] if pos.ndim else 0} positions for {n} tokens")
    ff = _NULL
    if freq_factors is not None:
        ff = _f32(freq_factors)
        if ff.shape != (d // 2,):
            raise ValueError(f"rope_freqs has shape {ff.shape}, expected ({d // 2},)")
    y = _out(out, x.shape)
    if n:
        kernel("ops.cu", "rope")((n,), (_threads_for(heads * d // 2, 256),),
                                 (x, y, pos, ff, np.int32(heads), np.int32(d), np.float64(theta),
                                  np.float64(pos_scale), np.int32(bool(neox))))
    return y


def glu(gate, up, act: str, out=None):
    """act(gate) * up elementwise; act in {"silu", "gelu_tanh"}."""
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTS)})")
    gate, up = _f32(gate), _f32(up)
    if gate.shape != up.shape:
        raise ValueError(f"glu: gate {gate.shape} and up {up.shape} differ")
    y = _out(out, gate.shape)
    n = gate.size
    if n:
        blocks = int(min(-(-n // 256), 65535 * 4))
        kernel("ops.cu", "glu")((blocks,), (256,), (gate, up, y, np.int64(n), np.int32(ACTS[act])))
    return y


@dataclass(frozen=True)
class SeqLayout:
    """Per-sequence description of where queries and keys lie (device int32 arrays, see ops.cu)."""

    q_start: object
    q_len: object
    q_pos0: object
    kv_off: object
    kv_len: object
    max_q_len: int
    n_tokens: int
    decode: bool  # every sequence has exactly one query: use the per-query kernel
    tok_seq: object = None  # [N] sequence of each token (decode kernel only)

    @staticmethod
    def build(q_start, q_len, q_pos0, kv_off, kv_len) -> "SeqLayout":
        """From host int arrays (one entry per sequence)."""
        cp = _cupy()
        q_len = np.asarray(q_len, np.int64)
        q_start = np.asarray(q_start, np.int64)
        n_tokens = int(q_len.sum())
        decode = bool(len(q_len)) and bool(np.all(q_len == 1))
        dev = [cp.asarray(np.asarray(a, np.int32)) for a in (q_start, q_len, q_pos0, kv_off, kv_len)]
        tok_seq = None
        if decode:
            seq_of = np.zeros(n_tokens, np.int32)
            for b, (s, n) in enumerate(zip(q_start, q_len)):
                seq_of[s:s + n] = b
            tok_seq = cp.asarray(seq_of)
        return SeqLayout(*dev, max_q_len=int(q_len.max(initial=0)), n_tokens=n_tokens, decode=decode,
                         tok_seq=tok_seq)


def attention(q, k, v, layout: SeqLayout, scale: float, window: int = 0, out=None):
    """Causal (optionally sliding-window) GQA attention; q [N, Hq, D], k/v [rows, Hkv, D].

    Rows of k/v per sequence are given by `layout` (packed new tokens, or a KV cache viewed as
    [B * max_len, Hkv, D]). Never materialises a T x T score matrix.
    """
    cp = _cupy()
    q, k, v = _f32(q), _f32(k), _f32(v)
    n, hq, d = q.shape
    hkv = k.shape[1]
    if k.shape[2] != d or v.shape != k.shape or hq % hkv:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit together")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {d} > {MAX_HEAD_DIM}")
    if n != layout.n_tokens:
        raise ValueError(f"attention: {n} query rows but the layout has {layout.n_tokens}")
    y = _out(out, q.shape)
    if n == 0:
        return y
    args = [q, k, v, y]
    scal = (np.int32(hq), np.int32(hkv), np.int32(window), np.float32(scale / math.log(2.0)))
    if layout.decode:
        f = kernel("ops.cu", "attn_decode", HEAD_DIM=d)
        f((n, hq), (_DEC_THREADS,),
          (*args, layout.tok_seq, layout.q_start, layout.q_pos0, layout.kv_off, layout.kv_len, *scal))
        return y
    f = kernel("ops.cu", "attn_tiled", HEAD_DIM=d)
    dp = -(-d // 4) * 4
    smem = ((_ATT_BQ + _ATT_BK) * (dp + 4) + _ATT_BQ * (_ATT_BK + 1)) * 4
    if smem > 48 * 1024 and f.max_dynamic_shared_size_bytes < smem:
        f.max_dynamic_shared_size_bytes = smem  # opt-in above the 48 KiB default (head_dim 256)
    n_seqs = len(layout.q_len)
    grid = (-(-layout.max_q_len * (hq // hkv) // _ATT_BQ), hkv, n_seqs)
    f(grid, (_ATT_THREADS,),
      (*args, layout.q_start, layout.q_len, layout.q_pos0, layout.kv_off, layout.kv_len, *scal),
      shared_mem=smem)
    return y


def log_softmax(x, temperature: float = 1.0, out=None):
    """log_softmax(x / temperature) over the last dim, float32, row-chunked to bound temporaries."""
    cp = _cupy()
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    x2 = x.reshape(-1, x.shape[-1])
    y = _out(out, x.shape).reshape(x2.shape)
    chunk = max(1, (64 << 20) // max(1, x2.shape[1] * 4))
    for s in range(0, x2.shape[0], chunk):
        z = x2[s:s + chunk].astype(cp.float32) * np.float32(1.0 / temperature)
        z -= z.max(axis=1, keepdims=True)
        z -= cp.log(cp.exp(z).sum(axis=1, keepdims=True))
        y[s:s + chunk] = z
    return y.reshape(x.shape)


def topk(x, k: int):
    """The k largest values of each row of x [..., n] (descending, ties to the lower index) and
    their indices (int32)."""
    cp = _cupy()
    x32 = _f32(x)
    n = x32.shape[-1]
    if not 1 <= k <= n:
        raise InputError(f"top-k needs 1 <= k <= {n}, got k={k}")
    rows = x32.size // n if n else 0
    vals = cp.empty(x32.shape[:-1] + (k,), cp.float32)
    idx = cp.empty(x32.shape[:-1] + (k,), cp.int32)
    if rows:
        kernel("ops.cu", "topk_rows")((rows,), (512,), (x32, vals, idx, np.int32(n), np.int32(k)))
    return vals, idx
