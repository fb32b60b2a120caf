"""The passes beside the prefill GEMM, alone, on the 7B's chunk shapes: W's expansion to f16
(prep_f16, the cuBLAS path) and to e4m3 (prep_e4m3, the FP8 mode), and the row-wise epilogues
(glu_pair_f16, glu_pair_fp8, fp8_rescale). GPU µs (CuPy's benchmark, median of 40 after 5 warm-ups)
and the bytes each moves per µs. Weights are random bytes: timing only, the values do not matter.

    python bench/bench_passes.py

Run it once per tree to compare two trees in one lease (bench/RESULTS.md, tenth session). At 512
tokens the epilogues measure CuPy's launch more than the kernel.
"""
from __future__ import annotations

import numpy as np

# (type, rows, cols): a gate+up chunk and a down chunk of the 7B's cuBLAS path at 2,048 tokens, a
# Q6_K down chunk, and a Q6_K matrix of the LM head's width.
SHAPES = (("Q4_K", 3840, 3584), ("Q4_K", 1216, 18944), ("Q6_K", 1216, 18944), ("Q6_K", 8960, 3584))


def us(fn, args) -> float:
    from cupyx.profiler import benchmark

    return float(np.median(benchmark(fn, args, n_repeat=40, n_warmup=5).gpu_times)) * 1e6


def main() -> None:
    import cupy as cp

    from q4k_engine.dtypes import GGMLType, row_bytes
    from q4k_engine.kernels import matmul as mm, ops

    cp.random.seed(0)
    for name, rows, cols in SHAPES:
        dt = GGMLType[name]
        nb = rows * row_bytes(dt, cols)
        w = mm.prepare_weight(dt, (rows, cols), cp.random.randint(0, 256, nb, dtype=cp.uint8))
        out = cp.empty((rows, w.kpad), cp.float16)
        t = us(mm.dequantize_rows_f16, (w, 0, rows, out))
        w8 = mm.with_fp8_scales(w)
        s8 = cp.empty((rows, w.kpad), cp.uint8)
        t8 = us(mm._prep_e4m3, (w8, 0, rows, s8))
        print(f"{name} {rows}x{cols}: prep_f16 {t:.1f} us ({(nb + out.nbytes) / t / 1e3:.0f} GB/s)  "
              f"prep_e4m3 {t8:.1f} us ({(nb + s8.nbytes) / t8 / 1e3:.0f} GB/s)")
    for m in (512, 2048):
        prod = cp.random.standard_normal((m, 7680)).astype(cp.float16)
        o = cp.empty((m, 18944), cp.float16)
        t = us(ops.glu_pair_f16, (prod, "silu", o, 0))
        d = cp.random.standard_normal((m, 7680)).astype(cp.float32)
        a, g = cp.ones(m, cp.float32), cp.ones(3840, cp.float32)
        t8 = us(ops.glu_pair_fp8, (d, a, g, g, "silu", o, 0, 3840))
        y = cp.random.standard_normal((m, 3584)).astype(cp.float32)
        tr = us(ops.fp8_rescale, (y, a, cp.ones(3584, cp.float32)))
        print(f"M={m}: glu_pair_f16 [{m},7680] {t:.1f} us ({prod.nbytes * 1.5 / t / 1e3:.0f} GB/s)  "
              f"glu_pair_fp8 {t8:.1f} us ({(d.nbytes + d.nbytes // 4) / t8 / 1e3:.0f} GB/s)  "
              f"fp8_rescale [{m},3584] {tr:.1f} us")


if __name__ == "__main__":
    main()
