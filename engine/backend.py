"""The small interface that the one forward (forward.py) is written against.

Two implementations: backend_cpu.NumpyBackend (the float32/float64 reference, the oracle) and
backend_cuda.CudaBackend (CuPy RawKernels). Arrays are the backend's own (numpy.ndarray or
cupy.ndarray); the forward never looks inside them.

Token layout: sequences of a batch are packed one after another, no padding: activations are
[N, ...] with N = total tokens, `Batch.cu_seqlens` marks where each sequence starts (the varlen
layout of FlashAttention), so a padded position cannot leak into a real one by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .tensors import ModelFile, QTensor

Array = Any  # numpy.ndarray or cupy.ndarray


@dataclass(frozen=True)
class Batch:
    """Where each packed sequence lies, host-side (int32). Backends copy what they need."""

    cu_seqlens: np.ndarray  # [B+1], cu_seqlens[0] = 0, cu_seqlens[-1] = N (new tokens this call)
    positions: np.ndarray  # [N] absolute position of each token (past_len + index in sequence)
    past_lens: np.ndarray  # [B] tokens already in the KV cache per sequence (0 for a plain prefill)

    @property
    def n_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.cu_seqlens)

    @staticmethod
    def from_lengths(lengths: list[int] | np.ndarray, past_lens: np.ndarray | None = None) -> "Batch":
        lengths = np.asarray(lengths, dtype=np.int64)
        past = np.zeros(len(lengths), np.int64) if past_lens is None else np.asarray(past_lens, np.int64)
        cu = np.zeros(len(lengths) + 1, np.int32)
        np.cumsum(lengths, out=cu[1:])
        pos = np.concatenate([np.arange(p, p + n) for p, n in zip(past, lengths)]) if len(lengths) else np.zeros(0)
        return Batch(cu, pos.astype(np.int32), past.astype(np.int32))


class KVCache(Protocol):
    """Per-layer key/value storage for decoding; created by Backend.new_cache."""


class Backend(Protocol):
    name: str
    xp: Any  # the array module of the backend's arrays (numpy or cupy), for generic array code

    # --- weights (uploaded once, in their stored dtype) ---
    def check_model(self, model: ModelFile) -> None: ...  # before any upload: the backend's limits, then check_fits
    def check_fits(self, tensors: list[QTensor]) -> None: ...  # DeviceError (need vs free) before any upload
    def weight(self, t: QTensor) -> Any: ...  # a matrix [out, in], kept quantized
    def vector(self, t: QTensor) -> Array: ...  # a small 1-D float32 tensor (norms, biases, rope_freqs)

    # --- data movement ---
    def asarray(self, x: np.ndarray) -> Array: ...
    def to_numpy(self, x: Array) -> np.ndarray: ...

    # --- the operations of the forward; all activations float32 unless said ---
    def embed(self, w: Any, ids: Array) -> Array: ...  # [N] int32 -> [N, hidden], rows gathered from the stored dtype
    def matmul(self, x: Array, w: Any) -> Array: ...  # [N, in] x W[out, in]^T -> [N, out]
    def add(self, a: Array, b: Array) -> Array: ...  # elementwise, b broadcast (bias) allowed
    def scale(self, x: Array, s: float) -> Array: ...  # x * float32(s) (s rounded to float32 first, as HF/llama.cpp)
    def rmsnorm(self, x: Array, w: Array, eps: float) -> Array: ...  # over the last dim (works on [N, heads, d] too)
    def add_rmsnorm(self, h: Array, d: Array, w: Array, eps: float) -> tuple[Array, Array]: ...  # (h+d, rmsnorm(h+d))
    def qkv_rope(self, q: Array, k: Array, v: Array, batch: Batch, theta: float, neox: bool, pos_scale: float,
                 freq_factors: Array | None, bias: tuple = (None, None, None), norm: tuple | None = None,
                 eps: float = 0.0, cache: KVCache | None = None, layer: int = 0) -> tuple[Array, Array, Array]: ...
    # Attention's inputs from the projections: q [N, Hq, D], k/v [N, Hkv, D], each possibly a view
    # with a row stride (column slices of one stacked q/k/v product). q and k: + bias (a float32 add,
    # as `add`), RMSNorm per head where norm = (q_norm, k_norm) (QK-norm), then RoPE; v: + bias.
    # bias = (bq, bk, bv), each [heads * head_dim] or None. Returns new contiguous float32 arrays;
    # with `cache`, k and v go straight into layer `layer` of it (sequence b's new tokens after its
    # batch.past_lens[b] cached ones) and come back as None: `attention` then reads them from there.
    # Angle of pair i of a token at position p: p * pos_scale * theta^(-2i/head_dim) / freq_factors[i]
    # (pos_scale = 1 / linear scaling factor, llama.cpp's freq_scale). NORM pairs (x[2i], x[2i+1]),
    # NEOX pairs (x[i], x[i + head_dim/2]).
    def attention(self, q: Array, k: Array, v: Array, batch: Batch, scale: float, window: int,
                  cache: KVCache | None, layer: int) -> Array: ...
    # q [N, Hq, D], k/v [N, Hkv, D] of the new tokens; when `cache` is given, k/v (unless None: qkv_rope
    # stored them) are appended to it at `batch.past_lens` and the queries attend to past + new keys.
    # window = 0: plain causal.
    # Sequence b of the batch uses slot b of the cache.
    def glu_matmul(self, x: Array, gate: Any, up: Any, act: str) -> Array: ...
    # act(x . gate^T) * (x . up^T), act in {"silu", "gelu_tanh"}: the down projection's input. May be
    # float16 where the backend's next matmul rounds its operand to f16 anyway (CUDA, many tokens).
    def new_cache(self, n_layers: int, n_seqs: int, max_len: int, n_kv_heads: int, head_dim: int) -> KVCache: ...

    # --- logits (the LM head is the largest matrix: outputs may be big, reductions stay on device) ---
    def lm_head(self, x: Array, w: Any, dtype: Any = np.float32) -> Array: ...  # matmul, output in dtype (f32/f16)
    def log_softmax(self, x: Array, temperature: float = 1.0, inplace: bool = False) -> Array: ...
    # of x / temperature over the last dim, float32; inplace: into x when it is float32 and contiguous
    def logsumexp(self, x: Array, temperature: float = 1.0) -> Array: ...  # log(sum(exp(x / t))) over the last dim, float32; -inf for a row of -inf
    def release_cached(self) -> None: ...
    # hand memory that the backend caches but no live array uses back to the device (CUDA: the free
    # blocks of CuPy's default pool, a caller's own among them); the provider calls it after the
    # upload, before each forward and between its layers and its LM head
    def topk_logprobs(self, x: Array, k: int, temperature: float = 1.0,
                      tail: bool = False) -> tuple[Array, Array, Array | None]: ...
    # the k largest of log_softmax(x / temperature) [rows, n] per row (descending, ties to the lower
    # index; indices int32) and, with tail, the logsumexp of the other log-probs (the tail mass; -inf where k covers the row). CUDA
    # does it in one kernel without a [rows, n] temporary; x may be a row-strided view.
    def all_finite(self, x: Array) -> bool: ...  # no NaN/Inf anywhere in x (float16/32): one bool back
    def argmax(self, x: Array, out: Array | None = None) -> Array: ...
    # int32 [rows], the index of each row's largest value of x [rows, n], as numpy.argmax (the first of
    # equal maxima, a row's first NaN); out: an int32 [rows] array to write (a decode graph's buffer)
