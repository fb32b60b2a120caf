"""Launchers for kernels/ops.cu: the non-matmul operations of the forward on CuPy arrays.

Every function takes and returns float32 C-contiguous CuPy arrays (ids/positions int32). `out=`
lets a caller (or a test that poisons outputs) supply the result buffer. NumPy twins: the methods of
engine/backend_cpu.NumpyBackend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from q4k_engine.errors import InputError

from .build import _cupy, kernel, sm_count

ACTS = {"silu": 0, "gelu_tanh": 1}
MAX_HEAD_DIM = 256
_DEC_THREADS = 256  # must match ops.cu
_NULL = np.uint64(0)  # a null pointer argument (optional inputs of a kernel)
# Threads a block of the row-wise epilogues (glu_pair, fp8_rescale): 128 x 8 columns a block keeps
# the idle threads of a 7B block of 3,840 columns to 6%.
_ROW_THREADS = 128
_ROPE_MAX_PAIRS = 256  # must match ops.cu
_MAX_ROWS = 1 << 31  # row indices of the attention layouts are int32
_MAX_GRID_YZ = 65535  # CUDA's limit of gridDim.y and gridDim.z


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


def _grid(total: int) -> int:
    """Blocks of 256 threads for a grid-stride loop over `total` elements (capped: the loop strides)."""
    return int(min(-(-total // 256), 65535 * 4))


def _operand_args(xq, rows: int, cols: int, threads: int) -> tuple:
    """The (x8, xsub) kernel arguments of a Q4_K mmv operand (matmul.MmvOperand) that a kernel writes
    beside its [rows, cols] output, a warp a sub-block; null pointers without one."""
    if xq is None:
        return _NULL, _NULL
    from .matmul import MMV_MAX_M, _Q4K_VALUES

    if xq.x8.shape != (rows, cols) or rows > MMV_MAX_M or cols % _Q4K_VALUES or threads % 32:
        raise ValueError(f"mmv operand {tuple(xq.x8.shape)} for an output of [{rows}, {cols}] ({threads} threads)")
    return xq.x8, xq.xsub


def rmsnorm(x, w, eps: float, out=None, xq=None):
    """x [..., d] -> x / sqrt(mean(x^2) + eps) * w over the last dim (also [N, heads, head_dim]).
    xq (matmul.mmv_operand of x [rows, d]): the result written as the Q4_K mmv's operand too."""
    x, w = _f32(x), _f32(w)
    d = x.shape[-1]
    if w.shape != (d,):
        raise ValueError(f"rmsnorm weight has shape {w.shape}, rows have {d} values")
    y = _out(out, x.shape)
    rows = x.size // d if d else 0
    if rows:
        threads = _threads_for(d, 256)
        kernel("ops.cu", "rmsnorm_rows")((rows,), (threads,), (x, _NULL, w, _NULL, y, np.int32(d), np.float32(eps),
                                                               *_operand_args(xq, rows, d, threads)))
    return y


def add_rmsnorm(h, r, w, eps: float, out_h=None, out_y=None, xq=None):
    """Fused residual step: (h + r, rmsnorm(h + r) * w) in one pass over the rows; xq as rmsnorm's."""
    h, r, w = _f32(h), _f32(r), _f32(w)
    if h.shape != r.shape:
        raise ValueError(f"add_rmsnorm: shapes {h.shape} and {r.shape} differ")
    d = h.shape[-1]
    hs = _out(out_h, h.shape)
    y = _out(out_y, h.shape)
    rows = h.size // d if d else 0
    if rows:
        threads = _threads_for(d, 256)
        kernel("ops.cu", "rmsnorm_rows")((rows,), (threads,), (h, r, w, hs, y, np.int32(d), np.float32(eps),
                                                               *_operand_args(xq, rows, d, threads)))
    return hs, y


