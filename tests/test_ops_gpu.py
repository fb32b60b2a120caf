"""kernels/ops.cu against float64 NumPy references, on fresh random inputs with poisoned outputs.

Shapes are deliberately odd: T = 1, 7, 65, 300, 1000+, several sequences of different lengths in
one packed batch, KV caches with past tokens, windows smaller than T, GQA ratios 1/4/7, head_dim
64/128/256 and one that is not a multiple of 16.
"""
from __future__ import annotations

import numpy as np
import pytest

from q4k_engine.errors import InputError

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def ops():
    from q4k_engine.kernels import ops

    return ops


def poisoned(cp, shape, dtype=np.float32):
    return cp.full(shape, np.nan, dtype)


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), "output has NaN/inf (an element was not written?)"
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


# --- float64 references ------------------------------------------------------------------------
def ref_rmsnorm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def ref_rope(x, pos, theta, neox, pos_scale, factors):
    x = x.astype(np.float64)
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    if factors is not None:
        inv = inv / factors
    ang = (pos.astype(np.float64) * pos_scale)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        x0, x1 = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], -1)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2], y[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
    return y


def ref_attention(q, k, v, q_pos, k_count, scale, window):
    """One sequence: q [T, Hq, D] at key indices q_pos; keys 0..k_count-1 of k/v [>=k_count, Hkv, D]."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    out = np.empty(q.shape, np.float64)
    kpos = np.arange(k_count)
    vis = (kpos[None, :] <= q_pos[:, None])
    if window > 0:
        vis &= (q_pos[:, None] - kpos[None, :]) < window
    for h in range(hq):
        s = q[:, h].astype(np.float64) @ k[:k_count, h // g].astype(np.float64).T * scale
        s = np.where(vis, s, -np.inf)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[:, h] = p @ v[:k_count, h // g].astype(np.float64)
    return out


# --- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 5), (7, 64), (65, 3584), (300, 896), (7, 4, 128), (65, 3, 256)])
def test_rmsnorm(cp, ops, rng, shape):
    x = rng.standard_normal(shape).astype(np.float32) * 3
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    out = poisoned(cp, shape)
    ops.rmsnorm(cp.asarray(x), cp.asarray(w), 1e-6, out=out)
    assert rel_err(out.get(), ref_rmsnorm(x, w, 1e-6)) < 1e-5


@pytest.mark.parametrize("shape", [(1, 5), (65, 3584), (300, 640)])
def test_add_rmsnorm(cp, ops, rng, shape):
    h = rng.standard_normal(shape).astype(np.float32)
    d = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    oh, oy = poisoned(cp, shape), poisoned(cp, shape)
    ops.add_rmsnorm(cp.asarray(h), cp.asarray(d), cp.asarray(w), 1e-5, out_h=oh, out_y=oy)
    s = h.astype(np.float64) + d
    assert rel_err(oh.get(), s) < 1e-6
    assert rel_err(oy.get(), ref_rmsnorm(s, w, 1e-5)) < 1e-5


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("n,heads,d,theta,pos_scale,factors", [
    (1, 1, 64, 1e4, 1.0, False),
    (65, 4, 128, 1e6, 1.0, False),
    (300, 2, 256, 1e6, 0.125, False),
    (7, 3, 6, 1e5, 1.0, True),
    (65, 2, 128, 5e5, 1.0, True),
    (33, 28, 128, 1e6, 1.0, False),  # 28 heads over a block's 8 warps: uneven
    (9, 7, 96, 1e4, 1.0, True),  # 48 pairs: a warp's lanes wrap once, partly
])
def test_rope(cp, ops, rng, neox, n, heads, d, theta, pos_scale, factors):
    x = rng.standard_normal((n, heads, d)).astype(np.float32)
    pos = np.sort(rng.integers(0, 40000, n)).astype(np.int32)
    ff = rng.uniform(1.0, 8.0, d // 2).astype(np.float32) if factors else None
    out = poisoned(cp, x.shape)
    ops.rope(cp.asarray(x), cp.asarray(pos), theta, neox, pos_scale,
             None if ff is None else cp.asarray(ff), out=out)
    assert rel_err(out.get(), ref_rope(x, pos, theta, neox, pos_scale, ff)) < 2e-6
    # The q/k bias fused in: x + bias rotated, equal to the NumPy oracle's add-then-rope and, bit
    # for bit, to this kernel run on the sum (the same fp32 add, then the same rotation).
    from q4k_engine.backend import Batch
    from q4k_engine.backend_cpu import NumpyBackend

    bias = (rng.standard_normal(heads * d) * 2).astype(np.float32)
    fused = poisoned(cp, x.shape)
    ops.rope(cp.asarray(x), cp.asarray(pos), theta, neox, pos_scale, None if ff is None else cp.asarray(ff),
             out=fused, bias=cp.asarray(bias))
    cpu = NumpyBackend()
    oracle = cpu.rope(cpu.add(x, bias.reshape(heads, d)), Batch(np.array([0, n], np.int32), pos, np.zeros(1, np.int32)),
                      theta, neox, pos_scale, ff)
    assert rel_err(fused.get(), oracle) < 2e-6
    assert rel_err(fused.get(), ref_rope(x + bias.reshape(heads, d), pos, theta, neox, pos_scale, ff)) < 2e-6
    unfused = ops.rope(cp.asarray(x) + cp.asarray(bias).reshape(heads, d), cp.asarray(pos), theta, neox, pos_scale,
                       None if ff is None else cp.asarray(ff))
    assert fused.get().tobytes() == unfused.get().tobytes()
    with pytest.raises(ValueError, match="q bias"):
        ops.rope(cp.asarray(x), cp.asarray(pos), theta, neox, bias=cp.asarray(bias[1:]))


@pytest.mark.parametrize("n,hq,hkv,d,neox,bias,norm,stacked", [
    (1, 28, 4, 128, True, True, False, True),  # a Qwen2-7B decode token, stacked q/k/v
    (65, 8, 2, 64, False, True, True, True),
    (7, 3, 1, 6, True, False, True, False),
    (130, 4, 4, 256, True, False, True, True),  # Gemma-like: QK-norm, no bias
    (9, 7, 7, 96, False, True, False, False),
    (3, 2, 1, 16, True, True, True, True),
])
def test_qkv_rope(cp, ops, rng, n, hq, hkv, d, neox, bias, norm, stacked):
    """One launch for attention's inputs against the NumPy oracle's add, per-head RMSNorm and RoPE,
    with q/k/v as column slices of one stacked product (row stride) or contiguous."""
    from q4k_engine.backend import Batch
    from q4k_engine.backend_cpu import NumpyBackend

    widths = (hq * d, hkv * d, hkv * d)
    y = (rng.standard_normal((n, sum(widths))) * 3).astype(np.float32)
    cols = np.cumsum((0,) + widths)
    host = [y[:, a:b].reshape(n, -1, d) for a, b in zip(cols, cols[1:])]
    yd = cp.asarray(y)
    dev = ([yd[:, a:b].reshape(n, -1, d) for a, b in zip(cols, cols[1:])] if stacked
           else [cp.asarray(np.ascontiguousarray(x)) for x in host])
    pos = np.sort(rng.integers(0, 40000, n)).astype(np.int32)
    ff = rng.uniform(1.0, 8.0, d // 2).astype(np.float32)
    bs = tuple((rng.standard_normal(w) * 2).astype(np.float32) if bias else None for w in widths)
    ns = tuple(rng.uniform(0.5, 1.5, d).astype(np.float32) for _ in range(2)) if norm else None
    print(f"n={n} hq={hq} hkv={hkv} d={d} neox={neox} bias={bias} norm={norm} stacked={stacked}")
    outs = tuple(poisoned(cp, x.shape) for x in host)
    got = ops.qkv_rope(*dev, cp.asarray(pos), 1e6, neox, 0.5, cp.asarray(ff),
                       bias=tuple(None if b is None else cp.asarray(b) for b in bs),
                       norm=None if ns is None else tuple(cp.asarray(w) for w in ns), eps=1e-6, out=outs)
    assert all(g is o for g, o in zip(got, outs))
    want = NumpyBackend().qkv_rope(*host, Batch(np.array([0, n], np.int32), pos, np.zeros(1, np.int32)), 1e6, neox,
                                   0.5, ff, bias=bs, norm=ns, eps=1e-6)
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g.get(), w) < 4e-6, name
    # q alone (k and v absent) is `rope`: the same launch, so without the norm the same bits
    alone = ops.rope(dev[0], cp.asarray(pos), 1e6, neox, 0.5, cp.asarray(ff), bias=None if bs[0] is None else cp.asarray(bs[0]))
    if not norm:
        assert alone.get().tobytes() == got[0].get().tobytes()
    with pytest.raises(ValueError, match="k has shape"):
        ops.qkv_rope(dev[0], dev[1][:, :, :-2], dev[2], cp.asarray(pos), 1e6, neox)
    # kv_rows: k and v go straight to their KV-cache rows (a decode step's cache write), the other
    # rows stay as they were; q and the values are those of the launch above, bit for bit
    dest = rng.permutation(n + 5)[:n].astype(np.int32)
    ck, cv = poisoned(cp, (n + 5, hkv, d)), poisoned(cp, (n + 5, hkv, d))
    q2, k2, v2 = ops.qkv_rope(*dev, cp.asarray(pos), 1e6, neox, 0.5, cp.asarray(ff),
                              bias=tuple(None if b is None else cp.asarray(b) for b in bs),
                              norm=None if ns is None else tuple(cp.asarray(w) for w in ns), eps=1e-6,
                              out=(None, ck, cv), kv_rows=cp.asarray(dest))
    assert k2 is ck and v2 is cv and q2.get().tobytes() == got[0].get().tobytes()
    rest = np.setdiff1d(np.arange(n + 5), dest)
    for cache, g in ((ck.get(), got[1].get()), (cv.get(), got[2].get())):
        assert cache[dest].tobytes() == g.tobytes() and np.isnan(cache[rest]).all()
    with pytest.raises(ValueError, match="cache layers"):
        ops.qkv_rope(*dev, cp.asarray(pos), 1e6, neox, kv_rows=cp.asarray(dest))


def test_kv_write(cp, ops, rng):
    """New K/V rows land in their cache rows; every other row keeps what it had."""
    n, hkv, d, cache_rows = int(rng.integers(1, 40)), 4, 72, 300
    k = rng.standard_normal((n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    rows = rng.choice(cache_rows, n, replace=False)
    ck, cv = poisoned(cp, (cache_rows, hkv, d)), poisoned(cp, (cache_rows, hkv, d))
    ops.kv_write(cp.asarray(k), cp.asarray(v), ck, cv, cp.asarray(rows))
    got_k, got_v = ck.get(), cv.get()
    np.testing.assert_array_equal(got_k[rows], k)
    np.testing.assert_array_equal(got_v[rows], v)
    rest = np.setdiff1d(np.arange(cache_rows), rows)
    assert np.isnan(got_k[rest]).all() and np.isnan(got_v[rest]).all()


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu(cp, ops, rng, act):
    n = int(rng.integers(1, 5000)) * 7
    g = (rng.standard_normal(n) * 4).astype(np.float32)
    u = rng.standard_normal(n).astype(np.float32)
    out = poisoned(cp, (n,))
    ops.glu(cp.asarray(g), cp.asarray(u), act, out=out)
    g64 = g.astype(np.float64)
    if act == "silu":
        a = g64 / (1 + np.exp(-g64))
    else:
        a = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3)))
    assert rel_err(out.get(), a * u) < 1e-5


# Error bounds, as max |error| / max |reference|. Decode is fp32 throughout. Prefill rounds q*scale,
# k, v and the probabilities to f16 (11-bit significands) before the tensor-core products; a NumPy
# model of those roundings gives 0.6-0.9e-3 on these inputs, the H200 measured at most 8.9e-4
# (printed per case), so 1.5e-3 leaves headroom without hiding a wrong tile or a lost key.
ATT_FP32_BOUND = 2e-5
ATT_F16_BOUND = 1.5e-3

ATT_CASES = [  # lengths of the packed sequences, Hq, Hkv, head_dim, window
    ([1], 4, 4, 64, 0),
    ([7], 4, 2, 128, 0),
    ([65], 8, 2, 128, 0),
    ([130], 4, 1, 256, 0),
    ([1025], 4, 4, 64, 0),  # GQA 1, 1000+ keys, a last tile of one key
    ([1031], 7, 1, 128, 0),  # GQA 7 (Qwen2-7B's ratio): 16-row slices straddle tokens
    ([300], 7, 1, 128, 64),
    ([5, 300, 1, 65], 6, 2, 64, 0),
    ([1000, 130, 7], 8, 2, 128, 200),  # GQA 4, packed, window
    ([1200], 4, 1, 256, 512),  # gemma3 270M's shapes and sliding window
    ([33, 7, 129], 4, 4, 40, 16),  # head dim padded to 48 inside the kernel
    ([65, 2], 2, 1, 256, 512),
]


def check_attention(got, ref, bound, what):
    err = rel_err(got, ref)
    print(f"attention {what}: max|err|/max|ref| = {err:.2e} (bound {bound:.1e})")
    assert err < bound, what


@pytest.mark.parametrize("lengths,hq,hkv,d,window", ATT_CASES)
def test_attention_prefill(cp, ops, rng, lengths, hq, hkv, d, window):
    cu = np.concatenate([[0], np.cumsum(lengths)])
    n = int(cu[-1])
    q = rng.standard_normal((n, hq, d)).astype(np.float32)
    k = rng.standard_normal((n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, hkv, d)).astype(np.float32)
    scale = d ** -0.5 * 2  # sharper than default so the softmax is not near-uniform
    zeros = np.zeros(len(lengths))
    layout = ops.SeqLayout.build(cu[:-1], lengths, zeros, cu[:-1], lengths)
    out = poisoned(cp, q.shape)
    ops.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), layout, scale, window, out=out)
    got = out.get()
    bound = ATT_FP32_BOUND if layout.decode else ATT_F16_BOUND
    for s, e in zip(cu[:-1], cu[1:]):
        ref = ref_attention(q[s:e], k[s:e], v[s:e], np.arange(e - s), e - s, scale, window)
        check_attention(got[s:e], ref, bound, f"{lengths} Hq={hq} Hkv={hkv} d={d} w={window} seq {s}:{e}")


@pytest.mark.parametrize("new_lens,past_lens,hq,hkv,d,window", [
    ([1], [0], 4, 2, 64, 0),
    ([1, 1, 1], [7, 300, 0], 8, 2, 128, 0),  # decode kernel
    ([1, 1], [600, 65], 4, 1, 256, 256),  # decode with a window, more keys than one chunk
    ([7, 65], [300, 1], 4, 2, 128, 0),  # chunked prefill onto a cache: tensor-core kernel
    ([65], [200], 2, 2, 64, 100),
    ([130, 1, 7], [1000, 5, 0], 7, 1, 128, 0),  # one-query sequence inside a prefill batch, GQA 7
    ([65, 33], [1100, 40], 4, 1, 256, 512),
])
def test_attention_with_cache(cp, ops, rng, new_lens, past_lens, hq, hkv, d, window):
    check_cache_case(cp, ops, rng, new_lens, past_lens, hq, hkv, d, window, ops.attention)


# Every tiling bench/bench_attention.py --variants compares (ops.FlashTiles fields), so that the
# one ops._flash_tiles picks is covered whichever wins.
@pytest.mark.parametrize("d,tiles", [
    (128, (4, 1, 64)), (128, (4, 1, 32)), (128, (4, 2, 32)), (128, (2, 2, 32)), (128, (4, 1, 64, 3)),
    (128, (2, 1, 32)), (256, (4, 1, 32)), (256, (2, 1, 32)), (64, (4, 1, 64)), (64, (2, 1, 64)),
    (64, (4, 2, 64)), (64, (2, 2, 64)), (64, (4, 2, 32)), (40, (4, 2, 32)),
])
def test_attention_tilings(cp, ops, rng, d, tiles):
    def attend(q, k, v, layout, scale, window, out):
        ops._flash_prefill(q, k, v, out, layout, scale, window, ops.FlashTiles(*tiles))

    check_cache_case(cp, ops, rng, [130, 1, 67], [200, 0, 33], 7, 1, d, 150, attend)


# Split-K decode (ops._decode_split) against the oracle: one new token per sequence after contexts
# of 0 .. 4999 cached keys, batches whose sequences have different lengths, windows shorter and
# longer than the context, GQA 1/4/7 (and 16: two head tiles per kv head), head dims 64/128/256 and
# two that are no multiple of 16 or of 4.
DECODE_CASES = [  # past lengths (one query each), Hq, Hkv, head_dim, window
    ([0], 4, 4, 64, 0),  # context 1
    ([6], 28, 4, 128, 0),  # context 7, the 7B's heads
    ([299], 7, 1, 128, 0),  # context 300, GQA 7
    ([2048], 28, 4, 128, 0),  # context 2049
    ([4999], 4, 1, 256, 0),  # context 5000, GQA 4
    ([4999, 0, 1500], 8, 2, 64, 0),  # batch 3, different lengths
    ([2048, 300, 6], 28, 4, 128, 0),
    ([4999, 20, 700], 4, 1, 256, 512),  # gemma3's window: longer and shorter than the contexts
    ([1000, 15, 4096], 8, 8, 64, 16),  # a window of 16 (mistral's synthetic), GQA 1
    ([3000], 16, 1, 128, 0),  # GQA 16: two blocks of 8 heads per kv head
    ([12, 901], 6, 1, 40, 100),  # head dim 40 (padded); GQA 6
    ([77, 2000], 3, 1, 6, 0),  # head dim 6: the scalar (non-float4) loads
]


@pytest.mark.parametrize("past,hq,hkv,d,window", DECODE_CASES)
def test_attention_decode_split(cp, ops, rng, past, hq, hkv, d, window):
    """Both decode kernels against the oracle (outputs poisoned); split-K twice: the same bits."""
    new = [1] * len(past)
    check_cache_case(cp, ops, rng, new, past, hq, hkv, d, window, ops.attention)

    def single(q, k, v, layout, scale, window, out):
        ops.attention(q, k, v, layout, scale, window, out=out, decode="single")

    check_cache_case(cp, ops, rng, new, past, hq, hkv, d, window, single)

    def twice(q, k, v, layout, scale, window, out):
        ops.attention(q, k, v, layout, scale, window, out=out)
        assert ops.attention(q, k, v, layout, scale, window).get().tobytes() == out.get().tobytes()

    check_cache_case(cp, ops, rng, new, past, hq, hkv, d, window, twice)


def test_attention_decode_split_in_a_cuda_graph(cp, ops, rng):
    """Split-K inside a captured CUDA graph, its layout sized for the whole cache (as
    CudaBackend.decode_inputs builds it) and its per-step lengths rewritten in place between
    replays: each replay matches the oracle, and gives the bits of an eager call whose layout is
    sized for the keys present (a grid of other size: the ranges are the query's own)."""
    from dataclasses import replace

    b, hq, hkv, d, window, max_len = 3, 28, 4, 128, 0, 2100
    ck = cp.asarray(rng.standard_normal((b * max_len, hkv, d)).astype(np.float32))
    cv = cp.asarray(rng.standard_normal((b * max_len, hkv, d)).astype(np.float32))
    q = cp.asarray(rng.standard_normal((b, hq, d)).astype(np.float32))
    slot0 = np.arange(b) * max_len
    rows = cp.zeros((2, b), cp.int32)  # q_pos0 and kv_len, rewritten before each replay
    full = ops.SeqLayout.build(np.arange(b), np.ones(b), np.zeros(b), slot0, np.full(b, max_len))
    layout = replace(full, q_pos0=rows[0], kv_len=rows[1])
    out = cp.empty((b, hq, d), cp.float32)
    scale = d ** -0.5
    rows.set(np.array([[5, 9, 1], [6, 10, 2]], np.int32))
    ops.attention(q, ck, cv, layout, scale, window, out=out)  # compiles the kernels before capture
    pool, stream = cp.cuda.MemoryPool(), cp.cuda.Stream(non_blocking=True)
    with cp.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        ops.attention(q, ck, cv, layout, scale, window, out=out)
        graph = stream.end_capture()
    host_q, host_k, host_v = q.get(), ck.get(), cv.get()
    sms = ops.sm_count(cp.cuda.Device().id)
    assert ops.decode_splits(b, hq, hkv, 101, window, sms).grid < ops.decode_splits(b, hq, hkv, max_len, window, sms).grid
    for past in ([0, 7, 2098], [575, 2047, 16], [40, 1, 100]):  # the last: the eager grid is the smaller
        past = np.asarray(past)
        rows.set(np.stack([past, past + 1]).astype(np.int32))
        out.fill(np.nan)
        cp.cuda.Device().synchronize()  # the writes above are on the default stream, the graph is not
        graph.launch(stream)
        stream.synchronize()
        got = out.get()
        for i in range(b):
            kk, vv = host_k[slot0[i]: slot0[i] + max_len], host_v[slot0[i]: slot0[i] + max_len]
            ref = ref_attention(host_q[i:i + 1], kk, vv, np.array([past[i]]), past[i] + 1, scale, window)
            check_attention(got[i:i + 1], ref, ATT_FP32_BOUND, f"graph replay seq {i} past={past[i]}")
        eager = ops.SeqLayout.build(np.arange(b), np.ones(b), past, slot0, past + 1)
        assert ops.attention(q, ck, cv, eager, scale, window).get().tobytes() == got.tobytes()


def check_cache_case(cp, ops, rng, new_lens, past_lens, hq, hkv, d, window, attend):
    """Queries of several sequences after their cached keys (KV cache slots of max_len rows)."""
    max_len = max(p + n for p, n in zip(past_lens, new_lens)) + 3
    b = len(new_lens)
    cache_k = rng.standard_normal((b * max_len, hkv, d)).astype(np.float32)
    cache_v = rng.standard_normal((b * max_len, hkv, d)).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(new_lens)])
    q = rng.standard_normal((int(cu[-1]), hq, d)).astype(np.float32)
    slot0 = np.arange(b) * max_len
    total = np.asarray(past_lens) + np.asarray(new_lens)
    for i in range(b):  # cache rows past a sequence's length must never be read
        cache_k[slot0[i] + total[i]: slot0[i] + max_len] = np.nan
        cache_v[slot0[i] + total[i]: slot0[i] + max_len] = np.nan
    layout = ops.SeqLayout.build(cu[:-1], new_lens, past_lens, slot0, total)
    assert layout.decode == all(n == 1 for n in new_lens)
    scale = d ** -0.5
    out = poisoned(cp, q.shape)
    attend(cp.asarray(q), cp.asarray(cache_k), cp.asarray(cache_v), layout, scale, window, out=out)
    got = out.get()
    bound = ATT_FP32_BOUND if layout.decode else ATT_F16_BOUND
    for i in range(b):
        kk = cache_k[slot0[i]: slot0[i] + max_len]
        vv = cache_v[slot0[i]: slot0[i] + max_len]
        qpos = past_lens[i] + np.arange(new_lens[i])
        ref = ref_attention(q[cu[i]:cu[i + 1]], kk, vv, qpos, total[i], scale, window)
        check_attention(got[cu[i]:cu[i + 1]], ref, bound, f"cache seq {i} new={new_lens[i]} past={past_lens[i]} "
                                                          f"Hq={hq} Hkv={hkv} d={d} w={window}")


