"""Greedy decode speed against the bandwidth floor, with and without CUDA graphs (issue 5, item 6).

The floor of one decode step is reading the weights once: weight bytes (every uploaded byte) over
the device-to-device copy bandwidth measured in this run (bytes read + written per second, as in
bench_model.py). The stricter floor counts only the bytes a step reads (not the embedding table,
of which a step gathers B rows, when the head is separate). Each configuration prefills B random
prompts, then decodes greedily with EOS ignored; ms/step is the median over the steps after the
first (the first runs eagerly and, with graphs, captures). Target: batch 1 at >= 50% of the floor.
Where the time goes: the weight GEMVs of a step (every layer's matrices and the LM head) and the
decode attention of every layer, each captured into its own graph and timed with CUDA events.

    python bench/bench_decode.py [--model PATH] [--prompt 512] [--steps 64] [--batches 1,4,8] [--out decode.md]
                                 [--no-pdl]

--no-pdl launches every kernel plainly (no programmatic dependent launch in the graphs), to compare.

Without --model, the synthetic Qwen2-7B of make_7b.py is written to /tmp (once) and used.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_7b, bench_model beside this file


def breakdown(teacher, b: int, ctx: int) -> tuple[float, float, int]:
    """(GPU ms of all weight GEMVs of one step, GPU ms of every layer's decode attention over ctx
    cached tokens, bytes of those weights) at batch b, each replayed from a CUDA graph."""
    import cupy as cp

    from bench_model import median_ms
    from q4k_engine.kernels import ops

    be, cfg, w = teacher.backend, teacher.config, teacher.weights
    rng = cp.random.default_rng(0)
    mats = [m for lw in w.layers for m in (*lw.qkv, lw.wo, lw.gate, lw.up, lw.down)] + [w.output]
    xs = {m.cols: rng.standard_normal((b, m.cols), dtype=cp.float32) for m in mats}
    x = xs[cfg.hidden]
    q = rng.standard_normal((b, cfg.n_heads, cfg.head_dim), dtype=cp.float32)
    k = rng.standard_normal((b * ctx, cfg.n_kv_heads, cfg.head_dim), dtype=cp.float32)
    layout = ops.SeqLayout.build(np.arange(b), np.ones(b), np.full(b, ctx - 1), np.arange(b) * ctx, np.full(b, ctx))

    ones = cp.ones(cfg.hidden, dtype=cp.float32)

    def gemvs() -> None:  # the weight products of a step, as the forward calls them
        # As in a step, the products of hidden-size rows read the mmv operand their producer (here one
        # norm) wrote beside them; the down projection's input (the GLU's output) has none.
        xn = be.rmsnorm(x, ones, 1e-6)
        for lw in w.layers:
            for m in lw.qkv:  # q, k and v, stacked where they share a type
                be.matmul(xn, m)
            be.matmul(xn, lw.wo)
            be.glu_matmul(xn, lw.gate, lw.up, cfg.act)
            be.matmul(xs[lw.down.cols], lw.down)
        be.matmul(xn, w.output)

    def attention() -> None:
        for i in range(cfg.n_layers):
            ops.attention(q, k, k, layout, cfg.scale, cfg.layer_window(i))

    times = []
    for fn in (gemvs, attention):
        fn()  # compiled before capture
        graph = be.capture(fn)
        times.append(median_ms(graph.launch, reps=20))
    return times[0], times[1], sum(int(m.data.nbytes) for m in mats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=64, help="decode steps measured per configuration")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--no-pdl", action="store_true", help="no programmatic dependent launch (kernels/build.py)")
    a = ap.parse_args()

    import cupy as cp

    import q4k_engine
    from bench_model import copy_bandwidth

    import make_7b
    from q4k_engine.kernels import build

    build.DEPENDENT_LAUNCH = not a.no_pdl
    path = make_7b.ensure_7b(a.model)
    t0 = time.perf_counter()
    teacher = q4k_engine.load(path, device="cuda")
    be = teacher.backend
    print(f"loaded {teacher!r} in {time.perf_counter() - t0:.1f} s: {be.upload}")
    tensors = teacher.model.tensors
    weight_bytes = be.upload.device_bytes
    read_bytes = weight_bytes - tensors["token_embd.weight"].nbytes * ("output.weight" in tensors)
    bw = copy_bandwidth()
    floor_ms = weight_bytes / bw * 1e3
    read_floor_ms = read_bytes / bw * 1e3

    rng = np.random.default_rng(0)
    rows: list[tuple] = []
    parts: list[str] = []
    for b in (int(x) for x in a.batches.split(",")):
        prompts = rng.integers(0, teacher.vocab_size, (b, a.prompt))
        teacher.generate(prompts, 3, ignore_eos=True)  # compile this shape's kernels (prefill, step, capture)
        runs = {graph: teacher.generate(prompts, a.steps + 1, ignore_eos=True, use_graph=graph) for graph in (False, True)}
        for graph, g in runs.items():
            ms = g.step_ms()
            rows.append((b, g.mode + (f" ({g.note})" if g.note else ""), ms, b / ms * 1e3, floor_ms / ms,
                         read_floor_ms / ms, g.step_seconds[0] * 1e3, g.prompt_tokens / g.prefill_seconds,
                         "yes" if g.tokens == runs[False].tokens else "NO"))
        try:
            gemv_ms, attn_ms, gemv_bytes = breakdown(teacher, b, a.prompt + a.steps)
            parts.append(f"| {b} | {runs[True].step_ms():.3f} | {gemv_ms:.3f} ({gemv_bytes / bw * 1e3 / gemv_ms:.0%} of its "
                         f"floor) | {attn_ms:.3f} | {runs[True].step_ms() - gemv_ms - attn_ms:.3f} |")
        except Exception as e:  # the breakdown explains the table; its failure must not lose it
            parts.append(f"| {b} | breakdown failed: {type(e).__name__}: {' '.join(str(e).split())} | | | |")
        del runs
        cp.get_default_memory_pool().free_all_blocks()

    card = be.device_name
    head = [
        f"Decode (greedy, KV cache), {card}, {datetime.date.today()}: {path.name}, prompt {a.prompt} tokens, "
        f"{a.steps} steps, EOS ignored; programmatic dependent launch in the graphs: "
        f"{'on' if build.DEPENDENT_LAUNCH and build.dependent_launch_available(be.device.id) else 'off'}.",
        f"Copy bandwidth (read+write) {bw / 1e12:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB -> floor "
        f"{floor_ms:.3f} ms/step; bytes a step reads {read_bytes / 1e9:.2f} GB -> {read_floor_ms:.3f} ms/step.",
        "",
        "| batch | decode | ms/step | tokens/s | floor / ms | read floor / ms | first step ms | prefill tok/s | ids = eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table = [f"| {b} | {mode} | {ms:.3f} | {tps:.1f} | {r:.0%} | {rr:.0%} | {first:.1f} | {pf:.0f} | {same} |"
             for b, mode, ms, tps, r, rr, first, pf, same in rows]
    # Issue 12's targets: batch 1 >= 450 tokens/s at short context (>= 400 at 576 cached), batch 8 >= 2,000.
    verdicts = []
    for b, target in ((1, 450), (8, 2000)):
        g = [r for r in rows if r[0] == b and r[1] == "graph"]
        verdicts.append(f"batch {b} graph: {g[0][2]:.3f} ms/step, {g[0][3]:.0f} tokens/s ({g[0][4]:.0%} of the "
                        f"{floor_ms:.3f} ms floor at {bw / 1e12:.2f} TB/s copy); target >= {target}: "
                        f"{'met' if g[0][3] >= target else 'MISSED'}" if g else f"batch {b}: no graph run")
    verdict = "\n".join(verdicts)
    split = ["", f"Where a graph step's time goes (GPU ms from CUDA events; attention over {a.prompt + a.steps} cached tokens; "
             "rest = step - GEMVs - attention: norms, RoPE, biases, cache writes, argmax, host):", "",
             "| batch | graph step ms | weight GEMVs ms | decode attention ms | rest ms |", "|---|---|---|---|---|", *parts]
    text = "\n".join(head + table + split + ["", verdict])
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
