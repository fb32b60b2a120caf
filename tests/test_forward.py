"""The one forward (engine/forward.py) on the NumPy backend.

Judged against `reference_logits` below: a plain float64 re-implementation of architectures.md,
written here without any code of forward.py/backend_cpu.py, with weights dequantized by llama.cpp's
gguf-py (not by our quants.py). It covers the switches transformers' GGUF loader cannot express
(rope_freqs factors, gemma3 linear RoPE scaling, a custom local theta and attention scale); the
transformers comparison is tests/test_parity_hf.py. Then: batching invariance, last-position-only,
the KV cache (prefill + decode == one full forward), backend ops, and upload errors.
"""
from __future__ import annotations

import dataclasses
import math

import gguf
import numpy as np
import pytest

from q4k_engine import backend_cpu
from q4k_engine.backend import Batch
from q4k_engine.backend_cpu import NumpyBackend
from q4k_engine.dtypes import GGMLType
from q4k_engine.errors import FormatError
from q4k_engine.forward import forward, upload
from q4k_engine.loader import ARCH_DEFAULTS
from q4k_engine.quants import dequantize
from q4k_engine.synthetic import synthetic_model
from q4k_engine.tensors import ModelFile, QTensor

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


# ------------------------------------------------------------------------------------------------
# the independent float64 reference


def ref_weight(t: QTensor) -> np.ndarray:
    raw = t.data.reshape(t.rows, t.row_bytes)
    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t.dtype))), np.float64).reshape(t.shape)