def test_log_softmax_and_topk(cp, ops, rng):
    rows, vocab, k = 7, 50257, 20
    x = (rng.standard_normal((rows, vocab)) * 5).astype(np.float32)
    t = float(rng.uniform(0.5, 2.0))
    ls = ops.log_softmax(cp.asarray(x), temperature=t).get()
    z = x.astype(np.float64) / t
    ref = z - z.max(1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(1, keepdims=True))
    assert np.abs(ls - ref).max() < 1e-4
    vals, idx = ops.topk(cp.asarray(x), k)
    ref_idx = np.argsort(-x, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx.get(), ref_idx)
    np.testing.assert_array_equal(vals.get(), np.take_along_axis(x, ref_idx, 1))
    # logsumexp, also of a strided crop of the vocabulary and of rows that are all -inf
    lse = ops.logsumexp(cp.asarray(x)[:, 1000:], temperature=t).get()
    z = x[:, 1000:].astype(np.float64) / t
    m = z.max(1, keepdims=True)
    assert np.abs(lse - (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]).max() < 1e-4
    assert ops.logsumexp(cp.full((2, 9), -np.inf, cp.float32)).get().tolist() == [-np.inf, -np.inf]
    # ties resolve to the lower index
    y = np.zeros((1, 300), np.float32)
    y[0, [17, 5, 250]] = 1.0
    _, idx2 = ops.topk(cp.asarray(y), 4)
    assert idx2.get().tolist() == [[5, 17, 250, 0]]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1031, 300_007])
