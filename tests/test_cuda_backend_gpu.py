"""CudaBackend: KV cache, logits output (chunked LM head, fp16, DLPack to torch), memory reports,
DeviceError, and whole-forward parity against the NumPy reference on synthetic models."""
from __future__ import annotations

import numpy as np
import pytest

from q4k_engine.backend import Batch
from q4k_engine.binio import UNITS, human_bytes
from q4k_engine.distill.stats import compare_logits
from q4k_engine.dtypes import GGMLType
from q4k_engine.errors import DeviceError
from q4k_engine.forward import stacked_parts
from q4k_engine.tensors import QTensor

from conftest import synthetic_kernel_model
from test_ops_gpu import ref_attention, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend():
    from q4k_engine.backend_cuda import CudaBackend

    return CudaBackend()


def f32_tensor(name: str, x: np.ndarray) -> QTensor:
    x = np.ascontiguousarray(x, np.float32)
    return QTensor(name, GGMLType.F32, x.shape, x.view(np.uint8).reshape(-1))


def test_attention_prefill_then_decode_through_cache(backend, rng):
    """Prefill two sequences into a cache, then decode one token each: every step must equal
    attention over the whole sequence so far."""
    cp = backend._cp
    hq, hkv, d, window = 6, 2, 64, 0
    lengths = [37, 5]
    cache = backend.new_cache(n_layers=2, n_seqs=2, max_len=64, n_kv_heads=hkv, head_dim=d)
    seq_q = [[], []]
    seq_k = [[], []]
    seq_v = [[], []]
    past = np.zeros(2, np.int64)
    for step_lengths in (lengths, [1, 1], [1, 1]):
        batch = Batch.from_lengths(step_lengths, past_lens=past)
        n = batch.n_tokens
        q = rng.standard_normal((n, hq, d)).astype(np.float32)
        k = rng.standard_normal((n, hkv, d)).astype(np.float32)
        v = rng.standard_normal((n, hkv, d)).astype(np.float32)
        got = backend.to_numpy(backend.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), batch,
                                                 d ** -0.5, window, cache, layer=1))
        for b, (s, e) in enumerate(zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:])):
            seq_q[b].append(q[s:e]), seq_k[b].append(k[s:e]), seq_v[b].append(v[s:e])
            kk, vv = np.concatenate(seq_k[b]), np.concatenate(seq_v[b])
            ref = ref_attention(q[s:e], kk, vv, past[b] + np.arange(e - s), len(kk), d ** -0.5, window)
            assert rel_err(got[s:e], ref) < 5e-3  # prefill may run on f16 tensor-core operands
        past = past + np.asarray(step_lengths)
    assert float(cp.abs(cache.k[0]).max()) == 0.0, "layer 0 of the cache was written by a layer-1 call"


@pytest.mark.parametrize("n_tokens", [1, 300, 1031])
def test_lm_head_fp16_and_dlpack(backend, rng, n_tokens):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    cp = backend._cp
    vocab, hidden = 5003, 96
    w = backend.weight(f32_tensor("output.weight", rng.standard_normal((vocab, hidden)) * 0.1))
    x = cp.asarray(rng.standard_normal((n_tokens, hidden)).astype(np.float32))
    # float64 product of the same operands: the head takes the GEMV (fp32) or the dequantize +
    # cuBLAS path (f16 operands, f16 output written by cuBLAS itself), so 5e-3 is the f16 bound.
    ref = x.get().astype(np.float64) @ backend.to_numpy(w.data).view(np.float32).reshape(vocab, hidden).T
    for dtype in (np.float32, np.float16):
        logits = backend.lm_head(x, w, dtype=dtype)
        assert logits.dtype == dtype and logits.shape == (n_tokens, vocab)
        assert rel_err(logits.get(), ref) < 5e-3
        t = torch.from_dlpack(logits)
        assert t.data_ptr() == logits.data.ptr, "DLPack made a copy"
        assert t.is_cuda and tuple(t.shape) == logits.shape
        np.testing.assert_array_equal(t.cpu().numpy(), logits.get())


def test_memory_report_tracks_peak(backend):
    cp = backend._cp
    backend.reset_peak()
    before = backend.memory_report()
    a = cp.empty(64 << 20, cp.uint8)
    peak = backend.memory_report()
    assert peak.pool_peak_used >= before.pool_used + a.nbytes
    del a
    assert backend.memory_report().pool_peak_used == peak.pool_peak_used  # a high-water mark
    assert peak.device_used > 0 and peak.device_total >= peak.device_used
    assert "peak" in str(peak)


