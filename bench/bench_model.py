"""GPU benchmarks of the whole teacher and of the small ops, at Qwen2-7B shapes (needs a CUDA GPU).

    python bench/bench_model.py ops      # decode attention (single vs split-K), norms, RoPE, GLU, log-softmax, top-k
    python bench/bench_model.py model    # the 7B: peak memory, prefill vs a dense fp16 forward and HF
    python bench/bench_model.py profile  # the 7B: GPU time per operation of one 4x512 forward
    python bench/bench_model.py finite   # the 7B: what the provider's NaN/Inf check adds to a 4x512 forward

Prefill attention has its own benchmark against torch SDPA (bench/bench_attention.py); decode, with
CUDA graphs, is bench/bench_decode.py. Op figures are medians of CUDA-event timings after a warm-up.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_7b beside this file


def median_ms(fn, reps: int = 10) -> float:
    import cupy as cp

    fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def graph_ms(be, fn, calls: int = 20) -> float:
    """Median GPU ms of one fn() replayed from a CUDA graph (be.capture) of `calls` back-to-back
    calls, as a decode step runs it: eager timings of a few-µs kernel measure Python's launch
    overhead, not the GPU."""
    fn()  # compiles before the capture

    def many() -> None:
        for _ in range(calls):
            fn()

    graph = be.capture(many)
    return median_ms(graph.launch) / calls


def bench_decode_attention(be, rows: list) -> None:
    """Decode attention at the 7B's heads (28 q / 4 kv, head dim 128) in a CUDA graph: the
    kernel before split-K (one block per query head, "single") and split-K, same inputs, same run."""
    import cupy as cp

    from q4k_engine.kernels import ops

    rng = cp.random.default_rng(0)
    hq, hkv, d = 28, 4, 128
    for batch, ctx in ((1, 32), (1, 576), (1, 2048), (8, 576)):
        # slot b of a cache of ctx + 1 rows per sequence; the new token at position ctx
        k = rng.standard_normal((batch * (ctx + 1), hkv, d), dtype=cp.float32)
        v = rng.standard_normal((batch * (ctx + 1), hkv, d), dtype=cp.float32)
        q = rng.standard_normal((batch, hq, d), dtype=cp.float32)
        lay = ops.SeqLayout.build(np.arange(batch), np.ones(batch), np.full(batch, ctx),
                                  np.arange(batch) * (ctx + 1), np.full(batch, ctx + 1))
        out = cp.empty_like(q)
        ms = {kind: graph_ms(be, lambda: ops.attention(q, k, v, lay, d ** -0.5, 0, out=out, decode=kind))
              for kind in ops.DECODE_KERNELS}
        for kind in ("single", "split"):
            gbs = 2 * k.nbytes / ms[kind] / 1e6
            gain = f", {ms['single'] / ms['split']:.2f}x the single kernel" if kind == "split" else ""
            rows.append((f"decode attn b={batch} ctx={ctx} {kind}", ms[kind], f"{gbs:.0f} GB/s of K+V{gain}"))


def bench_ops() -> None:
    import cupy as cp

    from q4k_engine.kernels import ops

    from q4k_engine.backend_cuda import CudaBackend

    be = CudaBackend()  # for its CUDA-graph capture
    rng = cp.random.default_rng(0)
    rows = []
    bench_decode_attention(be, rows)
    h = rng.standard_normal((2048, 3584), dtype=cp.float32)
    r = rng.standard_normal((2048, 3584), dtype=cp.float32)
    w = rng.standard_normal(3584, dtype=cp.float32)
    ms = median_ms(lambda: ops.add_rmsnorm(h, r, w, 1e-6))
    rows.append(("add_rmsnorm 2048x3584", ms, f"{4 * h.nbytes / ms / 1e6:.0f} GB/s"))
    x = rng.standard_normal((2048, 28, 128), dtype=cp.float32)
    pos = cp.arange(2048, dtype=cp.int32)
    ms = median_ms(lambda: ops.rope(x, pos, 1e6, True))
    rows.append(("rope 2048x28x128", ms, f"{2 * x.nbytes / ms / 1e6:.0f} GB/s"))
    # a decode step's q: the bias add fused into RoPE against add + rope, in a graph
    xq, bq, p1 = x[:1], rng.standard_normal(28 * 128, dtype=cp.float32), pos[:1]
    before = graph_ms(be, lambda: ops.rope(xq + bq.reshape(28, 128), p1, 1e6, True))
    ms = graph_ms(be, lambda: ops.rope(xq, p1, 1e6, True, bias=bq))
    rows.append(("q bias + rope 1x28x128, add + rope", before, ""))
    rows.append(("q bias + rope 1x28x128, fused", ms, f"{before / ms:.2f}x"))
    g = rng.standard_normal((2048, 18944), dtype=cp.float32)
    ms = median_ms(lambda: ops.glu(g, g, "silu"))
    rows.append(("glu 2048x18944", ms, f"{3 * g.nbytes / ms / 1e6:.0f} GB/s"))
    lg = rng.standard_normal((512, 152064), dtype=cp.float32)
    ms = median_ms(lambda: ops.topk(lg, 20))
    rows.append(("topk k=20 512x152064", ms, ""))
    ms = median_ms(lambda: ops.log_softmax(lg))
    rows.append(("log_softmax 512x152064", ms, f"{2 * lg.nbytes / ms / 1e6:.0f} GB/s"))
    # the provider's top-64 + tail of one LM-head chunk: before (log_softmax, k-pass topk, scatter,
    # logsumexp of the rest) and the one fused kernel; bytes = the chunk read once
    ch = rng.standard_normal((441, 152064), dtype=cp.float32) * 4

    def composed():
        y = ops.log_softmax(ch)
        _, idx = ops.topk(y, 64)
        y[cp.arange(y.shape[0])[:, None], idx] = -np.inf
        return ops.logsumexp(y)

    before = median_ms(composed)
    ms = median_ms(lambda: ops.topk_logprobs(ch, 64, 1.0, True))
    rows.append(("top-64+tail 441x152064, composed", before, f"{ch.nbytes / before / 1e6:.0f} GB/s"))
    rows.append(("top-64+tail 441x152064, fused", ms, f"{ch.nbytes / ms / 1e6:.0f} GB/s, {before / ms:.1f}x"))
    print(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    for name, ms, extra in rows:
        print(f"{name:34s} {ms:9.4f} ms  {extra}")


def wall_ms(fn, reps: int = 3) -> float:
    """Median wall-clock ms of fn() with the device synchronized around it (whole forwards)."""
    import time

    import cupy as cp

    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    import cupy as cp

    a = cp.ones(1 << 30, cp.uint8)
    b = cp.empty_like(a)
    ms = median_ms(lambda: b.__setitem__(Ellipsis, a), reps=10)
    return 2 * a.nbytes / (ms / 1e3)


def dense_backend_class():
    """The dense fp16 peer: the same forward with every matrix dequantized once to fp16."""
    import cupy as cp

    from q4k_engine.backend_cuda import CudaBackend
    from q4k_engine.kernels import matmul as mm

    class DenseF16Backend(CudaBackend):
        name = "cuda-dense-f16"

        def __init__(self):
            super().__init__()
            self.dense: dict[str, object] = {}  # by tensor name, for building the HF peer

        def weight(self, t):
            q = super().weight(t)
            out = cp.empty((q.rows, q.kpad), cp.float16)
            chunk = max(1, (256 << 20) // (q.kpad * 2))
            for r0 in range(0, q.rows, chunk):
                n = min(chunk, q.rows - r0)
                mm.dequantize_rows_f16(q, r0, n, out[r0:r0 + n])
            dense = out if q.kpad == q.cols else cp.ascontiguousarray(out[:, :q.cols])
            self.dense[t.name] = dense
            return dense

        def vector(self, t):
            v = super().vector(t)
            self.dense[t.name] = v
            return v

        def embed(self, w, ids):
            return w[cp.asarray(ids)].astype(cp.float32)

        def matmul(self, x, w):
            return cp.matmul(x.astype(cp.float16), w.T).astype(cp.float32)

        def glu_matmul(self, x, gate, up, act):
            g = self.matmul(x, gate)
            return self._ops.glu(g, self.matmul(x, up), act, out=g)

        def lm_head(self, x, w, dtype=np.float32):
            return cp.matmul(x.astype(cp.float16), w.T).astype(dtype, copy=False)

    return DenseF16Backend


def build_hf_qwen2(cfg, dense: dict):
    """Hugging Face Qwen2ForCausalLM in bf16 on the GPU holding the dense peer's weights
    (built directly, no GGUF round trip; GGUF qwen2 rows are already in HF's NEOX order)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from q4k_engine.config import expected_shapes
    from q4k_engine.forward import stacked_parts

    hc = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=32768,
                     rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps, tie_word_embeddings=False,
                     attn_implementation="sdpa")
    if isinstance(getattr(hc, "rope_parameters", None), dict):
        hc.rope_parameters["rope_theta"] = cfg.rope_theta
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(hc)
    finally:
        torch.set_default_dtype(torch.float32)
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(cfg.n_layers):
        names.update({f"model.layers.{i}.{k}": f"blk.{i}.{v}" for k, v in per_layer.items()})
    # q, k and v of one type are one stacked matrix "q+k+v" (forward._stack_rows): their row ranges
    shapes = expected_shapes(cfg)
    for key, m in list(dense.items()):
        r0 = 0
        parts = stacked_parts(key)
        for part in parts if len(parts) > 1 else ():
            n = shapes[part][0][0]
            dense[part], r0 = m[r0:r0 + n], r0 + n
    with torch.no_grad():
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(names))
        if missing:
            raise RuntimeError(f"HF parameters without a source: {missing[:5]}")
        for hf, ours in names.items():
            params[hf].copy_(torch.from_dlpack(dense[ours]).reshape(params[hf].shape).to(torch.bfloat16))
    return model.eval()