def test_all_finite(cp, ops, rng, dtype, n):
    """The one-pass non-finite check agrees with NumPy's isfinite on odd sizes (the tail past the
    16-byte loads), unaligned and strided views, and each kind of bad value at any place."""
    from q4k_engine.backend_cpu import NumpyBackend

    x = (rng.standard_normal(n + 3) * 100).astype(dtype)
    x[np.abs(x) > 200] = 0  # no accidental overflow of float16
    d = cp.asarray(x)
    for view, host in ((d[:n], x[:n]), (d[1:n + 1], x[1:n + 1]), (d[3:], x[3:]), (d[::2], x[::2])):
        assert ops.all_finite(view) and NumpyBackend().all_finite(host)
    for _ in range(6):
        pos = int(rng.integers(n))
        bad = x.copy()
        bad[pos + 1] = rng.choice([np.nan, np.inf, -np.inf])  # inside the view d[1:n+1]
        db = cp.asarray(bad)
        assert not ops.all_finite(db[1:n + 1]), (pos, bad[pos + 1])
        assert ops.all_finite(db[:pos + 1]) == bool(np.isfinite(bad[:pos + 1]).all())
    big = cp.full((64, 2053), 1.0, dtype)  # a 2-D block, bad value in the last element
    assert ops.all_finite(big)
    big[-1, -1] = np.nan
    assert not ops.all_finite(big) and not ops.all_finite(big[1:])