def reference_logits(model: ModelFile, ids: list[int]) -> np.ndarray:
    """All-position logits of one sequence, float64, straight from architectures.md."""
    c = model.config
    w = {name: ref_weight(t) for name, t in model.tensors.items()}
    n, D = len(ids), c.head_dim

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.rms_eps) * g

    def rope(x, theta, pos_mult):  # x [T, H, D]
        freqs = theta ** (-np.arange(0, D, 2) / D)
        if "rope_freqs.weight" in w:
            freqs = freqs / w["rope_freqs.weight"]
        out = x.copy()
        for j in range(D // 2):
            a, b = (j, j + D // 2) if c.rope_neox else (2 * j, 2 * j + 1)
            ang = np.arange(n) * pos_mult * freqs[j]
            cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
            out[:, :, a] = x[:, :, a] * cos - x[:, :, b] * sin
            out[:, :, b] = x[:, :, a] * sin + x[:, :, b] * cos
        return out

    h = w["token_embd.weight"][ids]
    if c.arch == "gemma3":
        h = h * np.float32(math.sqrt(c.hidden))
    for i in range(c.n_layers):
        p = f"blk.{i}."
        sliding = c.sliding_window > 0 and (c.sliding_pattern == 0 or (i + 1) % c.sliding_pattern != 0)
        theta = c.rope_theta_local if sliding and c.rope_theta_local else c.rope_theta
        pos_mult = 1.0 if sliding else c.rope_scale
        x = rms(h, w[p + "attn_norm.weight"])
        q, k, v = (x @ w[p + f"attn_{s}.weight"].T for s in "qkv")
        if p + "attn_q.bias" in w:
            q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
        q, k, v = q.reshape(n, -1, D), k.reshape(n, -1, D), v.reshape(n, -1, D)
        if p + "attn_q_norm.weight" in w:
            q, k = rms(q, w[p + "attn_q_norm.weight"]), rms(k, w[p + "attn_k_norm.weight"])
        q, k = rope(q, theta, pos_mult), rope(k, theta, pos_mult)
        scale = c.attn_scale if c.attn_scale is not None else 1 / math.sqrt(D)
        att = np.zeros_like(q)
        group = q.shape[1] // k.shape[1]
        for hd in range(q.shape[1]):
            kv = hd // group
            for t in range(n):
                lo = max(0, t - c.sliding_window + 1) if sliding else 0
                s = k[lo:t + 1, kv] @ q[t, hd] * scale
                e = np.exp(s - s.max())
                att[t, hd] = (e / e.sum()) @ v[lo:t + 1, kv]
        a = att.reshape(n, -1) @ w[p + "attn_output.weight"].T
        if c.arch == "gemma3":
            a = rms(a, w[p + "post_attention_norm.weight"])
        h = h + a
        x = rms(h, w[p + "ffn_norm.weight"])
        g = x @ w[p + "ffn_gate.weight"].T
        act = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) if c.arch == "gemma3" \
            else g / (1 + np.exp(-g))
        f = (act * (x @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        if c.arch == "gemma3":
            f = rms(f, w[p + "post_ffw_norm.weight"])
        h = h + f
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(h, w["output_norm.weight"]) @ head.T


# ------------------------------------------------------------------------------------------------
# fixtures


def _f32_tensor(name: str, values: np.ndarray) -> QTensor:
    values = np.ascontiguousarray(values, np.float32)
    return QTensor(name, GGMLType.F32, values.shape, values.view(np.uint8).reshape(-1))


def with_switches(model: ModelFile, rng: np.random.Generator) -> ModelFile:
    """Turn on what the synthetic files leave at defaults: rope_freqs factors (llama), gemma3's
    linear RoPE scaling, another local theta and an explicit attention scale."""
    c, tensors = model.config, dict(model.tensors)
    if c.arch == "llama":
        tensors["rope_freqs.weight"] = _f32_tensor("rope_freqs.weight", rng.uniform(1.0, 8.0, c.head_dim // 2))
    if c.arch == "gemma3":
        c = dataclasses.replace(c, rope_scale=0.25, rope_theta_local=5000.0, attn_scale=0.7 / math.sqrt(c.head_dim))
    return dataclasses.replace(model, config=c, tensors=tensors)


@pytest.fixture(scope="module")
def models(module_seed) -> dict[str, ModelFile]:
    rng = np.random.default_rng(module_seed)
    return {a: with_switches(synthetic_model(a, seed=int(rng.integers(2**31))), rng) for a in ARCHS}


def run(model: ModelFile, seqs: list[list[int]], be=None, **kw) -> np.ndarray:
    be = be or NumpyBackend()
    w = upload(model, be)
    return forward(model.config, w, be, np.concatenate(seqs), Batch.from_lengths([len(s) for s in seqs]), **kw)


def split(x: np.ndarray, seqs) -> list[np.ndarray]:
    return np.split(x, np.cumsum([len(s) for s in seqs])[:-1])


# ------------------------------------------------------------------------------------------------
# against the reference


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_float64_reference(arch, models, rng):
    model = models[arch]
    v = model.config.vocab_size
    # Longer than the windows (mistral 16, gemma3 8) and of different lengths in one packed batch.
    seqs = [rng.integers(0, v, n).tolist() for n in (37, 5, 21)]
    ours = split(run(model, seqs), seqs)
    for s, got in zip(seqs, ours):
        ref = reference_logits(model, s)
        err = np.abs(got - ref).max()
        assert err <= 2e-5 * max(1.0, np.abs(ref).max()), f"{arch}: max |dlogit| {err}"
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_qkv_bias_with_qk_norm_adds_before_the_norm(models, rng):
    """A model with both q/k biases and QK-norm (no listed architecture has both): the biases go
    in before the norm (as the reference does), not into RoPE after it; the norms matter here."""
    model = models["qwen2"]
    c = model.config
    tensors = dict(model.tensors)
    for i in range(c.n_layers):
        for s in "qk":
            tensors[f"blk.{i}.attn_{s}_norm.weight"] = _f32_tensor(f"blk.{i}.attn_{s}_norm.weight",
                                                                   rng.uniform(0.5, 1.5, c.head_dim))
    both = dataclasses.replace(model, config=dataclasses.replace(c, qk_norm=True), tensors=tensors)
    ids = rng.integers(0, c.vocab_size, 19).tolist()
    ref = reference_logits(both, ids)
    got = run(both, [ids])
    assert np.abs(got - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max())
    assert np.abs(run(model, [ids]) - ref).max() > 1e-3  # without the norms: another result


def test_qkv_stacked_by_type(models, rng):
    """q, k and v neighbours of one type are one matrix whose rows are the stored rows, one after
    another: one product where they share a type. (Layer 0 of each synthetic model has an extra type
    among them, so every split below occurs; the forward over them matches the reference above.)"""
    seen = set()
    for arch, model in models.items():
        w = upload(model, NumpyBackend())
        for i, lw in enumerate(w.layers):
            ts = [model.tensors[f"blk.{i}.attn_{x}.weight"] for x in "qkv"]
            runs = [1]
            for a, b in zip(ts, ts[1:]):
                runs[-1:] = [runs[-1] + 1] if a.dtype == b.dtype else [runs[-1], 1]
            assert lw.qkv_split == tuple(runs), (arch, i)
            seen.add(lw.qkv_split)
            stacked = np.concatenate([dequantize(m.data, m.dtype, m.shape) for m in lw.qkv])
            assert np.array_equal(stacked, np.concatenate([dequantize(t.data, t.dtype, t.shape) for t in ts]))
    assert seen == {(3,), (2, 1), (1, 2), (1, 1, 1)}


def test_qkv_rope_is_add_norm_rope_on_views(rng):
    """The NumPy oracle of qkv_rope: biases added in fp32, then QK-norm, then RoPE, on column
    slices of one stacked product as on contiguous arrays; v only gets its bias."""
    be = NumpyBackend()
    n, hq, hkv, d = 7, 4, 2, 16
    y = rng.standard_normal((n, (hq + 2 * hkv) * d)).astype(np.float32)
    views = (y[:, : hq * d].reshape(n, hq, d), y[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d),
             y[:, (hq + hkv) * d:].reshape(n, hkv, d))
    dense = [np.ascontiguousarray(x) for x in views]
    bias = tuple(rng.standard_normal(h * d).astype(np.float32) for h in (hq, hkv, hkv))
    norm = tuple(rng.uniform(0.5, 1.5, d).astype(np.float32) for _ in range(2))
    batch = Batch.from_lengths([4, 3], np.array([10, 0]))
    for neox in (True, False):
        got = be.qkv_rope(*views, batch, 1e4, neox, 0.5, None, bias=bias, norm=norm, eps=1e-6)
        assert all(g.flags.c_contiguous and g.dtype == np.float32 for g in got)
        xs = [be.add(x, b.reshape(x.shape[1:])) for x, b in zip(dense, bias)]
        for i in range(2):
            want = be.rope(be.rmsnorm(xs[i], norm[i], 1e-6), batch, 1e4, neox, 0.5, None)
            assert np.array_equal(got[i], want)
        assert np.array_equal(got[2], xs[2])
        plain = be.qkv_rope(*views, batch, 1e4, neox, 0.5, None)
        assert np.array_equal(plain[0], be.rope(dense[0], batch, 1e4, neox, 0.5, None))
        assert np.array_equal(plain[2], dense[2])


def test_switches_change_the_result(models, rng):
    """The reference really depends on the switches set by with_switches (so matching it proves
    the forward honours them)."""
    for arch in ("llama", "gemma3"):
        model = models[arch]
        plain = dataclasses.replace(
            model,
            tensors={k: t for k, t in model.tensors.items() if k != "rope_freqs.weight"},
            config=dataclasses.replace(model.config, rope_scale=1.0, attn_scale=None,
                                       rope_theta_local=ARCH_DEFAULTS[arch].rope_theta_local))
        ids = rng.integers(0, model.config.vocab_size, 30).tolist()
        assert np.abs(reference_logits(model, ids) - reference_logits(plain, ids)).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# batching, last position, KV cache


@pytest.mark.parametrize("arch", ("qwen2", "gemma3"))
def test_sequence_alone_equals_inside_batch(arch, models, rng):
    model = models[arch]
    v = model.config.vocab_size
    short = rng.integers(0, v, 6).tolist()
    alone = run(model, [short])
    neighbours = [rng.integers(0, v, n).tolist() for n in (40, 19)]
    batched = split(run(model, [neighbours[0], short, neighbours[1]]), [neighbours[0], short, neighbours[1]])
    assert np.array_equal(alone, batched[1])


def test_last_only_runs_head_on_last_rows(models, rng):
    head_rows = []

    class Counting(NumpyBackend):
        def lm_head(self, x, w, dtype=np.float32):
            head_rows.append(x.shape[0])
            return super().lm_head(x, w, dtype)

    model = models["llama"]
    seqs = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (9, 1, 30)]
    last = run(model, seqs, Counting(), last_only=True)
    full = run(model, seqs, Counting())
    assert head_rows == [3, 40]
    assert last.shape == (3, model.config.vocab_size)
    assert np.array_equal(last, full[np.cumsum([len(s) for s in seqs]) - 1])


def test_float16_logits(models, rng):
    model = models["qwen3"]
    seqs = [rng.integers(0, model.config.vocab_size, 7).tolist()]
    x16, x32 = run(model, seqs, dtype=np.float16), run(model, seqs)
    assert x16.dtype == np.float16
    assert np.array_equal(x16, x32.astype(np.float16))


@pytest.mark.parametrize("arch", ("mistral", "gemma3", "qwen2"))
def test_prefill_then_decode_equals_full_forward(arch, models, rng):
    model = models[arch]
    c = model.config
    be = NumpyBackend()
    w = upload(model, be)
    # Sequence 0 runs past the sliding window; sequence 1 stops earlier (then only slot 0 goes on).
    seqs = [rng.integers(0, c.vocab_size, 26).tolist(), rng.integers(0, c.vocab_size, 11).tolist()]
    full = [forward(c, w, be, np.array(s), Batch.from_lengths([len(s)])) for s in seqs]
    cache = be.new_cache(c.n_layers, 2, 32, c.n_kv_heads, c.head_dim)

    def step(chunks: list[list[int]], past: list[int]) -> list[np.ndarray]:
        b = Batch.from_lengths([len(x) for x in chunks], np.array(past))
        return split(forward(c, w, be, np.concatenate(chunks), b, cache=cache), chunks)

    got = [[], []]
    pos = [5, 2]  # prefill of different lengths
    for b, out in enumerate(step([seqs[0][:5], seqs[1][:2]], [0, 0])):
        got[b].append(out)
    # Three tokens at once for both, then one token per step.
    for b, out in enumerate(step([seqs[0][5:8], seqs[1][2:5]], pos)):
        got[b].append(out)
    pos = [8, 5]
    while pos[0] < len(seqs[0]):
        live = [b for b in (0, 1) if pos[b] < len(seqs[b])]
        outs = step([[seqs[b][pos[b]]] for b in live], [pos[b] for b in live])
        for b, out in zip(live, outs):
            got[b].append(out)
            pos[b] += 1
    for b in (0, 1):
        stepwise = np.concatenate(got[b])
        assert stepwise.shape == full[b].shape
        assert np.abs(stepwise - full[b]).max() <= 1e-5 * max(1.0, np.abs(full[b]).max())


def test_cache_overflow_is_an_input_error(models):
    from q4k_engine.errors import InputError

    model = models["llama"]
    c = model.config
    be = NumpyBackend()
    w = upload(model, be)
    cache = be.new_cache(c.n_layers, 1, 4, c.n_kv_heads, c.head_dim)
    with pytest.raises(InputError, match="exceed the KV cache"):
        forward(c, w, be, np.arange(5), Batch.from_lengths([5]), cache=cache)


# ------------------------------------------------------------------------------------------------
# backend operations


def test_matmul_tiles_and_embed_rows(models, rng, monkeypatch):
    t = models["gemma3"].tensors["token_embd.weight"]  # Q8_0 [vocab, hidden]
    dense = dequantize(t.data, t.dtype, t.shape).astype(np.float64)
    x = rng.standard_normal((3, t.cols)).astype(np.float32)
    monkeypatch.setattr(backend_cpu, "TILE_VALUES", 7 * t.cols + 5)  # many tiles, a partial last one
    got = NumpyBackend().matmul(x, t)
    assert np.abs(got - x.astype(np.float64) @ dense.T).max() < 1e-5
    ids = rng.integers(0, t.rows, 50)
    assert np.array_equal(NumpyBackend().embed(t, ids), dense[ids].astype(np.float32))


def test_rope_norm_is_neox_on_interleaved_pairs(rng):
    be = NumpyBackend()
    n, heads, d = 7, 3, 16
    x = rng.standard_normal((n, heads, d)).astype(np.float32)
    batch = Batch.from_lengths([4, 3], np.array([10, 0]))
    ff = rng.uniform(1, 4, d // 2)
    perm = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])  # interleaved -> halves
    norm = be.rope(x, batch, 1e4, False, 0.5, ff)
    neox = be.rope(x[..., perm], batch, 1e4, True, 0.5, ff)
    assert np.abs(norm[..., perm] - neox).max() < 1e-6
    # position 0 is the identity; norms are preserved
    assert np.allclose(be.rope(x, Batch.from_lengths([n]), 1e4, True, 1.0, None)[0], x[0], atol=1e-7)
    assert np.allclose(np.linalg.norm(norm, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_topk_and_log_softmax(rng):
    be = NumpyBackend()
    x = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, -1.0, 5.0, 5.0, 4.0]], np.float32)
    vals, idx = be.topk(x, 4)
    assert idx.tolist() == [[1, 2, 4, 3], [2, 3, 4, 0]]
    assert vals.tolist() == [[3, 3, 3, 2], [5, 5, 4, 0]]
    y = rng.standard_normal((4, 1000)).astype(np.float32) * 10
    ls = be.log_softmax(y, temperature=2.0)
    assert np.allclose(np.log(np.exp(ls.astype(np.float64)).sum(-1)), 0.0, atol=1e-6)
    ref = y / 2.0 - np.log(np.exp(y.astype(np.float64) / 2.0).sum(-1, keepdims=True))
    assert np.abs(ls - ref).max() < 1e-5
    v, i = be.topk(y, 10)
    order = np.argsort(-y, axis=-1, kind="stable")[:, :10]
    assert np.array_equal(i, order) and np.array_equal(v, np.take_along_axis(y, order, -1))


def test_glu_and_rmsnorm(rng):
    be = NumpyBackend()
    g, u = rng.standard_normal((2, 5, 33)).astype(np.float32)
    g64 = g.astype(np.float64)
    assert np.allclose(be.glu(g, u, "silu"), g64 / (1 + np.exp(-g64)) * u, atol=1e-6)
    gelu = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3)))
    assert np.allclose(be.glu(g, u, "gelu_tanh"), gelu * u, atol=1e-6)
    w = rng.standard_normal(33).astype(np.float32)
    h, y = be.add_rmsnorm(g, u, w, 1e-6)
    s = g64 + u
    assert np.array_equal(h, g + u)
    assert np.allclose(y, s / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-6) * w, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# upload errors


def test_upload_names_missing_and_misshapen_tensors(models):
    model = models["qwen2"]
    gone = dataclasses.replace(model, tensors={k: t for k, t in model.tensors.items() if k != "blk.1.attn_k.bias"})
    with pytest.raises(FormatError, match=r"blk\.1\.attn_k\.bias is missing"):
        upload(gone, NumpyBackend())
    t = model.tensors["blk.0.ffn_norm.weight"]
    short = _f32_tensor("blk.0.ffn_norm.weight", np.ones(t.shape[0] - 1))
    bad = dataclasses.replace(model, tensors=model.tensors | {"blk.0.ffn_norm.weight": short})
    with pytest.raises(FormatError, match=r"blk\.0\.ffn_norm\.weight: shape"):
        upload(bad, NumpyBackend())