def _heads(x, name: str):
    """x [N, H, D] float32 as (array, row stride in floats): contiguous within a token (a column
    slice of a stacked q/k/v product is taken as it is), else copied to be."""
    cp = _cupy()
    if x.ndim != 3:
        raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {x.shape}")
    if x.dtype != np.float32 or x.strides[2] != 4 or x.strides[1] != 4 * x.shape[2] or x.strides[0] % 4:
        x = cp.ascontiguousarray(x, dtype=cp.float32)
    return x, (x.strides[0] // 4 if x.shape[0] > 1 else x.shape[1] * x.shape[2])


def _vec(b, size: int, what: str):
    if b is None:
        return _NULL
    b = _f32(b)
    if b.shape != (size,):
        raise ValueError(f"{what} has shape {b.shape}, expected ({size},)")
    return b


def qkv_rope(q, k, v, positions, theta: float, neox: bool, pos_scale: float = 1.0, freq_factors=None,
             bias=(None, None, None), norm=None, eps: float = 0.0, out=None, kv_rows=None):
    """Attention's inputs in one launch: q [N, Hq, D] and k [N, Hk, D] + their biases, RMSNorm per
    head with norm = (q_norm, k_norm) ([D] each), then RoPE at per-token positions [N] (int32);
    v [N, Hv, D] + its bias. Any of k, v may be None (absent). Inputs may be views with a row
    stride (column slices of one stacked projection); outputs are new C-contiguous float32 arrays,
    or out = (q, k, v) buffers. bias: ([Hq * D] or None, [Hk * D] or None, [Hv * D] or None).
    With kv_rows (int32 [N]), out's k and v are KV-cache layers (C-contiguous float32 [rows, H, D])
    and token t's k and v are written to their row kv_rows[t]: RoPE, biases and the cache write
    in one launch.

    Angle of pair i at position p: p * pos_scale * theta^(-2i/d) / freq_factors[i].
    """
    cp = _cupy()
    q, ldq = _heads(q, "q")
    n, hq, d = q.shape
    parts = [(q, ldq)]
    for x, name in ((k, "k"), (v, "v")):
        if x is None:
            parts.append((None, 0))
            continue
        x, ld = _heads(x, name)
        if x.shape[0] != n or x.shape[2] != d:
            raise ValueError(f"qkv_rope: {name} has shape {x.shape}, q {q.shape}")
        parts.append((x, ld))
    heads = [0 if x is None else x.shape[1] for x, _ in parts]
    if d % 2 or d > 2 * _ROPE_MAX_PAIRS:
        raise ValueError(f"rope needs an even head_dim of at most {2 * _ROPE_MAX_PAIRS}, got {d}")
    pos = cp.ascontiguousarray(positions, dtype=cp.int32)
    if pos.shape != (n,):
        raise ValueError(f"rope: {pos.shape[0] if pos.ndim else 0} positions for {n} tokens")
    ff = _vec(freq_factors, d // 2, "rope_freqs")
    bs = [_vec(b, h * d, f"{name} bias") if h else _NULL for b, h, name in zip(bias, heads, "qkv")]
    nq, nk = (_NULL, _NULL) if norm is None else (_vec(norm[0], d, "q_norm"), _vec(norm[1], d, "k_norm"))
    outs = out or (None, None, None)
    ys = [_out(outs[0], (n, hq, d))]
    for (x, _), h, o in zip(parts[1:], heads[1:], outs[1:]):
        if x is None:
            ys.append(None)
        elif kv_rows is None:
            ys.append(_out(o, (n, h, d)))
        elif o is None or o.dtype != np.float32 or not o.flags.c_contiguous or o.shape[1:] != (h, d):
            raise ValueError(f"qkv_rope: kv_rows need float32 cache layers [rows, {h}, {d}], got "
                             f"{None if o is None else (o.dtype, o.shape)}")
        else:
            ys.append(o)
    rows = _NULL
    if kv_rows is not None:
        rows = cp.ascontiguousarray(kv_rows, dtype=cp.int32)
        if rows.shape != (n,):
            raise ValueError(f"qkv_rope: {rows.shape} kv_rows for {n} tokens")
    if n:
        args = [a for (x, ld) in parts for a in (_NULL if x is None else x, np.int64(ld))]
        kernel("ops.cu", "qkv_rope")((n,), (256,), (
            *args, *[_NULL if y is None else y for y in ys], pos, ff, *bs, nq, nk, np.float32(eps), rows,
            *[np.int32(h) for h in heads], np.int32(d), np.float64(theta), np.float64(pos_scale), np.int32(bool(neox))))
    return tuple(ys)


def rope(x, positions, theta: float, neox: bool, pos_scale: float = 1.0, freq_factors=None, out=None,
         bias=None):
    """RoPE of x [N, heads, head_dim] alone (qkv_rope without k and v); with `bias` ([heads *
    head_dim]), of x + bias (the fp32 add first)."""
    return qkv_rope(x, None, None, positions, theta, neox, pos_scale, freq_factors, bias=(bias, None, None),
                    out=(out, None, None))[0]


def kv_write(k, v, ck, cv, rows) -> None:
    """ck[rows[t]] = k[t] and cv[rows[t]] = v[t] (k, v [N, Hkv, D]; ck, cv C-contiguous float32
    [cache rows, Hkv, D]; rows int32 [N]): a decode step's cache write in one launch."""
    cp = _cupy()
    k, v = _f32(k), _f32(v)
    rows = cp.ascontiguousarray(rows, dtype=cp.int32)
    if (k.shape != v.shape or ck.shape != cv.shape or ck.shape[1:] != k.shape[1:] or rows.shape != k.shape[:1]
            or ck.dtype != np.float32 or cv.dtype != np.float32 or not (ck.flags.c_contiguous and cv.flags.c_contiguous)):
        raise ValueError(f"kv_write: k {k.shape}, v {v.shape}, cache {ck.dtype}{ck.shape}/{cv.shape}, rows {rows.shape}")
    total = k.size
    if total:
        width = total // k.shape[0]
        kernel("ops.cu", "kv_write")((_grid(total),), (256,), (k, v, ck, cv, rows, np.int64(total), np.int32(width)))


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
        kernel("ops.cu", "glu")((_grid(n),), (256,), (gate, up, y, np.int64(n), np.int32(ACTS[act])))
    return y


def glu_pair_f16(prod, act: str, out, col0: int) -> None:
    """out[:, col0:col0+n] = f16(act(gate) * up) where prod is C-contiguous f16 [M, 2n] holding gate
    in columns [0, n) and up in [n, 2n), and out a C-contiguous f16 [M, >= col0+n]: one block of
    a gated MLP's product (kernels/matmul.py)."""
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTS)})")
    m, n2 = prod.shape
    n = n2 // 2
    if (prod.dtype != np.float16 or n2 % 2 or not prod.flags.c_contiguous or out.dtype != np.float16
            or out.shape[0] != m or col0 + n > out.shape[1] or not out.flags.c_contiguous):
        raise ValueError(f"glu_pair_f16: prod {prod.dtype}{prod.shape}, out {out.dtype}{out.shape}, col0 {col0}")
    _glu_pair_launch("glu_pair_f16", prod, 2 * n, n, m, out, col0, act, ())


