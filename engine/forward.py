"""The one transformer forward of q4k-engine, written against the Backend interface (backend.py).

Every architecture of architectures.md is this pre-norm decoder plus the switches of its
ModelConfig: RoPE pairing/theta/scaling per layer, QKV bias, per-head QK-norm, GQA, sliding
window, SwiGLU or GeGLU, gemma3's sandwich norms and embedding scale, tied output head.

Sequences are packed (backend.Batch); with a KV cache the new tokens of each sequence follow its
`past_lens` cached ones, so a prefill followed by one-token steps gives the logits of one full
forward. Row t of the logits predicts token t + 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import Array, Backend, Batch, KVCache
from .config import ModelConfig, expected_shapes
from .errors import FormatError
from .tensors import ModelFile, QTensor


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Array
    qkv: tuple[Any, ...]  # the q, k and v projections, neighbours of one type stacked (_stack_rows)
    qkv_split: tuple[int, ...]  # how many of q, k, v (in that order) each matrix of qkv holds
    wo: Any
    ffn_norm: Array
    gate: Any
    up: Any
    down: Any
    bq: Array | None = None
    bk: Array | None = None
    bv: Array | None = None
    q_norm: Array | None = None
    k_norm: Array | None = None
    post_attn_norm: Array | None = None
    post_ffw_norm: Array | None = None


@dataclass(frozen=True)
class Weights:
    """A model's tensors on one backend, each uploaded once in its stored dtype."""

    embed: Any
    output: Any  # the embedding matrix itself when the head is tied
    output_norm: Array
    rope_freqs: Array | None
    layers: tuple[LayerWeights, ...]


def _check_shape(t: QTensor, shape: tuple[int, ...]) -> QTensor:
    if tuple(t.shape) != shape:
        raise FormatError(f"{t.name}: shape {tuple(t.shape)}, the config implies {shape}")
    return t


_STACK_SEP = "+"


def stacked_parts(name: str) -> list[str]:
    """The file's tensor names in an uploaded tensor's name: ["blk.0.attn_q.weight", ...] for a
    matrix that _stack_rows made ("blk.0.attn_q.weight+blk.0.attn_k.weight+..."), [name] otherwise."""
    return name.split(_STACK_SEP)


def _stack_rows(ts: list[QTensor]) -> QTensor:
    """Matrices of one type and row length as one, their rows one after another (a stored row is
    self-contained bytes in every type): one product for q, k and v, whose x is read, converted and
    launched on once instead of three times."""
    if len(ts) == 1:
        return ts[0]
    data = np.concatenate([np.asarray(t.data, np.uint8).reshape(-1) for t in ts])
    return QTensor(_STACK_SEP.join(t.name for t in ts), ts[0].dtype, (sum(t.rows for t in ts), ts[0].cols), data)


def _qkv_groups(ts: list[QTensor]) -> list[list[QTensor]]:
    """q, k, v in order, neighbours of one type together (Q4_K_M keeps v Q6_K in some layers)."""
    groups: list[list[QTensor]] = []
    for t in ts:
        if groups and groups[-1][0].dtype == t.dtype:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def upload(model: ModelFile, backend: Backend) -> Weights:
    """Check every tensor the config needs against its expected shape and hand it to the backend."""
    cfg, tensors = model.config, model.tensors
    shapes = expected_shapes(cfg)

    def get(name: str) -> QTensor:
        if name not in tensors:
            raise FormatError(f"{model.path}: tensor {name} is missing")
        return _check_shape(tensors[name], shapes[name][0])

    def mat(name: str) -> Any:
        return backend.weight(get(name))

    def vec(name: str) -> Array:
        return backend.vector(get(name))

    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        qkv = _qkv_groups([get(p + f"attn_{x}.weight") for x in "qkv"])
        layers.append(LayerWeights(
            attn_norm=vec(p + "attn_norm.weight"),
            qkv=tuple(backend.weight(_stack_rows(g)) for g in qkv),
            qkv_split=tuple(len(g) for g in qkv),
            wo=mat(p + "attn_output.weight"),
            ffn_norm=vec(p + "ffn_norm.weight"),
            gate=mat(p + "ffn_gate.weight"),
            up=mat(p + "ffn_up.weight"),
            down=mat(p + "ffn_down.weight"),
            bq=vec(p + "attn_q.bias") if cfg.qkv_bias else None,
            bk=vec(p + "attn_k.bias") if cfg.qkv_bias else None,
            bv=vec(p + "attn_v.bias") if cfg.qkv_bias else None,
            q_norm=vec(p + "attn_q_norm.weight") if cfg.qk_norm else None,
            k_norm=vec(p + "attn_k_norm.weight") if cfg.qk_norm else None,
            post_attn_norm=vec(p + "post_attention_norm.weight") if cfg.sandwich_norm else None,
            post_ffw_norm=vec(p + "post_ffw_norm.weight") if cfg.sandwich_norm else None,
        ))
    embed = mat("token_embd.weight")
    # A file that stores output.weight uses it; one without it must declare the head tied.
    output = embed if cfg.tied_head and "output.weight" not in tensors else mat("output.weight")
    rope_freqs = vec("rope_freqs.weight") if "rope_freqs.weight" in tensors else None
    return Weights(embed, output, vec("output_norm.weight"), rope_freqs, tuple(layers))