def bench_model(path: str | None) -> None:
    import gc

    import cupy as cp

    from q4k_engine.backend import Batch
    from q4k_engine.backend_cuda import CudaBackend
    from q4k_engine.distill.stats import compare_logits
    from q4k_engine.forward import forward, upload
    from q4k_engine.loader import open_model

    import make_7b

    card = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    path = make_7b.ensure_7b(path)
    model = open_model(path)
    cfg = model.config
    rng = np.random.default_rng(0)
    report: list[str] = [f"card: {card}; model: {path} ({cfg.n_layers} layers, hidden {cfg.hidden})"]

    be = CudaBackend()
    be.check_model(model)
    w = upload(model, be)
    report.append(str(be.upload))

    def run(engine_be, weights, lengths, last_only=False, dtype=np.float16):
        batch = Batch.from_lengths(lengths)
        ids = rng.integers(0, cfg.vocab_size, batch.n_tokens).astype(np.int32)
        return forward(cfg, weights, engine_be, ids, batch, last_only=last_only, dtype=dtype)

    # --- memory: one sequence of 2048 tokens ---
    for last_only, target in ((False, 6.0), (True, 5.2)):
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()
        be.reset_peak()
        out = run(be, w, [2048], last_only=last_only)
        cp.cuda.Device().synchronize()
        m = be.memory_report()
        report.append(f"memory 1x2048 {'last' if last_only else 'all-position'} fp16 logits {out.shape}: "
                      f"process peak {m.process_peak / 1e9:.2f} GB of device memory, now "
                      f"{m.process_used / 1e9:.2f} GB (context, cuBLAS, pool"
                      f"{'' if m.context_counted else '; context not counted: no NVML'}), pool peak held "
                      f"{m.pool_peak_held / 1e9:.2f} GB (arrays {m.pool_peak_used / 1e9:.2f} GB), "
                      f"device used {m.device_used / 1e9:.2f} GB; target <= {target} GB (GB = 1e9 bytes)")
        del out

    # --- prefill throughput, all-position fp16 logits: the default dispatch, and the dequantize +
    # cuBLAS path at every M > GEMV_MAX_M (what ran before the fused GEMM), alternated shape by shape
    # over two rounds (the first forwards of a process run slower), the better round of each ---
    from q4k_engine.kernels import matmul as mm

    shapes = ([128], [512], [512] * 4, [2048], [2048] * 8)
    limit = mm.FUSED_MAX_M
    ours, ours_cublas = {}, {}
    try:
        for _ in range(2):
            for lengths in shapes:
                key = len(lengths), lengths[0]
                for store, mm.FUSED_MAX_M in ((ours, limit), (ours_cublas, mm.GEMV_MAX_M)):
                    tps = sum(lengths) / wall_ms(lambda: run(be, w, lengths)) * 1e3
                    store[key] = max(store.get(key, 0.0), tps)
    finally:
        mm.FUSED_MAX_M = limit

    # --- the same forwards replayed from CUDA graphs (ForwardGraphs: what the API does for recurring
    # shapes up to GRAPH_MAX_TOKENS tokens), the LM head eager as in the provider ---
    from q4k_engine.forward import GRAPH_MAX_TOKENS, ForwardGraphs

    graphs, replayed = ForwardGraphs(cfg, w, be), {}
    for _ in range(2):
        for lengths in (s for s in shapes if sum(s) <= GRAPH_MAX_TOKENS):
            gids = rng.integers(0, cfg.vocab_size, sum(lengths)).astype(np.int32)
            tps = sum(lengths) / wall_ms(lambda: be.lm_head(graphs.hidden(gids, lengths), w.output, np.float16)) * 1e3
            key = len(lengths), lengths[0]
            replayed[key] = max(replayed.get(key, 0.0), tps)
    graph_pools = graphs.pool_bytes()
    del graphs

    del w, be
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()

    # --- peer (a): dense fp16 forward ---
    Dense = dense_backend_class()
    dbe = Dense()
    dw = upload(model, dbe)
    dense = {}
    for lengths in shapes:
        ms = wall_ms(lambda: run(dbe, dw, lengths))
        dense[len(lengths), lengths[0]] = sum(lengths) / ms * 1e3
    check_ids = rng.integers(0, cfg.vocab_size, 256).astype(np.int32)
    dense_logits = cp.asnumpy(forward(cfg, dw, dbe, check_ids, Batch.from_lengths([256]))).astype(np.float32)

    # --- peer (b): Hugging Face transformers, bf16, built from the dense weights ---
    hf = {}
    hf_note = ""
    try:
        import torch

        hfm = build_hf_qwen2(cfg, dbe.dense)
        del dw, dbe
        gc.collect()
        cp.get_default_memory_pool().free_all_blocks()
        with torch.inference_mode():
            hf_logits = hfm(torch.from_numpy(check_ids[None].astype(np.int64)).cuda()).logits[0].float().cpu().numpy()
            r = compare_logits(dense_logits, hf_logits)
            agree, kl = r.same_top_p, r.kld.mean
            # A random 7B has nearly flat next-token distributions, so bf16 rounding flips many
            # near-tied top-1s; the KL says whether HF computes the same model.
            hf_note = (f"HF bf16 (SDPA) vs engine dense-f16 on 256 tokens: mean KL {kl:.2e}, "
                       f"top-1 agreement {agree:.3f}, logit std {dense_logits.std():.3f}")
            for lengths in shapes:
                ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (len(lengths), lengths[0]))).cuda()

                def hf_run():
                    hfm(ids).logits
                    torch.cuda.synchronize()

                ms = wall_ms(hf_run)
                hf[len(lengths), lengths[0]] = sum(lengths) / ms * 1e3
        del hfm
    except Exception as e:  # a peer that cannot run is reported, not fatal
        hf_note = f"HF peer failed: {type(e).__name__}: {e}"

    report.append(hf_note)
    report.append(f"prefill, all-position fp16 logits (tokens/s, the better of two rounds; default dispatch: "
                  f"fused GEMM for {mm.GEMV_MAX_M} < M <= {limit}, dequantize + cuBLAS above; 'cuBLAS path' "
                  f"= the latter at every M > {mm.GEMV_MAX_M}):")
    report.append(f"  {'shape':10s} {'q4k-engine':>11s} {'ms':>8s} {'cuBLAS path':>12s} {'dense fp16':>11s} {'ratio':>6s} "
                  f"{'HF bf16':>9s} {'ratio':>6s}")
    for key in ours:
        h = hf.get(key)
        report.append(f"  {key[0]}x{key[1]:<8d} {ours[key]:11.0f} {key[0] * key[1] / ours[key] * 1e3:8.2f} "
                      f"{ours_cublas[key]:12.0f} {dense[key]:11.0f} {ours[key] / dense[key]:6.2f} "
                      f"{h if h else float('nan'):9.0f} {ours[key] / h if h else float('nan'):6.2f}")
    report.append("the same, replayed from CUDA graphs (forward.ForwardGraphs; tokens/s, ms, / eager, / HF bf16): " + "; ".join(
        f"{k[0]}x{k[1]} {v:.0f}, {k[0] * k[1] / v * 1e3:.2f} ms, {v / ours[k]:.2f}x, {v / hf[k] if hf.get(k) else float('nan'):.2f}"
        for k, v in replayed.items()) + f"; the graphs' private pools hold {graph_pools / 1e6:.0f} MB")
    report.append("decode: bench/bench_decode.py (CUDA graphs, against the bandwidth floor of the same run)")
    print("\n".join(report))