def _rows_grid(cols: int, per_thread: int, threads: int, rows: int) -> tuple[int, int]:
    """Grid of glu_pair / fp8_rescale: x over groups of per_thread columns, y over rows (the
    kernels stride y past 65535)."""
    return -(-cols // (per_thread * threads)), min(rows, 65535)


def _aligned(*addresses_and_strides: int) -> bool:
    return all(v % 16 == 0 for v in addresses_and_strides)


def _glu_pair_launch(name: str, src, ld: int, n: int, m: int, out, col0: int, act: str, scales: tuple) -> None:
    if not m * n:
        return
    size = src.itemsize
    dst = out.data.ptr + 2 * col0
    vec = _aligned(src.data.ptr, ld * size, n * size, dst, 2 * out.shape[1]) and n % 8 == 0
    kernel("ops.cu", name)(_rows_grid(n, 8, _ROW_THREADS, m), (_ROW_THREADS,),
                           (src, np.int64(ld), np.int32(n), np.int32(m), *scales, np.uint64(dst),
                            np.int64(out.shape[1]), np.int32(ACTS[act]), np.int32(vec)))


def quant_rows_e4m3(x, kpad: int, out=None, scale=None):
    """The FP8 mode's x (engine/fp8.py quantize_rows): x [M, cols] (fp32 or f16, rows contiguous,
    any row stride) as e4m3 bytes uint8 [M, kpad] (zeros past cols) and fp32 scales [M]."""
    m, cols = x.shape
    if x.dtype not in (np.float32, np.float16) or (m and x.strides[1] != x.itemsize) or kpad < cols or kpad % 8:
        raise ValueError(f"quant_rows_e4m3: x {x.dtype}{x.shape} strides {x.strides}, kpad {kpad}")
    out, scale = _out(out, (m, kpad), np.uint8), _out(scale, (m,))
    if m:
        name = "quant_rows_e4m3_f32" if x.dtype == np.float32 else "quant_rows_e4m3_f16"
        kernel("ops.cu", name)((m,), (256,), (x, np.int64(x.strides[0] // x.itemsize), np.int32(cols),
                                              np.int32(kpad), out, scale))
    return out, scale


def fp8_rescale(y, a, w) -> None:
    """The FP8 product's epilogue in place: y[m, j] = (y[m, j] * a[m]) * w[j] (y C-contiguous fp32
    [M, n], a [M], w [n])."""
    m, n = y.shape
    if (y.dtype != np.float32 or not y.flags.c_contiguous or a.shape != (m,) or w.shape != (n,)
            or a.dtype != np.float32 or w.dtype != np.float32):
        raise ValueError(f"fp8_rescale: y {y.dtype}{y.shape}, a {a.dtype}{a.shape}, w {w.dtype}{w.shape}")
    if m * n:
        vec = _aligned(y.data.ptr, 4 * n)
        kernel("ops.cu", "fp8_rescale")(_rows_grid(n, 4, _ROW_THREADS, m), (_ROW_THREADS,),
                                        (y, np.int64(n), np.int32(n), np.int32(m), _f32(a), _f32(w), np.int32(vec)))


def glu_pair_fp8(d, a, wg, wu, act: str, out, col0: int, n: int) -> None:
    """glu_pair_f16 for FP8 sums: out[:, col0:col0+n] = f16(act(gate) * up), gate = (d[:, j] *
    a) * wg[j], up = (d[:, n + j] * a) * wu[j]; d C-contiguous fp32 [M, >= 2n] (its row length
    is the row stride)."""
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r} (known: {', '.join(ACTS)})")
    m, ld = d.shape
    if (d.dtype != np.float32 or ld < 2 * n or not d.flags.c_contiguous or out.dtype != np.float16
            or out.shape[0] != m or col0 + n > out.shape[1] or not out.flags.c_contiguous
            or a.shape != (m,) or wg.shape != (n,) or wu.shape != (n,)):
        raise ValueError(f"glu_pair_fp8: d {d.dtype}{d.shape}, out {out.dtype}{out.shape}, col0 {col0}")
    _glu_pair_launch("glu_pair_fp8", d, ld, n, m, out, col0, act, (_f32(a), _f32(wg), _f32(wu)))


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
    kv_pack: object = None  # first row of each sequence in prefill's packed f16 K/V (prefix sums of kv_len)
    max_kv_len: int = 0
    n_kv_rows: int = 0  # sum of kv_len: rows of the packed f16 K/V

    @staticmethod
    def build(q_start, q_len, q_pos0, kv_off, kv_len) -> "SeqLayout":
        """From host int arrays (one entry per sequence)."""
        q_len = np.asarray(q_len, np.int64)
        q_start = np.asarray(q_start, np.int64)
        kv_len = np.asarray(kv_len, np.int64)
        # The kernels take these as int32 row indices (their element offsets are 64-bit): refuse
        # rather than let the int32 copies below wrap.
        ends = (q_start + q_len, np.asarray(kv_off, np.int64) + kv_len, kv_len.sum(keepdims=True))
        if any(e.size and int(e.max()) >= _MAX_ROWS for e in ends):
            raise InputError(f"attention layout: row indices reach {_MAX_ROWS} (int32 in the kernels): split the batch")
        cp = _cupy()
        n_tokens = int(q_len.sum())
        decode = bool(len(q_len)) and bool(np.all(q_len == 1))
        dev = [cp.asarray(np.asarray(a, np.int32)) for a in (q_start, q_len, q_pos0, kv_off, kv_len)]
        tok_seq = kv_pack = None
        if decode:
            seq_of = np.zeros(n_tokens, np.int32)
            for b, (s, n) in enumerate(zip(q_start, q_len)):
                seq_of[s:s + n] = b
            tok_seq = cp.asarray(seq_of)
        else:
            kv_pack = cp.asarray(np.concatenate([[0], np.cumsum(kv_len)[:-1]]).astype(np.int32))
        return SeqLayout(*dev, max_q_len=int(q_len.max(initial=0)), n_tokens=n_tokens, decode=decode,
                         tok_seq=tok_seq, kv_pack=kv_pack, max_kv_len=int(kv_len.max(initial=0)),
                         n_kv_rows=int(kv_len.sum()))


def _aligned16(x):
    """x itself, or a copy when its data does not start on 16 bytes (the kernels load float4s)."""
    return x if x.data.ptr % 16 == 0 else x.copy()


def attention(q, k, v, layout: SeqLayout, scale: float, window: int = 0, out=None, decode: str = "split", xq=None):
    """Causal (optionally sliding-window) GQA attention; q [N, Hq, D], k/v [rows, Hkv, D].

    Rows of k/v per sequence are given by `layout` (packed new tokens, or a KV cache viewed as
    [B * max_len, Hkv, D]). Never materialises a T x T score matrix. Decode (one query per
    sequence) is fp32; prefill multiplies f16-rounded operands on tensor cores with fp32 sums.
    `decode` picks the decode kernel: "split" (split-K, _decode_split) or "single" (attn_decode,
    one block per query head over all its keys: the kernel before split-K, kept for the bench).
    xq (matmul.mmv_operand of the output as [N, Hq * D]): the output written as the Q4_K mmv's
    operand too, by split-K decode's combine kernel where D is whole warps, else by mmv_x after it.
    """
    if decode not in DECODE_KERNELS:
        raise ValueError(f"unknown decode kernel {decode!r} (known: {', '.join(DECODE_KERNELS)})")
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
    fused = xq is not None and layout.decode and decode == "split" and d % 32 == 0
    if layout.decode and decode == "split":
        _decode_split(q, k, v, y, layout, scale, window, xq if fused else None)
    elif layout.decode:
        f = kernel("ops.cu", "attn_decode", **_decode_defines(d))
        f((n, hq), (_DEC_THREADS,), (q, k, v, y, layout.tok_seq, layout.q_start, layout.q_pos0,
                                     layout.kv_off, layout.kv_len, *_attn_scalars(hq, hkv, scale, window)))
    else:
        _flash_prefill(q, k, v, y, layout, scale, window, _flash_tiles(-(-d // 16) * 16))
    if xq is not None and not fused:
        from .matmul import write_mmv_operand

        write_mmv_operand(y.reshape(n, hq * d), xq)
    return y


DECODE_KERNELS = ("split", "single")
# A query's keys go to at most ceil(keys / DECODE_MIN_KEYS) ranges, so that a block has more to do than
# writing its partial (a first choice, not yet tuned by measurement).
DECODE_MIN_KEYS = 16
DECODE_BLOCKS_PER_SM = 2  # split-K aims at this many blocks per SM


class DecodeSplits(NamedTuple):
    """The split-K decode launch (attn_decode_split_g*): ops.cu derives each query's number of ranges
    from its own visible keys, min(max_splits, ceil(keys / min_keys)), so the ranges, and the
    result, do not depend on `grid` (a CUDA graph sized for the whole cache and an eager step
    agree bit for bit)."""

    group: int  # query heads per block: the kernel attn_decode_split_g<group>
    tiles: int  # blocks per kv head over its query heads
    max_splits: int  # ranges per query at most: blocks per SM x SMs / blocks without splitting
    grid: int  # blocks per (token, head tile): the most ranges any query of the layout can have


def decode_splits(n_tokens: int, hq: int, hkv: int, max_keys: int, window: int, sms: int) -> DecodeSplits:
    """Split-K plan for n_tokens one-query sequences of at most max_keys keys (window > 0: at most
    window visible) on `sms` SMs. Depends on neither the keys' values nor their exact count."""
    g = hq // hkv
    tiles = -(-g // 8)  # a block holds at most 8 heads: one softmax warp each
    group = -(-g // tiles)
    max_splits = max(1, -(-DECODE_BLOCKS_PER_SM * sms // max(1, n_tokens * hkv * tiles)))
    visible = min(max_keys, window) if window > 0 else max_keys
    return DecodeSplits(group, tiles, max_splits, max(1, min(max_splits, -(-visible // DECODE_MIN_KEYS))))


def _decode_split(q, k, v, y, layout: SeqLayout, scale: float, window: int, xq=None) -> None:
    """Split-K decode attention into y (checked by attention()): attn_decode_split writes each
    range's partial softmax state to a workspace, attn_decode_combine merges them. Both launches
    and the workspace are sized from host values only (layout.max_kv_len), so the pair can be
    captured in a CUDA graph and replayed with other per-step lengths."""
    cp = _cupy()
    k, v = _aligned16(k), _aligned16(v)
    n, hq, d = q.shape
    hkv = k.shape[1]
    plan = decode_splits(n, hq, hkv, layout.max_kv_len, window, sm_count(cp.cuda.Device().id))
    ws_acc = cp.empty((n, hq, plan.grid, d), cp.float32)
    ws_ml = cp.empty((n, hq, plan.grid, 2), cp.float32)
    scalars = _attn_scalars(hq, hkv, scale, window)
    kernel("ops.cu", f"attn_decode_split_g{plan.group}", **_decode_defines(d))(
        (n, hkv * plan.tiles, plan.grid), (_DEC_THREADS,),
        (q, k, v, ws_acc, ws_ml, layout.tok_seq, layout.q_start, layout.q_pos0, layout.kv_off, layout.kv_len,
         *scalars, np.int32(plan.max_splits), np.int32(DECODE_MIN_KEYS)))
    threads = _threads_for(d, 256)
    kernel("ops.cu", "attn_decode_combine", **_decode_defines(d))(
        (n, hq), (threads,),
        (ws_acc, ws_ml, y, layout.tok_seq, layout.q_start, layout.q_pos0, layout.kv_len, np.int32(hq),
         np.int32(window), np.int32(plan.max_splits), np.int32(DECODE_MIN_KEYS), np.int32(plan.grid),
         *_operand_args(xq, n, hq * d, threads)),
        shared_mem=4 * plan.grid)


def _attn_scalars(hq: int, hkv: int, scale: float, window: int) -> tuple:
    """The trailing scalar arguments of both attention kernels (the softmax runs in base 2)."""
    return np.int32(hq), np.int32(hkv), np.int32(window), np.float32(scale / math.log(2.0))


class FlashTiles(NamedTuple):
    """Tiling of attn_flash (the FA_* defines of ops.cu)."""

    warps: int  # warps per block
    slices: int  # 16-row query slices per warp (FA_MT)
    keys: int  # keys per K/V tile (FA_BK)
    min_blocks: int = 1  # blocks per SM that __launch_bounds__ must leave registers for (FA_MINB)

    @property
    def rows(self) -> int:
        return 16 * self.slices * self.warps

    def defines(self, head_dim: int) -> dict[str, int]:
        """The -D defines of ops.cu's prefill kernels (kv_to_half, attn_flash) with this tiling."""
        return dict(HEAD_DIM=head_dim, FA_WARPS=self.warps, FA_MT=self.slices, FA_BK=self.keys,
                    FA_MINB=self.min_blocks)


def _decode_defines(head_dim: int) -> dict[str, int]:
    return dict(HEAD_DIM=head_dim)


def attention_defines(head_dim: int) -> list[dict[str, int]]:
    """The ops.cu define sets that attention compiles for a model of this head dim: decode's, and
    prefill's with the tiling _flash_tiles picks (kernels/check.py compiles them without a GPU)."""
    return [_decode_defines(head_dim), _flash_tiles(-(-head_dim // 16) * 16).defines(head_dim)]


def _flash_tiles(dh: int) -> FlashTiles:
    """The tiling for a head dim padded to 16 (chosen by bench/bench_attention.py --variants, H200).

    Registers decide: a slice's O is 16 x dh fp32. Up to 128, two slices per warp let each K/V
    fragment read from shared memory feed two mma (5-15% faster than one slice at head dim 128;
    slower at 64, where one slice with 64-key tiles is best); above 128 one slice and 32-key tiles
    keep two blocks per SM.
    """
    if dh <= 64:
        return FlashTiles(4, 1, 64)
    return FlashTiles(4, 2, 32) if dh <= 128 else FlashTiles(4, 1, 32)


def flash_smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of one attn_flash block: the Q tile and 2 stages of K and V tiles, f16."""
    dh = -(-head_dim // 16) * 16
    tiles = _flash_tiles(dh)
    return (tiles.rows + 4 * tiles.keys) * (dh + 8) * 2


def _flash_prefill(q, k, v, y, layout: SeqLayout, scale: float, window: int, tiles: FlashTiles) -> None:
    """Prefill attention into y (q, k, v, y checked by attention()) on tensor cores.

    K/V rows visible to the layout are first converted to a packed f16 scratch (one cheap pass);
    every query block then re-reads half the bytes, straight into shared memory.
    """
    cp = _cupy()
    q, k, v = _aligned16(q), _aligned16(k), _aligned16(v)
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    dh = -(-d // 16) * 16
    defines = tiles.defines(d)
    n_seqs = len(layout.q_len)
    kh = cp.empty((layout.n_kv_rows, hkv, dh), cp.float16)
    vh = cp.empty_like(kh)
    if layout.n_kv_rows:
        chunks = layout.max_kv_len * hkv * dh // 8
        kernel("ops.cu", "kv_to_half", **defines)((min(-(-chunks // 256), 8192), n_seqs), (256,),
                                                  (k, v, kh, vh, layout.kv_off, layout.kv_len, layout.kv_pack,
                                                   np.int32(hkv)))
    f = kernel("ops.cu", "attn_flash", **defines)
    smem = (tiles.rows + 4 * tiles.keys) * (dh + 8) * 2  # as flash_smem_bytes, for these tiles
    if smem > 48 * 1024 and f.max_dynamic_shared_size_bytes < smem:
        f.max_dynamic_shared_size_bytes = smem  # opt-in above the 48 KiB default
    row_tiles = -(-layout.max_q_len * (hq // hkv) // tiles.rows)
    if max(row_tiles, n_seqs) > _MAX_GRID_YZ:
        raise InputError(f"prefill attention: {n_seqs} sequences x {row_tiles} query tiles exceed the grid's "
                         f"{_MAX_GRID_YZ} in y/z: split the batch or the sequences")
    f((hkv, n_seqs, row_tiles), (32 * tiles.warps,),
      (q, kh, vh, y, layout.q_start, layout.q_len, layout.q_pos0, layout.kv_pack, layout.kv_len,
       *_attn_scalars(hq, hkv, scale, window)),
      shared_mem=smem)


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


def logsumexp(x, temperature: float = 1.0):
    """log(sum(exp(x / temperature))) over the last dim, float32 [...]; -inf for a row of -inf (a
    top-k tail that K covers). Row-chunked like log_softmax: x may be a strided view (a crop of
    the vocabulary) and no temporary exceeds 64 MB."""
    cp = _cupy()
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    x2 = x.reshape(-1, x.shape[-1])
    y = cp.empty(x2.shape[0], cp.float32)
    chunk = max(1, (64 << 20) // max(1, x2.shape[1] * 4))
    for s in range(0, x2.shape[0], chunk):
        z = x2[s:s + chunk].astype(cp.float32)  # a copy (x is never written)
        z *= np.float32(1.0 / temperature)
        m = z.max(axis=1, keepdims=True)
        m = cp.where(cp.isfinite(m), m, np.float32(0.0))
        z -= m
        y[s:s + chunk] = cp.log(cp.exp(z, out=z).sum(axis=1)) + m[:, 0]
    return y.reshape(x.shape[:-1])


def all_finite(x) -> bool:
    """Whether no value of x (float16 or float32) is NaN or +-Inf: one pass over its bytes, one int
    read back (a sync). Anything else (float64, a strided or unaligned view) is first made a
    contiguous float32 / float16 copy."""
    cp = _cupy()
    if x.dtype not in (cp.float16, cp.float32):
        x = x.astype(cp.float32)
    if not x.flags.c_contiguous or x.data.ptr % 16:
        x = x.copy()  # a fresh allocation: contiguous and 256-byte aligned
    flag = cp.zeros(1, cp.int32)
    if x.size:
        n16 = x.nbytes // 16
        blocks = max(1, min(-(-n16 // 256), 8 * sm_count(cp.cuda.Device().id)))
        kernel("ops.cu", "any_nonfinite")((blocks,), (256,), (x, np.int64(x.nbytes), np.int32(x.dtype == cp.float16), flag))
    return not int(flag.get()[0])


_AM_THREADS = 1024  # must match ops.cu


def argmax(x, out=None):
    """The index of the largest value of each row of x [rows, n] (n >= 1) as int32 [rows], as
    numpy.argmax: the first of equal maxima, the first NaN of a row that has one. A row-strided
    float32 view is read in place; other arrays are first made a contiguous float32 copy. One block
    a row, no temporary: greedy decoding's next token."""
    cp = _cupy()
    if x.ndim != 2 or not x.shape[1]:
        raise InputError(f"argmax: x must be [rows, n] with n >= 1, got shape {tuple(x.shape)}")
    if x.dtype != cp.float32 or x.strides[1] != 4 or x.strides[0] % 4 or x.data.ptr % 4:
        x = _f32(x)
    rows, n = x.shape
    out = _out(out, (rows,), np.int32)
    if n >= 1 << 31:
        raise InputError(f"argmax: rows of {n} values; at most 2^31 - 1")
    if rows:
        ld = x.strides[0] // 4 if rows > 1 else n
        kernel("ops.cu", "argmax_rows")((rows,), (_AM_THREADS,), (x, np.int64(ld), np.int32(n), out))
    return out


_TK_THREADS = 512  # must match ops.cu


def topk_logprobs(x, k: int, temperature: float = 1.0, tail: bool = False, out=None):
    """The k most likely entries of log_softmax(x / temperature) per row of x [rows, n] (a row-
    strided view, e.g. a crop of the vocabulary, is read in place): values float32 descending, ties
    to the lower index, indices int32; with tail, also log(sum of exp) of every other log-prob, the
    tail mass (-inf where k covers the row), else None. One kernel and no [rows, n] temporary:
    log_softmax(x) then topk and logsumexp of the rest give the same values (NumpyBackend does
    that). `out` = (vals, idx, tail or None) lets a test poison the outputs first."""
    cp = _cupy()
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    if x.ndim != 2:
        raise InputError(f"topk_logprobs: x must be [rows, n], got shape {tuple(x.shape)}")
    rows, n = x.shape
    if not 1 <= k <= n:
        raise InputError(f"top-k needs 1 <= k <= {n}, got k={k}")
    if x.dtype != cp.float32 or x.strides[1] != 4 or x.strides[0] % 4 or x.data.ptr % 4:
        x = _f32(x)
    if out is None:
        out = (None, None, None)
    vals, idx, rest = _out(out[0], (rows, k)), _out(out[1], (rows, k), np.int32), out[2]
    if tail:
        rest = _out(rest, (rows,))
    if rows:
        ld = x.strides[0] // 4 if rows > 1 else n
        kernel("ops.cu", "topk_logprobs_rows")(
            (rows,), (_TK_THREADS,),
            (x, np.int64(ld), np.int32(n), np.int32(k), np.float32(1.0 / temperature), np.int32(bool(tail)),
             vals, idx, rest if tail else _NULL))
    return vals, idx, rest if tail else None


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