def _attention_block(cfg: ModelConfig, lw: LayerWeights, be: Backend, x: Array, batch: Batch, i: int,
                     rope_freqs: Array | None, cache: KVCache | None) -> Array:
    n = batch.n_tokens
    widths = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
    parts: list[Array] = []
    for w, count in zip(lw.qkv, lw.qkv_split):
        y, c = be.matmul(x, w), 0
        for width in widths[len(parts):len(parts) + count]:  # column slices of a stacked product: views
            parts.append(y[:, c:c + width])
            c += width
    q, k, v = (p.reshape(n, -1, cfg.head_dim) for p in parts)
    # layer_rope_scale is the multiplier of positions (1 / the linear scaling factor), see loader.py
    q, k, v = be.qkv_rope(q, k, v, batch, cfg.layer_theta(i), cfg.rope_neox, cfg.layer_rope_scale(i), rope_freqs,
                          bias=(lw.bq, lw.bk, lw.bv), norm=(lw.q_norm, lw.k_norm) if cfg.qk_norm else None,
                          eps=cfg.rms_eps, cache=cache, layer=i)
    a = be.attention(q, k, v, batch, cfg.scale, cfg.layer_window(i), cache, i)
    a = be.matmul(a.reshape(n, cfg.n_heads * cfg.head_dim), lw.wo)
    return be.rmsnorm(a, lw.post_attn_norm, cfg.rms_eps) if cfg.sandwich_norm else a


def _mlp_block(cfg: ModelConfig, lw: LayerWeights, be: Backend, x: Array) -> Array:
    f = be.matmul(be.glu_matmul(x, lw.gate, lw.up, cfg.act), lw.down)
    return be.rmsnorm(f, lw.post_ffw_norm, cfg.rms_eps) if cfg.sandwich_norm else f


def last_rows(batch: Batch) -> np.ndarray:
    """Packed row index of each sequence's last token."""
    return np.asarray(batch.cu_seqlens[1:], np.int64) - 1


def forward(cfg: ModelConfig, w: Weights, be: Backend, ids: np.ndarray, batch: Batch,
            cache: KVCache | None = None, last_only: bool = False, dtype: Any = np.float32,
            head: bool = True) -> Array:
    """Logits of packed token ids [N] (int32, on the host or already a backend array): [N, vocab],
    or [B, vocab] with `last_only` (the LM head then runs on the B last rows only), in `dtype`
    (float32 or float16).

    head=False returns the final normed hidden states instead ([N or B, hidden], float32): the
    caller then runs `be.lm_head(x[rows], w.output, dtype)` on chunks of rows, so that [N, vocab]
    never exists whole (provider.py reduces each chunk to top-k / log-probs on the device).

    With `cache` (from `be.new_cache`), sequence b's new tokens are appended after its
    `batch.past_lens[b]` cached ones and attend to them.
    """
    # Ids already on the backend are used in place: a decode step replayed as a CUDA graph reads
    # them from a fixed device buffer, where a host copy could not be captured.
    if not isinstance(ids, be.xp.ndarray):
        ids = be.asarray(np.asarray(ids, np.int32))
    if ids.shape != (batch.n_tokens,):
        raise ValueError(f"{ids.shape[0]} ids for a batch of {batch.n_tokens} tokens")
    h = be.embed(w.embed, ids)
    if cfg.embed_scale:
        h = be.scale(h, math.sqrt(cfg.hidden))
    # Each residual add is fused with the norm that reads its result: the next block's input norm.
    norms = [lw.attn_norm for lw in w.layers] + [w.output_norm]
    x = be.rmsnorm(h, norms[0], cfg.rms_eps)
    for i, lw in enumerate(w.layers):
        a = _attention_block(cfg, lw, be, x, batch, i, w.rope_freqs, cache)
        h, x = be.add_rmsnorm(h, a, lw.ffn_norm, cfg.rms_eps)
        h, x = be.add_rmsnorm(h, _mlp_block(cfg, lw, be, x), norms[i + 1], cfg.rms_eps)
    if last_only:
        x = x[be.asarray(last_rows(batch))]
    return be.lm_head(x, w.output, dtype) if head else x


# Forwards of at most GRAPH_MAX_TOKENS tokens replay from CUDA graphs where the backend can capture
# one: there an eager forward's time is the host's (the 7B at 1x128 on an H200: 12.4 of its 13.1 ms
# spent enqueueing launches, bench/RESULTS.md eleventh session), a replay's is the GPU's. Above it
# the GPU's work hides the host's, and a graph's private pool of intermediates would grow with the
# shape. A shape is captured the second time it is seen (a workload whose shapes never recur pays no
# capture); GRAPH_KEEP shapes are kept (least recently used dropped), each with its pool, and the
# last GRAPH_SEEN shapes seen once are remembered.
GRAPH_MAX_TOKENS = 512
GRAPH_KEEP = 4
GRAPH_SEEN = 64