class TimedBackend:
    """A backend seen through CUDA events: every operation the forward calls is bracketed by two
    events on the current stream, so one forward yields GPU time per operation (matmuls by weight
    shape). The events add a few microseconds per call; the wall time is reported beside the sum."""

    OPS = ("embed", "matmul", "glu_matmul", "add", "scale", "rmsnorm", "add_rmsnorm", "rope", "attention",
           "lm_head")

    def __init__(self, be):
        self._be, self.calls = be, []

    def __getattr__(self, name):
        fn = getattr(self._be, name)
        if name not in self.OPS:
            return fn

        def timed(*args, **kwargs):
            import cupy as cp

            label = name
            if name in ("matmul", "glu_matmul", "lm_head"):
                w = args[1]
                label = f"{name} {w.rows}x{w.cols} {w.dtype.name} M={args[0].shape[0]}"
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.calls.append((label, start, end))
            return out

        return timed

    def table(self) -> list[tuple[str, int, float]]:
        """(label, calls, total GPU ms), largest first."""
        import cupy as cp

        cp.cuda.Device().synchronize()
        acc: dict[str, list] = {}
        for label, start, end in self.calls:
            a = acc.setdefault(label, [0, 0.0])
            a[0] += 1
            a[1] += cp.cuda.get_elapsed_time(start, end)
        return sorted(((k, c, ms) for k, (c, ms) in acc.items()), key=lambda r: -r[2])


