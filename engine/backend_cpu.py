"""NumpyBackend: the reference implementation of the Backend interface (backend.py).

The oracle every CUDA kernel and every speed trick is judged against, and what CI runs: float32
activations between operations, float64 inside them (matmul and attention sums, RMSNorm,
softmax, log-softmax, RoPE angles).
Weights stay as the file's bytes (QTensor views of the mapped file); a matmul dequantizes one
bounded tile of rows at a time and multiplies it, so no float32 copy of a matrix is ever kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import fp8
from .backend import Batch
from .dtypes import SUPPORTED
from .errors import InputError, UnsupportedError
from .quants import dequantize, dequantize_rows
from .tensors import ModelFile, QTensor

# Values of one dequantized weight tile (16 MiB as float64): big enough for BLAS to run at speed,
# small enough that the Gemma 3 LM head (167M values) never exists dequantized.
TILE_VALUES = 1 << 21
FINITE_CHUNK_VALUES = 1 << 24  # values per block of the non-finite check
# Score elements of one attention block (float64): bounds the [heads, queries, keys] temporary.
ATTN_BLOCK_VALUES = 1 << 23
ACTS = ("silu", "gelu_tanh")


@dataclass
class NumpyKVCache:
    """Per-layer K and V, float32 [n_seqs, max_len, n_kv_heads, head_dim]; slot b is sequence b."""

    k: list[np.ndarray]
    v: list[np.ndarray]

    @property
    def n_seqs(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1] if self.k else 0


def _softmax64(s: np.ndarray) -> np.ndarray:
    """Softmax over the last dim of a float64 array whose masked entries are -inf."""
    s = s - s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


class NumpyBackend:
    name = "cpu"
    xp = np

    def __init__(self, precision: str = "fp16"):
        # "fp16": the exact reference (float64 sums of the stored weights). "fp8": products of at
        # least fp8.FP8_MIN_ROWS rows emulate the CUDA backend's FP8 mode, rounding for rounding.
        self.precision = fp8.check_precision(precision)
        self._fp8_scales: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # --- weights --------------------------------------------------------------------------------
    def check_model(self, model: ModelFile) -> None:
        """Nothing to check: matrices stay in the memory-mapped file, dequantized tile by tile."""

    def check_fits(self, tensors: list[QTensor]) -> None:
        """Nothing to check (see check_model)."""

    def weight(self, t: QTensor) -> QTensor:
        """The tensor itself: its bytes stay where the file mapping put them."""
        if t.dtype not in SUPPORTED:
            raise UnsupportedError(f"{t.name}: GGML type {t.dtype.name} is not supported")
        if len(t.shape) != 2:
            raise UnsupportedError(f"{t.name}: expected a matrix, got shape {t.shape}")
        return t

    def vector(self, t: QTensor) -> np.ndarray:
        return dequantize(t.data, t.dtype, t.shape, name=t.name).reshape(-1)

    # --- data movement --------------------------------------------------------------------------
    def asarray(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    # --- operations -----------------------------------------------------------------------------
    def embed(self, w: QTensor, ids: np.ndarray) -> np.ndarray:
        """Dequantize only the rows the ids name (each distinct row once)."""
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= w.rows):
            raise InputError(f"{w.name}: token id outside [0, {w.rows})")
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = w.data.reshape(w.rows, w.row_bytes)[uniq].reshape(-1)
        table = dequantize(rows, w.dtype, (len(uniq), w.cols), name=w.name)
        return table[inverse.reshape(-1)]

    def matmul(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        """float64 products and sums, rounded to float32 once: the result of a row does not depend
        on how many rows are multiplied together (BLAS picks other float32 kernels by shape), so a
        sequence's logits are the same alone, in a batch, or one token at a time."""
        if fp8.uses_fp8(self.precision, x.shape[0]):
            return self._matmul_fp8(x, w)
        return self._matmul(x, w)

    @staticmethod
    def _row_tiles(w: QTensor):
        """(s, e, rows [s, e) of W as float32): one bounded tile of dequantized rows at a time."""
        step = max(1, TILE_VALUES // max(1, w.cols))
        for s in range(0, w.rows, step):
            e = min(w.rows, s + step)
            yield s, e, dequantize_rows(w, s, e)

    @classmethod
    def _matmul(cls, x: np.ndarray, w: QTensor) -> np.ndarray:
        x = np.asarray(x, np.float64)
        out = np.empty((x.shape[0], w.rows), np.float32)
        for s, e, tile in cls._row_tiles(w):
            out[:, s:e] = x @ tile.astype(np.float64).T
        return out

    def _weight_scales(self, w: QTensor) -> tuple[np.ndarray, np.ndarray]:
        """(scale, inverse) per row of W for its e4m3 form (engine/fp8.py), once per matrix."""
        if w.name not in self._fp8_scales:
            amax = np.zeros(w.rows, np.float32)
            if w.cols:
                for s, e, tile in self._row_tiles(w):
                    amax[s:e] = np.abs(tile).max(axis=1)
            self._fp8_scales[w.name] = fp8.row_scales(amax)
        return self._fp8_scales[w.name]

    def _matmul_fp8(self, x: np.ndarray, w: QTensor) -> np.ndarray:
        """The FP8 mode's product (engine/fp8.py): e4m3 x and W with row scales, sums in float64
        (the GPU's fp32 sums differ from them by rounding only), the two scales in float32."""
        xq, a = fp8.quantize_rows(x)
        xq = xq.astype(np.float64)
        scale, inv = self._weight_scales(w)
        out = np.empty((x.shape[0], w.rows), np.float32)
        for s, e, tile in self._row_tiles(w):
            w8 = fp8.e4m3(tile * inv[s:e, None])
            out[:, s:e] = fp8.rescale((xq @ w8.astype(np.float64).T).astype(np.float32), a, scale[s:e])
        return out

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a + b).astype(np.float32, copy=False)

    def scale(self, x: np.ndarray, s: float) -> np.ndarray:
        return x * np.float32(s)

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        x64 = x.astype(np.float64)
        ms = np.mean(x64 * x64, axis=-1, keepdims=True)
        return (x64 / np.sqrt(ms + eps) * w).astype(np.float32)

    def add_rmsnorm(self, h: np.ndarray, d: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
        h = self.add(h, d)
        return h, self.rmsnorm(h, w, eps)

    def qkv_rope(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, batch: Batch, theta: float, neox: bool,
                 pos_scale: float, freq_factors: np.ndarray | None, bias: tuple = (None, None, None),
                 norm: tuple | None = None, eps: float = 0.0, cache: NumpyKVCache | None = None,
                 layer: int = 0) -> tuple:
        """The unfused steps: add each bias, RMSNorm q and k per head (QK-norm), RoPE them; then,
        with a cache, store k and v in it (as `attention` would)."""
        out = []
        for i, x in enumerate((q, k, v)):
            if bias[i] is not None:
                x = self.add(x, np.asarray(bias[i], np.float32).reshape(x.shape[1:]))
            if i < 2 and norm is not None:
                x = self.rmsnorm(x, norm[i], eps)
            out.append(self.rope(x, batch, theta, neox, pos_scale, freq_factors) if i < 2
                       else np.ascontiguousarray(x, np.float32))
        if cache is None:
            return tuple(out)
        self._store(out[1], out[2], batch, cache, layer)
        return out[0], None, None

    @staticmethod
    def _store(k: np.ndarray, v: np.ndarray, batch: Batch, cache: NumpyKVCache, layer: int) -> None:
        """Sequence b's new k/v rows into slot b of the cache after its past_lens[b] cached ones,
        all checked before any is written."""
        cu, past = np.asarray(batch.cu_seqlens, np.int64), np.asarray(batch.past_lens, np.int64)
        if batch.n_seqs > cache.n_seqs:
            raise InputError(f"batch has {batch.n_seqs} sequences, the KV cache {cache.n_seqs}")
        for b in range(batch.n_seqs):
            if past[b] + cu[b + 1] - cu[b] > cache.max_len:
                raise InputError(f"sequence {b}: {past[b] + cu[b + 1] - cu[b]} tokens exceed the KV cache length "
                                 f"{cache.max_len}")
        for b in range(batch.n_seqs):
            s, e, p0 = int(cu[b]), int(cu[b + 1]), int(past[b])
            cache.k[layer][b][p0:p0 + e - s], cache.v[layer][b][p0:p0 + e - s] = k[s:e], v[s:e]

    def rope(self, x: np.ndarray, batch: Batch, theta: float, neox: bool, pos_scale: float,
             freq_factors: np.ndarray | None) -> np.ndarray:
        d = x.shape[-1]
        half = d // 2
        inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / d)
        if freq_factors is not None:
            inv_freq = inv_freq / np.asarray(freq_factors, np.float64)
        ang = np.asarray(batch.positions, np.float64)[:, None] * pos_scale * inv_freq[None, :]  # [N, d/2]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x64 = x.astype(np.float64)
        if neox:
            a, b = x64[..., :half], x64[..., half:]
        else:
            a, b = x64[..., 0::2], x64[..., 1::2]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        out = np.empty_like(x64)
        if neox:
            out[..., :half], out[..., half:] = ra, rb
        else:
            out[..., 0::2], out[..., 1::2] = ra, rb
        return out.astype(np.float32)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, batch: Batch, scale: float, window: int,
                  cache: NumpyKVCache | None, layer: int) -> np.ndarray:
        out = np.empty(q.shape, np.float32)
        cu = np.asarray(batch.cu_seqlens, np.int64)
        past = np.asarray(batch.past_lens, np.int64)
        if cache is not None and k is not None:  # else qkv_rope stored them
            self._store(k, v, batch, cache, layer)
        for b in range(batch.n_seqs):
            s, e = int(cu[b]), int(cu[b + 1])
            p0 = int(past[b])
            if cache is None:
                if p0:
                    raise InputError(f"sequence {b}: past length {p0} without a KV cache")
                keys, vals = k[s:e], v[s:e]
            else:
                keys, vals = cache.k[layer][b][:p0 + e - s], cache.v[layer][b][:p0 + e - s]
            out[s:e] = self._attend(q[s:e], keys, vals, p0, scale, window)
        return out

    @staticmethod
    def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos0: int, scale: float, window: int) -> np.ndarray:
        """One sequence: queries at positions q_pos0..q_pos0+n-1, keys at 0..len(k)-1."""
        n, hq, d = q.shape
        t, hkv, _ = k.shape
        g = hq // hkv  # GQA: query head h reads kv head h // g
        # float64 throughout, for the same reason as matmul: no dependence on the number of queries.
        kh = np.ascontiguousarray(k.transpose(1, 2, 0), np.float64)  # [Hkv, D, T]
        vh = np.ascontiguousarray(v.transpose(1, 0, 2), np.float64)  # [Hkv, T, D]
        kpos = np.arange(t)
        out = np.empty((n, hq, d), np.float32)
        block = max(1, ATTN_BLOCK_VALUES // max(1, hq * t))
        for s in range(0, n, block):
            e = min(n, s + block)
            qpos = q_pos0 + np.arange(s, e)
            qh = q[s:e].astype(np.float64).reshape(e - s, hkv, g, d).transpose(1, 2, 0, 3)  # [Hkv, G, n, D]
            scores = np.matmul(qh, kh[:, None]) * scale  # [Hkv, G, n, T]
            allowed = kpos[None, :] <= qpos[:, None]
            if window > 0:
                allowed &= qpos[:, None] - kpos[None, :] < window
            scores[..., ~allowed] = -np.inf
            o = np.matmul(_softmax64(scores), vh[:, None])  # [Hkv, G, n, D]
            out[s:e] = o.transpose(2, 0, 1, 3).reshape(e - s, hq, d)
        return out

    def glu_matmul(self, x: np.ndarray, gate: QTensor, up: QTensor, act: str) -> np.ndarray:
        y = self.glu(self.matmul(x, gate), self.matmul(x, up), act)
        if fp8.uses_fp8(self.precision, x.shape[0]):  # the FP8 mode hands the down projection f16 (engine/fp8.py)
            return y.astype(np.float16).astype(np.float32)
        return y

    def glu(self, gate: np.ndarray, up: np.ndarray, act: str) -> np.ndarray:
        g = gate.astype(np.float64)
        if act == "silu":
            a = g / (1.0 + np.exp(-g))
        elif act == "gelu_tanh":
            a = 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
        else:
            raise UnsupportedError(f"activation {act!r} (known: {', '.join(ACTS)})")
        return (a * up).astype(np.float32)

    def new_cache(self, n_layers: int, n_seqs: int, max_len: int, n_kv_heads: int, head_dim: int) -> NumpyKVCache:
        shape = (n_seqs, max_len, n_kv_heads, head_dim)
        return NumpyKVCache([np.zeros(shape, np.float32) for _ in range(n_layers)],
                            [np.zeros(shape, np.float32) for _ in range(n_layers)])

    # --- logits ---------------------------------------------------------------------------------
    def lm_head(self, x: np.ndarray, w: QTensor, dtype=np.float32) -> np.ndarray:
        return self._matmul(x, w).astype(dtype, copy=False)  # the fp16 path's head in every precision

    def log_softmax(self, x: np.ndarray, temperature: float = 1.0, inplace: bool = False) -> np.ndarray:
        if not temperature > 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        z = x.astype(np.float64) / temperature
        z -= z.max(axis=-1, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
        if inplace and x.dtype == np.float32 and x.flags.c_contiguous:
            x[...] = z
            return x
        return z.astype(np.float32)

    def all_finite(self, x: np.ndarray) -> bool:
        rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        step = max(1, FINITE_CHUNK_VALUES // max(rows.shape[1], 1))  # a bounded bool temporary
        return all(bool(np.isfinite(rows[s:s + step]).all()) for s in range(0, rows.shape[0], step))

    def argmax(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        ids = np.argmax(x, axis=-1).astype(np.int32)
        if out is None:
            return ids
        out[...] = ids
        return out

    def logsumexp(self, x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        z = x.astype(np.float64) / temperature
        m = z.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)  # a row of -inf sums to 0: its log is -inf, not NaN
        with np.errstate(divide="ignore"):
            return (np.log(np.exp(z - m).sum(axis=-1)) + m[..., 0]).astype(np.float32)

    def release_cached(self) -> None:
        pass  # NumPy caches nothing

    def topk_logprobs(self, x: np.ndarray, k: int, temperature: float = 1.0,
                      tail: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        y = self.log_softmax(x, temperature)
        vals, idx = self.topk(y, k)
        if not tail:
            return vals, idx, None
        np.put_along_axis(y, idx.astype(np.int64), -np.inf, axis=-1)  # the rest of each row is the tail
        return vals, idx, self.logsumexp(y)

    def topk(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest of each row of x [..., n], descending, ties to the lower index (indices
        int32): the oracle's selection, and the order of topk_logprobs (ops.topk is CUDA's twin)."""
        n = x.shape[-1]
        if not 1 <= k <= n:
            raise InputError(f"top-k needs 1 <= k <= {n}, got k={k}")
        rows = x.reshape(-1, n)
        # argpartition finds the k-th value; sorting the candidates by (-value, index) gives the
        # order with ties to the lower index, whatever argpartition chose among equal values.
        part = np.argpartition(-rows, k - 1, axis=-1)[:, :k]
        kth = np.take_along_axis(rows, part, axis=-1).min(axis=-1, keepdims=True)
        idx = np.empty((rows.shape[0], k), np.int64)
        for r in range(rows.shape[0]):
            above = np.flatnonzero(rows[r] > kth[r])
            ties = np.flatnonzero(rows[r] == kth[r])[:k - len(above)]
            cand = np.concatenate([above, ties])
            idx[r] = cand[np.lexsort((cand, -rows[r, cand]))]
        vals = np.take_along_axis(rows, idx, axis=-1)
        return vals.reshape(x.shape[:-1] + (k,)), idx.astype(np.int32).reshape(x.shape[:-1] + (k,))
