"""Kernel benchmarks at Qwen2-7B / Llama-3-8B shapes, as ratios to ceilings measured in the same run.

GEMV (M = 1, 8): effective bandwidth (quantized weight + activation + output bytes / time) over the
device-to-device copy bandwidth (bytes read + written); kernel time from CUDA-graph replays (no
Python launch overhead), plus the time of a plain call from Python for reference. Dequantize: the
f16 scratch writer of the cuBLAS path alone (quant bytes read + f16 bytes written over copy
bandwidth). GEMM (M = 16 .. 2048): TFLOP/s over dense fp16 cuBLAS (`cupy.matmul`) on the same
shape, plain calls from Python; the gated MLP's gate/up pair the same way. Times: CUDA events after warm-up, medians. Weights (and scratches)
are rotated over enough copies to exceed the L2 cache, so GEMV and dequantize times are DRAM times.

    python bench/bench_kernels.py [--quick] [--parts dequant,gemm,gemv,small] [--out RESULTS_PART.md]
"""
from __future__ import annotations

import argparse
import datetime
import statistics

SHAPES = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944), (152064, 3584),
          (4096, 4096), (14336, 4096), (4096, 14336)]
GEMV_M = (1, 8)
GEMM_M = (16, 64, 128, 256, 512, 1024, 2048)
# Decode's M: which path each of 1..8 tokens should take, on the 7B's matrices of one step (the
# gate/up pair apart, in bench_small).
SMALL_M = (1, 2, 3, 4, 6, 8)
SMALL_SHAPES = [(512, 3584), (3584, 3584), (3584, 18944), (152064, 3584)]
PARTS = ("dequant", "gemm", "gemv", "small")  # in the order they run


def time_ms(fn, min_sample_ms: float = 2.0, samples: int = 15) -> float:
    """Median per-call time of fn() in ms: events around batches of calls long enough to time."""
    import cupy as cp

    for _ in range(3):
        fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(cp.cuda.get_elapsed_time(start, end), 1e-3)
    inner = max(1, int(min_sample_ms / once))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / inner)
    return statistics.median(times)