def _topk_logprobs_ref(x: np.ndarray, k: int, t: float):
    """The NumPy oracle: log_softmax, topk, logsumexp of the rest (NumpyBackend composes them)."""
    from q4k_engine.backend_cpu import NumpyBackend

    return NumpyBackend().topk_logprobs(np.ascontiguousarray(x), k, t, tail=True)


def _check_topk_logprobs(cp, ops, x, k, t, what):
    """The fused kernel (outputs poisoned first) against the oracle; run twice: byte-identical."""
    rows = x.shape[0]
    out = (cp.full((rows, k), np.nan, cp.float32), cp.full((rows, k), -7, cp.int32), cp.full(rows, np.nan, cp.float32))
    vals, idx, tail = ops.topk_logprobs(x, k, t, True, out=out)
    rv, ri, rt = _topk_logprobs_ref(cp.asnumpy(x), k, t)
    got_v, got_i, got_t = vals.get(), idx.get(), tail.get()
    np.testing.assert_allclose(got_v, rv, rtol=1e-5, atol=2e-5, err_msg=what)
    # each index carries its own log-prob, no index twice (tokens whose log-probs differ by float32
    # rounding may trade places with the oracle's; exact ties are checked where values are exact)
    z = cp.asnumpy(x).astype(np.float64) / t
    z -= z.max(1, keepdims=True)
    z -= np.log(np.exp(z).sum(1, keepdims=True))
    np.testing.assert_allclose(np.take_along_axis(z, got_i.astype(np.int64), 1), got_v, rtol=1e-5, atol=2e-5,
                               err_msg=what)
    assert all(len(set(r)) == k for r in got_i.tolist()), what
    finite = np.isfinite(rt)
    np.testing.assert_array_equal(np.isfinite(got_t), finite, err_msg=what)
    np.testing.assert_allclose(got_t[finite], rt[finite], rtol=1e-4, atol=1e-4, err_msg=what)
    again = ops.topk_logprobs(x, k, t, True)
    for a, b in zip((vals, idx, tail), again):
        assert a.get().tobytes() == b.get().tobytes(), f"{what}: not deterministic"
    no_tail = ops.topk_logprobs(x, k, t, False)
    assert no_tail[2] is None and no_tail[1].get().tobytes() == idx.get().tobytes(), what