def test_memory_report_leads_with_the_process(backend):
    """The process's device memory (context, cuBLAS workspace, pool) comes first, in GB only."""
    cp = backend._cp
    x = cp.ones((512, 512), cp.float32)
    (x @ x).sum()  # cuBLAS creates its handle and workspace
    m = backend.memory_report()
    text = str(m)
    print(text)
    assert text.startswith(f"process peak {human_bytes(m.process_peak)} of device memory, now "
                           f"{human_bytes(m.process_used)}")
    assert m.process_peak >= m.process_used
    backend.release_cached()  # the pool's free blocks go back; the peak stays a high-water mark
    after = backend.memory_report()
    assert after.pool_held <= m.pool_held and after.process_peak >= after.process_used
    assert "GiB" not in text and "MiB" not in text and UNITS in text
    assert m.process_used >= m.pool_held  # the pool is part of what the process took
    if m.context_counted:  # measured before the CUDA context existed: it is in the figure
        assert m.process_used >= m.pool_held + 50e6, text
    assert m.device_used >= m.process_used


def test_too_large_model_raises_device_error(backend):
    _, total = backend._cp.cuda.runtime.memGetInfo()
    huge = QTensor("blk.0.ffn_up.weight", GGMLType.F32, (int(total // 4 // 1024) + 1, 1024), np.zeros(0, np.uint8))
    with pytest.raises(DeviceError, match="free"):
        backend.check_fits([huge])
    with pytest.raises(DeviceError, match="ffn_up"):
        backend.weight(huge)


def test_upload_report_counts_bytes(backend, rng):
    before = backend.upload.device_bytes
    t = f32_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 256)))
    backend.weight(t)
    u = backend.upload.tensors[t.name]
    assert (u.dtype, u.stored_bytes, u.device_bytes) == ("F32", t.nbytes, t.nbytes)  # 64 KiB: whole pool units
    assert backend.upload.device_bytes == before + t.nbytes
    assert "uploaded" in str(backend.upload)