@dataclass
class _Captured:
    ids: Array  # the graph's input: packed ids, a fixed device buffer
    out: list[Array]  # what the captured forward returned: the graph's output, rewritten by every replay
    graph: Any
    device_batch: Any  # the batch's device copies the graph's kernels read (kept alive with it)
    last: Array  # the sequences' last rows in the output (last_only), on the device once


class ForwardGraphs:
    """The layers' forward (forward(..., head=False): final normed hidden states [N, hidden]) of
    recurring batch shapes (the lengths of the packed sequences), captured as a CUDA graph the second
    time a shape is seen (the first ran eagerly: kernels compiled, handles and plans made) and
    replayed on new ids from then on. Backends without `capture` (NumPy) run every forward eagerly,
    as do shapes above `max_tokens`.

    A replay writes one buffer per shape; the caller gets a copy of it (a device copy of at most
    max_tokens x hidden values), so that two callers of one shape (two chunk iterators of a teacher
    consumed in turn) never see each other's replays. A capture that fails is said once per shape
    (FallbackWarning) and that shape stays eager.
    """

    def __init__(self, cfg: ModelConfig, w: Weights, be: Backend, max_tokens: int = GRAPH_MAX_TOKENS,
                 keep: int = GRAPH_KEEP):
        self.cfg, self.w, self.be = cfg, w, be
        self.max_tokens, self.keep = max_tokens, keep
        self.enabled = callable(getattr(be, "capture", None)) and keep > 0
        self._graphs: dict[tuple[int, ...], _Captured] = {}  # insertion order = least recently used first
        self._seen: dict[tuple[int, ...], None] = {}  # shapes run once, oldest first
        self._refused: set[tuple[int, ...]] = set()

    def pool_bytes(self) -> int:
        """Device bytes the kept graphs' private pools hold."""
        return sum(g.graph.nbytes for g in self._graphs.values())

    def hidden(self, ids: np.ndarray, lengths: Any, last_only: bool = False) -> Array:
        """Hidden states [N, hidden] of packed ids (int32 [N], on the host) of sequences of `lengths`;
        last_only: [B, hidden], each sequence's last row (forward's last_only)."""
        key = tuple(int(n) for n in lengths)
        ids = np.asarray(ids, np.int32)
        if not self.enabled or sum(key) > self.max_tokens or key in self._refused:
            return self._eager(ids, key, last_only)
        g = self._graphs.pop(key, None)
        if g is None:
            if key not in self._seen:  # a first sighting: eager, remembered
                self._seen[key] = None
                while len(self._seen) > GRAPH_SEEN:
                    self._seen.pop(next(iter(self._seen)))
                return self._eager(ids, key, last_only)
            self._seen.pop(key)  # the second: captured (not run), then replayed like every later call
            g = self._capture(ids, key)
            if g is None:
                return self._eager(ids, key, last_only)
            while len(self._graphs) >= self.keep:
                self._graphs.pop(next(iter(self._graphs)))
        else:
            g.ids[...] = self.be.asarray(ids)  # a copy into the graph's input, queued before the replay
        self._graphs[key] = g  # now the most recently used
        g.graph.launch()
        # The caller's own array, not the buffer later replays rewrite: the last rows gathered, or a copy.
        return g.out[-1][g.last] if last_only else g.out[-1].copy()

    def _eager(self, ids: np.ndarray, key: tuple[int, ...], last_only: bool) -> Array:
        return forward(self.cfg, self.w, self.be, ids, Batch.from_lengths(np.array(key, np.int64)),
                       last_only=last_only, head=False)

    def _capture(self, ids: np.ndarray, key: tuple[int, ...]) -> _Captured | None:
        """The forward of this shape captured on ids in a fixed device buffer; None (said once, the
        shape stays eager) when the backend cannot capture it."""
        import warnings

        from .errors import DeviceError, FallbackWarning

        batch = Batch.from_lengths(np.array(key, np.int64))
        dev_ids = self.be.asarray(ids)
        held = self.be.batch_buffers(batch)  # uploaded now: the captured forward finds them current
        holder: list[Array] = []
        try:
            graph = self.be.capture(lambda: holder.append(forward(self.cfg, self.w, self.be, dev_ids, batch,
                                                                  head=False)))
        except DeviceError as e:
            self._refused.add(key)
            warnings.warn(f"a forward of {len(key)} sequence(s), {sum(key)} tokens, runs eagerly (not from a "
                          f"CUDA graph): {e}", FallbackWarning, stacklevel=4)
            return None
        return _Captured(dev_ids, holder, graph, held, self.be.asarray(last_rows(batch)))