@pytest.mark.parametrize("n,k", [(1, 1), (31, 5), (513, 512), (50257, 1), (50257, 64), (152064, 64),
                                 (152064, 512), (4099, 513), (300, 300)])
def test_topk_logprobs_fused(cp, ops, rng, n, k):
    """One kernel for top-k log-probs and the tail mass: odd sizes, k = n, k beyond the threads (the
    k-pass way), random temperatures, against log_softmax + topk + logsumexp in NumPy."""
    rows = 5
    t = float(rng.uniform(0.3, 2.5))
    x = (rng.standard_normal((rows, n)) * rng.uniform(1, 8)).astype(np.float32)
    _check_topk_logprobs(cp, ops, cp.asarray(x), k, t, f"n={n} k={k} t={t:.3f}")


def test_topk_logprobs_strided_ties_and_peaks(cp, ops, rng):
    """A crop of the vocabulary read in place; rows of equal values (more candidates than shared
    memory holds: the k-pass way, ties to the lower index); a peaked row whose tail is far below
    float32's exp range but finite; integer ties around the k-th value."""
    x = (rng.standard_normal((6, 20000)) * 3).astype(np.float32)
    x[1] = 0.0  # 20000 equal values
    x[2] = -5.0
    x[2, 7] = 200.0  # tail ~ exp(-205) relative to the peak: finite in log space
    x[3] = np.floor(x[3])  # many ties at every value
    x[4, :] = np.arange(20000, dtype=np.float32) % 3
    full = cp.asarray(x)
    _check_topk_logprobs(cp, ops, full[:, :15000], 40, 1.0, "crop 15000 of 20000")
    _check_topk_logprobs(cp, ops, full, 3, 0.7, "ties and peaks")
    vals, idx, tail = ops.topk_logprobs(full[1:2], 3, 1.0, True)
    assert idx.get().tolist() == [[0, 1, 2]]
    _, idx, _ = ops.topk_logprobs(full[3:5], 50, 1.0, False)
    np.testing.assert_array_equal(idx.get(), _topk_logprobs_ref(x[3:5], 50, 1.0)[1])
    assert abs(float(tail.get()[0]) - np.log(19997 / 20000)) < 1e-5
    _, _, tail = ops.topk_logprobs(full[2:3], 1, 1.0, True)
    assert -210 < float(tail.get()[0]) < -190
    with pytest.raises(InputError):
        ops.topk_logprobs(full, 0)
    with pytest.raises(InputError):
        ops.topk_logprobs(full, 5, temperature=0.0)