POOL_UNIT = 512  # CuPy's pool rounds every allocation up to this


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_weights_resident_in_their_stored_bytes(tmp_path, module_seed, arch):
    """The pool grows by the upload report's device bytes, and every matrix costs its stored bytes
    (plus the pool's rounding): one weight uploaded as f32 would fail this."""
    import q4k_engine
    from q4k_engine.synthetic import write_synthetic

    path = write_synthetic(tmp_path / f"{arch}.gguf", arch, "gguf", seed=module_seed)
    import cupy as cp

    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    teacher = q4k_engine.load(path, device="cuda")
    grown = pool.used_bytes() - before
    up = teacher.backend.upload
    print(up)
    assert up.device_bytes == grown
    # q, k and v of one type are uploaded as one matrix named "q+k+v" (forward._stack_rows)
    stored = {part: name for name in up.tensors for part in stacked_parts(name)}
    assert {t.name for t in teacher.model.tensors.values() if len(t.shape) == 2} <= set(stored)
    assert any(len(stacked_parts(name)) > 1 for name in up.tensors)
    for name, u in up.tensors.items():
        ts = [teacher.model.tensors[part] for part in stacked_parts(name)]
        nbytes = sum(t.nbytes for t in ts)
        if len(ts[0].shape) == 1:  # vectors are held as float32 by design
            assert u.device_bytes == -(-ts[0].shape[0] * 4 // POOL_UNIT) * POOL_UNIT, name
        else:
            assert nbytes <= u.device_bytes < nbytes + POOL_UNIT, (name, ts[0].dtype.name, u)


def test_kernel_limits_refused_before_any_upload(module_seed):
    """head_dim 288 is beyond the attention kernels: one UnsupportedError at load, nothing uploaded."""
    import cupy as cp

    from q4k_engine.backend_cpu import NumpyBackend
    from q4k_engine.backend_cuda import CudaBackend
    from q4k_engine.errors import UnsupportedError
    from q4k_engine.provider import TeacherModel
    from q4k_engine.synthetic import synthetic_model

    model = synthetic_model("llama", seed=module_seed, head_dim=288, n_heads=2, n_kv_heads=1)
    backend = CudaBackend()
    before = cp.get_default_memory_pool().used_bytes()
    with pytest.raises(UnsupportedError, match="head_dim 288 is above the GPU attention kernels' limit"):
        TeacherModel(model, backend)
    assert cp.get_default_memory_pool().used_bytes() == before and backend.upload.n_tensors == 0
    assert TeacherModel(model, NumpyBackend()).logits_for_batch([[1, 2]]).shape == (1, model.config.vocab_size)


# --- whole forward: CUDA vs the NumPy reference on synthetic models of every architecture -------
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


@pytest.fixture(scope="module", params=ARCHS)
def synthetic_model(request, tmp_path_factory):
    return synthetic_kernel_model(tmp_path_factory, request.param)


def test_forward_parity_with_numpy(backend, synthetic_model, rng):
    from q4k_engine.backend_cpu import NumpyBackend
    from q4k_engine.forward import forward, upload

    cfg = synthetic_model.config
    lengths = [1, 7, 65, 130]
    batch = Batch.from_lengths(lengths)
    ids = rng.integers(0, cfg.vocab_size, batch.n_tokens).astype(np.int32)
    cpu = NumpyBackend()
    ref = forward(cfg, upload(synthetic_model, cpu), cpu, ids, batch)
    got = backend.to_numpy(forward(cfg, upload(synthetic_model, backend), backend, ids, batch))
    r = compare_logits(ref, got)
    top1, kl, dmax = r.same_top_p, r.kld.mean, r.max_abs_dlogit
    print(f"{cfg.arch}: top-1 {top1:.4f}, mean KL {kl:.2e}, max |dlogit| {dmax:.2e} over {batch.n_tokens} positions")
    # Random synthetic models have near-tied top logits; f16 GEMM operands move logits by ~1e-3,
    # so top-1 must agree wherever the reference's top-2 margin is clearly above that.
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-2
    assert (ref.argmax(1) == got.argmax(1))[clear].all() and clear.mean() > 0.5
    assert kl <= 1e-4 and dmax < 1e-2


def test_decode_with_cache_matches_full_forward(backend, synthetic_model, rng):
    """Prefill then one-token steps through the KV cache give the full forward's logits; fp16 and
    last-only outputs agree with the float32 all-position ones."""
    from q4k_engine.forward import forward, upload

    cfg = synthetic_model.config
    w = upload(synthetic_model, backend)
    lengths, prefix = [40, 23], [30, 20]
    ids = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lengths]
    full = backend.to_numpy(forward(cfg, w, backend, np.concatenate(ids), Batch.from_lengths(lengths)))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    cache = backend.new_cache(cfg.n_layers, 2, 64, cfg.n_kv_heads, cfg.head_dim)
    step = forward(cfg, w, backend, np.concatenate([a[:p] for a, p in zip(ids, prefix)]),
                   Batch.from_lengths(prefix), cache=cache, last_only=True)
    got = [[backend.to_numpy(step[b])] for b in range(2)]
    for i in range(min(n - p for n, p in zip(lengths, prefix))):  # both sequences step together
        step = forward(cfg, w, backend, np.array([ids[b][prefix[b] + i] for b in range(2)], np.int32),
                       Batch.from_lengths([1, 1], past_lens=[p + i for p in prefix]), cache=cache, last_only=True)
        for b in range(2):
            got[b].append(backend.to_numpy(step[b]))
    for b in range(2):
        rows = full[starts[b] + prefix[b] - 1: starts[b] + prefix[b] - 1 + len(got[b])]
        r = compare_logits(rows, np.stack(got[b]))
        kl, dmax = r.kld.mean, r.max_abs_dlogit
        assert kl <= 1e-5 and dmax < 1e-2, f"sequence {b}: KL {kl}, max |dlogit| {dmax}"
    half = forward(cfg, w, backend, np.concatenate(ids), Batch.from_lengths(lengths), dtype=np.float16)
    assert half.dtype == np.float16
    assert np.abs(backend.to_numpy(half).astype(np.float32) - full).max() <= 2e-3 * np.abs(full).max() + 1e-3
    last = backend.to_numpy(forward(cfg, w, backend, np.concatenate(ids), Batch.from_lengths(lengths), last_only=True))
    # The last-only head runs on 2 rows (fp32 GEMV), the full one on many (f16 GEMM operands).
    assert np.abs(last - full[starts[1:] - 1]).max() <= 2e-3 * np.abs(full).max()


@pytest.mark.parametrize("lengths", [[1], [3, 5], [37], [64, 64], [130], [200, 100, 6]])
def test_forward_graph_replays_the_eager_forward(backend, synthetic_model, rng, lengths):
    """ForwardGraphs on the CUDA backend: the shape's first call runs eagerly, the second captures;
    replays on new ids give the eager forward's hidden states bit for bit (the same kernels on the
    same data), at every path's token counts (GEMV, mmv, the fused GEMMs, cuBLAS)."""
    import warnings

    from q4k_engine.forward import ForwardGraphs, forward, upload

    cfg = synthetic_model.config
    w = upload(synthetic_model, backend)
    graphs = ForwardGraphs(cfg, w, backend)
    batch = Batch.from_lengths(lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that fails warns: not here
        kept = []
        for call in range(4):
            ids = rng.integers(0, cfg.vocab_size, batch.n_tokens).astype(np.int32)
            kept.append((graphs.hidden(ids, lengths), forward(cfg, w, backend, ids, Batch.from_lengths(lengths),
                                                              head=False)))
        # compared after every call: each result is the caller's own, not the buffer later replays rewrite
        for call, (got, ref) in enumerate(kept):
            np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(ref), err_msg=f"call {call}")
    assert list(graphs._graphs) == [tuple(lengths)]
    assert graphs.pool_bytes() > 0  # the captured forward's intermediates live in the graph's own pool