def profile(path: str | None, lengths: list[int], decode: bool = False, precision: str = "fp16") -> None:
    """GPU time per operation of one all-position fp16 forward of the 7B (after a warm-up), or with
    `decode` of one decode step (batch len(lengths)) after prefilling `lengths` into a KV cache;
    `precision` is the backend's (fp16, or fp8: engine/fp8.py)."""
    from q4k_engine.backend import Batch
    from q4k_engine.backend_cuda import CudaBackend
    from q4k_engine.forward import forward, upload
    from q4k_engine.loader import open_model

    import make_7b

    model = open_model(make_7b.ensure_7b(path))
    cfg = model.config
    be = CudaBackend(precision=precision)
    w = upload(model, be)
    rng = np.random.default_rng(0)
    batch = Batch.from_lengths(lengths)
    ids = rng.integers(0, cfg.vocab_size, batch.n_tokens).astype(np.int32)
    cache = None
    if decode:
        cache = be.new_cache(cfg.n_layers, len(lengths), max(lengths) + 1, cfg.n_kv_heads, cfg.head_dim)
        forward(cfg, w, be, ids, batch, cache=cache, last_only=True)
        batch = Batch.from_lengths(np.ones(len(lengths), np.int64), past_lens=lengths)
        ids = rng.integers(0, cfg.vocab_size, len(lengths)).astype(np.int32)
    # a decode step re-run writes the same cache rows again: harmless for timing
    ms = wall_ms(lambda: forward(cfg, w, be, ids, batch, cache=cache, dtype=np.float16))
    tb = TimedBackend(be)
    forward(cfg, w, tb, ids, batch, cache=cache, dtype=np.float16)
    rows = tb.table()
    total = sum(r[2] for r in rows)
    what = f"decode step of {len(lengths)} after {lengths[0]}" if decode else f"{len(lengths)}x{lengths[0]} forward"
    print(f"profile, {what}, precision {precision}, on {be.device_name}: wall {ms:.2f} ms (eager); sum of op GPU times "
          f"{total:.2f} ms (events included)")
    print("| op | calls | GPU ms | share |\n|---|---|---|---|")
    for label, calls, t in rows:
        print(f"| {label} | {calls} | {t:.3f} | {t / total:.1%} |")