@pytest.mark.parametrize("rows, n", [(1, 1), (3, 7), (8, 1031), (8, 152_064), (5, 300_007)])
def test_argmax(cp, ops, rng, rows, n):
    """argmax_rows against numpy.argmax (the NumPy backend's) on random rows, outputs poisoned
    first: plain rows, a row-strided crop read in place, float16 (converted), ties at two places
    (the first wins), a row of -inf, NaN (the first NaN wins, as NumPy's) and, in a CUDA graph,
    what greedy decoding replays."""
    from q4k_engine.backend_cpu import NumpyBackend

    x = (rng.standard_normal((rows, n)) * 8).astype(np.float32)
    if n > 2:
        i, j = sorted(rng.choice(n, 2, replace=False).tolist())
        x[0, i] = x[0, j] = x[0].max() + 1.0  # a tie: i wins
        x[-1] = -np.inf
    if rows > 2 and n > 3:
        x[1, int(rng.integers(n // 2, n))] = np.nan
        x[1, int(rng.integers(0, n // 2))] = np.nan
    d = cp.asarray(x)
    cases = [(d, x), (d[:, 1:], x[:, 1:]), (d.astype(cp.float16), x.astype(np.float16))]
    for k, (dx, hx) in enumerate(cases):
        if not dx.shape[1]:
            continue
        out = cp.full(rows, -7, cp.int32)
        got = ops.argmax(dx, out=out).get()
        ref = NumpyBackend().argmax(hx)
        assert got.dtype == np.int32 and (got == ref).all(), (k, got, ref)
    out = cp.full(rows, -7, cp.int32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        ops.argmax(d, out=out)
        graph = stream.end_capture()
        graph.launch()
    stream.synchronize()
    assert (out.get() == np.argmax(x, axis=1)).all()
    with pytest.raises(InputError, match="argmax"):
        ops.argmax(cp.zeros((2, 0), cp.float32))


# --- the Q4_K mmv operand written by the producers of a small batch's rows (kernels/mmv_x.cuh) -----
def poisoned_operand(cp, m, cols):
    from q4k_engine.kernels import matmul

    xq = matmul.mmv_operand(m, cols)
    xq.x8.fill(np.nan)
    xq.xsub.fill(0xFFFFFFFF)  # NaN in both halves
    return xq


def check_operand(cp, xq, y, what):
    """xq against y (the fp32 rows it was written beside): x8 is y rounded to f16, bit for bit; xsub's
    hi + lo is each 32-value sub-block's sum of x8 (to the fp32 sum's rounding; hi is that sum rounded
    to f16), in fragment order, zeros for tokens past y's rows."""
    y = np.asarray(y, np.float32).reshape(y.shape[0], -1)
    m, cols = y.shape
    nb = cols // 256
    x8 = y.astype(np.float16)
    assert xq.x8.get().tobytes() == x8.tobytes(), what
    pairs = xq.xsub.get().view(np.float16).reshape(nb, 8, 4, 2, 2).astype(np.float64)  # [sb][m][t][s][hi, lo]
    got = pairs.sum(-1).transpose(0, 1, 3, 2).reshape(nb, 8, 8)  # [sb][m][j = 4 s + t]
    assert (got[:, m:] == 0).all(), f"{what}: tokens past {m} are not zeros"
    ref = x8.astype(np.float64).reshape(m, nb, 8, 32).sum(-1).transpose(1, 0, 2)  # [sb][m][j]
    scale = np.abs(x8.astype(np.float64)).reshape(m, nb, 8, 32).sum(-1).transpose(1, 0, 2)
    err = np.abs(got[:, :m] - ref) / np.maximum(scale, 1e-30)
    assert err.max() < 2e-6, f"{what}: sub-block sums off by {err.max():.3g} of their magnitude"
    hi = pairs[:, :m, :, :, 0].transpose(0, 1, 3, 2).reshape(nb, m, 8)
    assert (np.abs(hi - ref) <= np.abs(ref) * 2.0 ** -10 + scale[:, :m] * 2.0 ** -20).all(), what


@pytest.mark.parametrize("rows, d", [(1, 256), (3, 768), (8, 3584), (5, 2560)])
def test_norms_write_the_mmv_operand(cp, ops, rng, rows, d):
    """rmsnorm and add_rmsnorm write the Q4_K mmv operand of their output (poisoned first) beside it;
    the output itself is that of a call without it, bit for bit; mmv_x from the output agrees."""
    from q4k_engine.kernels import matmul

    h = cp.asarray(rng.standard_normal((rows, d)).astype(np.float32))
    r = cp.asarray(rng.standard_normal((rows, d)).astype(np.float32))
    w = cp.asarray((1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    xq = poisoned_operand(cp, rows, d)
    y = ops.rmsnorm(h, w, 1e-6, xq=xq)
    assert y.get().tobytes() == ops.rmsnorm(h, w, 1e-6).get().tobytes()
    check_operand(cp, xq, y.get(), f"rmsnorm {rows}x{d}")
    xq = poisoned_operand(cp, rows, d)
    hs, y = ops.add_rmsnorm(h, r, w, 1e-6, xq=xq)
    hs0, y0 = ops.add_rmsnorm(h, r, w, 1e-6)
    assert hs.get().tobytes() == hs0.get().tobytes() and y.get().tobytes() == y0.get().tobytes()
    check_operand(cp, xq, y.get(), f"add_rmsnorm {rows}x{d}")
    xq = poisoned_operand(cp, rows, d)
    matmul.write_mmv_operand(y, xq)
    check_operand(cp, xq, y.get(), f"mmv_x {rows}x{d}")
    with pytest.raises(ValueError, match="mmv operand"):
        ops.rmsnorm(h, w, 1e-6, xq=matmul.mmv_operand(rows, d + 256))
    assert matmul.mmv_operand(9, d) is None and matmul.mmv_operand(rows, d + 32) is None


@pytest.mark.parametrize("past,hq,hkv,d", [([700, 3, 20], 28, 4, 128), ([50] * 8, 16, 2, 64), ([9, 300], 16, 4, 80)])
def test_decode_attention_writes_the_mmv_operand(cp, ops, rng, past, hq, hkv, d):
    """Split-K decode's combine kernel writes the output projection's operand (head dims of whole
    warps; d = 80: mmv_x after it): output bits unchanged, operand as mmv_x's."""
    b = len(past)
    max_len = max(past) + 2
    k = cp.asarray(rng.standard_normal((b * max_len, hkv, d)).astype(np.float32))
    v = cp.asarray(rng.standard_normal((b * max_len, hkv, d)).astype(np.float32))
    q = cp.asarray(rng.standard_normal((b, hq, d)).astype(np.float32))
    slot0 = np.arange(b) * max_len
    layout = ops.SeqLayout.build(np.arange(b), np.ones(b), np.asarray(past), slot0, np.asarray(past) + 1)
    xq = poisoned_operand(cp, b, hq * d)
    y = ops.attention(q, k, v, layout, d ** -0.5, 0, xq=xq)
    assert y.get().tobytes() == ops.attention(q, k, v, layout, d ** -0.5, 0).get().tobytes()
    check_operand(cp, xq, y.get(), f"decode attention b={b} hq={hq} d={d}")