def graph_time_ms(fn, calls: int, samples: int = 15) -> float:
    """Median per-call device time of fn() with launch overhead removed: `calls` calls captured
    in one CUDA graph, the graph replayed and timed with events (fn must not allocate)."""
    import cupy as cp

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        fn()  # compile and load outside the capture
        stream.begin_capture()
        for _ in range(calls):
            fn()
        graph = stream.end_capture()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        graph.launch(stream)
        times = []
        for _ in range(samples):
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / calls)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second."""
    import cupy as cp

    src = cp.random.randint(0, 255, 1 << 30, dtype=cp.uint8)
    dst = cp.empty_like(src)
    t = time_ms(lambda: cp.copyto(dst, src), min_sample_ms=20, samples=9)
    return 2 * src.nbytes / (t * 1e-3)


def random_qweight(dtype, rows: int, cols: int):
    """A random GpuWeight made on the GPU (random quants, sane f16 scales)."""
    import cupy as cp

    from q4k_engine.dtypes import TYPE_INFO, GGMLType, tensor_bytes
    from q4k_engine.kernels.matmul import prepare_weight

    info = TYPE_INFO[dtype]
    raw = cp.random.randint(0, 256, tensor_bytes(dtype, (rows, cols)), dtype=cp.uint8)
    blocks = raw.reshape(-1, info.type_size)
    offsets = {GGMLType.Q4_K: (0, 2), GGMLType.Q6_K: (208,)}[dtype]
    for off in offsets:
        scale = cp.random.uniform(1e-3, 2e-2, blocks.shape[0]).astype(cp.float16)
        blocks[:, off:off + 2] = scale.view(cp.uint8).reshape(-1, 2)
    return prepare_weight(dtype, (rows, cols), raw)


def bench_gemv(dtype, copy_bw: float, l2_bytes: int, shapes) -> list[dict]:
    import cupy as cp

    from q4k_engine.kernels.matmul import matmul

    rows_out = []
    for out_f, in_f in shapes:
        w0 = random_qweight(dtype, out_f, in_f)
        copies = [w0] + [random_qweight(dtype, out_f, in_f) for _ in range(max(0, -(-3 * l2_bytes // w0.data.nbytes) - 1))]
        res = {"type": dtype.name, "shape": f"{out_f}x{in_f}", "weight_MB": w0.data.nbytes / 1e6}
        for m in GEMV_M:
            x = cp.random.standard_normal((m, in_f), dtype=cp.float32)
            y = cp.empty((m, out_f), cp.float32)
            state = {"i": 0}

            def call():
                w = copies[state["i"] % len(copies)]
                state["i"] += 1
                matmul(x, w, out=y, path="gemv")

            t = graph_time_ms(call, calls=max(20, len(copies)))
            res[f"m{m}_host_us"] = time_ms(call) * 1e3  # one plain call from Python, launch included
            nbytes = w0.data.nbytes + x.nbytes + y.nbytes
            res[f"m{m}_us"] = t * 1e3
            res[f"m{m}_frac"] = nbytes / (t * 1e-3) / copy_bw
        res["m8_over_m1"] = res["m8_us"] / res["m1_us"]
        rows_out.append(res)
    return rows_out


def bench_dequant(dtype, copy_bw: float, l2_bytes: int, shapes) -> list[dict]:
    """dequantize_rows_f16 of whole matrices into f16 scratches, rotated past the L2 cache."""
    import cupy as cp

    from q4k_engine.kernels.matmul import dequantize_rows_f16

    rows_out = []
    for out_f, in_f in shapes:
        def make():
            w = random_qweight(dtype, out_f, in_f)
            return w, cp.empty((out_f, w.kpad), cp.float16)

        pairs = [make() for _ in range(max(1, -(-3 * l2_bytes // (out_f * in_f * 2))))]
        state = {"i": 0}

        def call():
            w, scratch = pairs[state["i"] % len(pairs)]
            state["i"] += 1
            dequantize_rows_f16(w, 0, w.rows, scratch)

        t = graph_time_ms(call, calls=max(10, len(pairs)))
        nbytes = pairs[0][0].data.nbytes + pairs[0][1].nbytes
        rows_out.append({"type": dtype.name, "shape": f"{out_f}x{in_f}", "us": t * 1e3,
                         "TB_s": nbytes / (t * 1e-3) / 1e12, "frac": nbytes / (t * 1e-3) / copy_bw})
    return rows_out


def bench_gemm(dtypes, shapes, ms) -> list[dict]:
    import cupy as cp

    from q4k_engine.kernels.matmul import matmul

    rows_out = []
    for out_f, in_f in shapes:
        dense = cp.random.standard_normal((out_f, in_f), dtype=cp.float32).astype(cp.float16)
        weights = {dt: random_qweight(dt, out_f, in_f) for dt in dtypes}
        for m in ms:
            x = cp.random.standard_normal((m, in_f), dtype=cp.float32)
            x16 = x.astype(cp.float16)
            y = cp.empty((m, out_f), cp.float32)
            flop = 2.0 * m * out_f * in_f
            t_dense = time_ms(lambda: cp.matmul(x16, dense.T))
            res = {"shape": f"{out_f}x{in_f}", "M": m, "dense_TFLOPs": flop / t_dense / 1e9, "dense_us": t_dense * 1e3}
            for dt, w in weights.items():
                for path in (*fused_paths(), "cublas", None):
                    t = time_ms(lambda: matmul(x, w, out=y, path=path))
                    label = path or "auto"
                    res[f"{dt.name}_{label}_frac"] = t_dense / t
                    res[f"{dt.name}_{label}_TFLOPs"] = flop / t / 1e9
                    res[f"{dt.name}_{label}_us"] = t * 1e3
            rows_out.append(res)
    return rows_out


def fused_paths() -> tuple[str, ...]:
    """The fused GEMMs this GPU runs: mma everywhere, and wgmma on Hopper (sm_90)."""
    import cupy as cp

    from q4k_engine.kernels.matmul import has_wgmma

    return ("mma", "wgmma") if has_wgmma(cp.cuda.runtime.getDevice()) else ("mma",)


def bench_glu(dtypes, shapes, ms) -> list[dict]:
    """The gated MLP's gate/up pair on the [ffn, hidden] shapes: glu_matmul on the fused path (one
    launch) and on the cuBLAS path, against two dense fp16 cuBLAS GEMMs of the same shapes."""
    import cupy as cp

    from q4k_engine.kernels.matmul import glu_matmul

    rows_out = []
    for out_f, in_f in shapes:
        if out_f <= in_f:
            continue
        dense = cp.random.standard_normal((out_f, in_f), dtype=cp.float32).astype(cp.float16)
        pairs = {dt: (random_qweight(dt, out_f, in_f), random_qweight(dt, out_f, in_f)) for dt in dtypes}
        for m in ms:
            x = cp.random.standard_normal((m, in_f), dtype=cp.float32) * 0.01
            x16 = x.astype(cp.float16)
            flop = 4.0 * m * out_f * in_f
            t_dense = time_ms(lambda: (cp.matmul(x16, dense.T), cp.matmul(x16, dense.T)))
            res = {"shape": f"2x{out_f}x{in_f}", "M": m, "dense_TFLOPs": flop / t_dense / 1e9, "dense_us": t_dense * 1e3}
            for dt, (wg, wu) in pairs.items():
                for path in (*fused_paths(), "cublas"):
                    t = time_ms(lambda: glu_matmul(x, wg, wu, "silu", path=path))
                    res[f"{dt.name}_{path}_frac"] = t_dense / t
                    res[f"{dt.name}_{path}_us"] = t * 1e3
            rows_out.append(res)
    return rows_out


def bench_small(dtypes, copy_bw: float, l2_bytes: int) -> list[dict]:
    """M = 1..8 on the GEMV ("gemv"), the fused GEMM ("mma", a 16-token tile) and mmv (tensor
    cores, W decoded into the mma fragments, no shared-memory tile), graph-replayed
    (decode replays its steps from a CUDA graph), weights rotated past the L2 cache; the gate/up
    pair 2x18944x3584 as glu_matmul (gemv: gemv1_glu at M = 1, else two GEMVs and a glu; mma: one
    fused launch; mmv: one for Q4_K, two and a glu for Q6_K). frac = quantized weight bytes / time / copy bandwidth."""
    import cupy as cp

    from q4k_engine.dtypes import tensor_bytes
    from q4k_engine.kernels.matmul import glu_matmul, matmul

    rows_out = []
    for dt in dtypes:
        for out_f, in_f in SMALL_SHAPES + [(18944, 3584)]:
            glu = (out_f, in_f) == (18944, 3584)
            n = max(1, -(-3 * l2_bytes // tensor_bytes(dt, (out_f, in_f))))
            copies = [tuple(random_qweight(dt, out_f, in_f) for _ in range(2 if glu else 1)) for _ in range(n)]
            wbytes = sum(w.data.nbytes for w in copies[0])
            for m in SMALL_M:
                x = cp.random.standard_normal((m, in_f), dtype=cp.float32) * 0.01
                y = cp.empty((m, out_f), cp.float32)
                res = {"type": dt.name, "shape": f"{'2x' if glu else ''}{out_f}x{in_f}", "M": m}
                for path in ("gemv", "mma", "mmv"):
                    state = {"i": 0}

                    def call():
                        ws = copies[state["i"] % len(copies)]
                        state["i"] += 1
                        if glu:
                            glu_matmul(x, ws[0], ws[1], "silu", path=path)
                        else:
                            matmul(x, ws[0], out=y, path=path)

                    t = graph_time_ms(call, calls=max(20, len(copies)))
                    res[f"{path}_us"] = t * 1e3
                    res[f"{path}_frac"] = wbytes / (t * 1e-3) / copy_bw
                res["best"] = min(("gemv", "mma", "mmv"), key=lambda p: res[f"{p}_us"])
                rows_out.append(res)
    return rows_out


def fmt_table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    import cupy as cp

    from q4k_engine.dtypes import GGMLType

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="three shapes only")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--out", help="also write the tables (markdown) to this file, section by section")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    shapes = SHAPES[:3] if args.quick else SHAPES
    types = (GGMLType.Q4_K, GGMLType.Q6_K)

    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    l2 = dev.attributes["L2CacheSize"]
    bw = copy_bandwidth()
    head = (f"Kernels benchmark: {name}, {datetime.date.today().isoformat()}, "
            f"copy bandwidth (read+write) {bw / 1e12:.2f} TB/s, L2 {l2 >> 20} MiB")
    sections = [head]

    def emit(title: str, table: str) -> None:
        print(f"\n{title}\n{table}", flush=True)
        sections.append(f"{title}\n\n{table}")
        if args.out:  # rewritten after every section: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                f.write("\n\n".join(sections) + "\n")

    print(head, flush=True)
    if "dequant" in parts:
        deq = [r for dt in types for r in bench_dequant(dt, bw, l2, shapes)]
        emit("Dequantize to f16 (bytes = quant read + f16 written; frac of copy bandwidth)",
             fmt_table(deq, ["type", "shape", "us", "TB_s", "frac"]))
    if "gemm" in parts:
        fused = fused_paths()
        gemm = bench_gemm(types, shapes, GEMM_M)
        cols = ["shape", "M", "dense_TFLOPs", "dense_us", *(f"Q4_K_{p}_us" for p in fused), "Q4_K_cublas_us"]
        cols += [f"{t}_{p}_frac" for t in ("Q4_K", "Q6_K") for p in (*fused, "cublas", "auto")]
        emit("GEMM (frac = dense fp16 cuBLAS time / kernel time; mma = the fused GEMM, wgmma = its Hopper kernel, "
             "cublas = dequantize + cuBLAS, auto = the default dispatch; us = plain calls from Python)",
             fmt_table(gemm, cols))
        glu = bench_glu(types, shapes, GEMM_M)
        cols = ["shape", "M", "dense_TFLOPs", "dense_us", *(f"Q4_K_{p}_us" for p in fused), "Q4_K_cublas_us"]
        cols += [f"{t}_{p}_frac" for t in ("Q4_K", "Q6_K") for p in (*fused, "cublas")]
        emit("Gated MLP gate/up (glu_matmul; frac = two dense fp16 cuBLAS GEMMs' time / ours)", fmt_table(glu, cols))
    if "gemv" in parts:
        gemv = [r for dt in types for r in bench_gemv(dt, bw, l2, shapes)]
        emit("GEMV (frac = effective bandwidth / copy bandwidth; us = graph-replayed kernel time)",
             fmt_table(gemv, ["type", "shape", "weight_MB", "m1_us", "m1_frac", "m8_us", "m8_frac", "m8_over_m1",
                              "m1_host_us"]))
    if "small" in parts:
        small = bench_small(types, bw, l2)
        emit("Decode's M: GEMV vs the fused GEMM's 16-token tile (graph-replayed us; frac = weight bytes / time / "
             "copy bandwidth; mmv = tensor cores with W decoded into the mma fragments)",
             fmt_table(small, ["type", "shape", "M", "gemv_us", "gemv_frac", "mma_us", "mma_frac", "mmv_us", "mmv_frac",
                               "best"]))


if __name__ == "__main__":
    main()