def finite_cost(path: str | None, lengths: list[int], reps: int = 9) -> None:
    """Cost of the provider's non-finite check (the backend's all_finite, run on every head chunk's
    logits) against one all-position fp16 forward of the 7B: medians of `reps` wall-clock runs of
    the forward alone and of the forward followed by the check, interleaved so that clock drift
    hits both alike, plus the check alone timed with CUDA events. Target: under 1%."""
    import time

    import cupy as cp

    from q4k_engine.backend import Batch
    from q4k_engine.backend_cuda import CudaBackend
    from q4k_engine.forward import forward, upload
    from q4k_engine.loader import open_model

    import make_7b

    model = open_model(make_7b.ensure_7b(path))
    cfg = model.config
    be = CudaBackend()
    be.check_model(model)
    w = upload(model, be)
    batch = Batch.from_lengths(lengths)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, batch.n_tokens).astype(np.int32)

    def plain():
        forward(cfg, w, be, ids, batch, dtype=np.float16)
        cp.cuda.Device().synchronize()

    def checked():
        if not be.all_finite(forward(cfg, w, be, ids, batch, dtype=np.float16)):  # reads back one bool: a sync
            raise RuntimeError("the 7B's logits are not finite")

    times: dict[str, list[float]] = {"plain": [], "checked": []}
    plain()  # warm-up: kernels compiled, pool grown
    checked()
    for _ in range(reps):
        for name, fn in (("plain", plain), ("checked", checked)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    base, with_check = (float(np.median(times[k])) for k in ("plain", "checked"))
    logits = forward(cfg, w, be, ids, batch, dtype=np.float16)
    alone = median_ms(lambda: be.all_finite(logits), reps=20)
    shape = f"{len(lengths)}x{lengths[0]}"
    print(f"finite check, {shape} all-position fp16 logits {list(logits.shape)}, on {be.device_name}:")
    print(f"  forward {base:.2f} ms, forward + check {with_check:.2f} ms (medians of {reps}): "
          f"+{(with_check - base) / base:.2%}")
    print(f"  check alone {alone:.3f} ms (CUDA events, median of 20) = {alone / base:.2%} of the forward; target < 1%")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="q4k-engine GPU benchmarks")
    ap.add_argument("what", choices=("ops", "model", "profile", "finite"))
    ap.add_argument("--lengths", default="512,512,512,512", help="profile, finite: sequence lengths")
    ap.add_argument("--decode", action="store_true", help="profile: one decode step after the lengths")
    ap.add_argument("--model", default=None, help="model file (default: write the synthetic Qwen2-7B to /tmp)")
    ap.add_argument("--precision", choices=("fp16", "fp8"), default="fp16", help="profile: the backend's precision")
    a = ap.parse_args()
    if a.what == "ops":
        bench_ops()
    elif a.what == "profile":
        profile(a.model, [int(t) for t in a.lengths.split(",")], a.decode, a.precision)
    elif a.what == "finite":
        finite_cost(a.model, [int(t) for t in a.lengths.split(",")])
    else:
        bench_model(a.model)


if __name__ == "__main__":
    main()
