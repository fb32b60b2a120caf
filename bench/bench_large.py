"""The largest teachers on one GPU (issue 16): load time, device memory and speed of a synthetic
Q4_K_M model of a published shape (Qwen2-72B, Qwen2.5-32B, ... see bench/make_7b.py --list).

    python bench/bench_large.py --shape qwen2-72b [--out large.md]     # on the GPU
    python bench/bench_large.py --shape tiny --device cpu               # the same stages on the CPU

The model file (GGUF, so llama.cpp's llama-bench can run the same file) is written to the temp dir
first unless it is there (or --model is given); --remove deletes it at the end (a 72B file is
47 GB: the 72B and the 32B do not fit on a 64 GB disk together). Figures:
- load: open + validate + upload of every tensor, wall seconds;
- device memory (GB = 1e9) used by the process, as the backend's memory report measures it (the
  drop in the device's free memory since the backend started: CUDA context, cuBLAS workspace and
  the CuPy pool together): after load, and after top-64 log-probs of every position of 1x2048 and
  4x2048 random prompts (the pool keeps its blocks, so this is the run's high-water mark; the
  pool's own peak is given beside it);
- prefill tokens/s (median of 3 wall-clock runs, device synchronized by the copy to the host):
  last-position logits (the forward) and top-64 of every position (the distillation output);
- decode tokens/s: greedy generation with a KV cache after a 128-token prompt, CUDA graphs on
  the GPU (teacher.generate), median step after the first;
- with --example-steps N, last (the bench's teacher released first): examples/distill.py trains a
  student (default the 1B, 1,284,573,184 parameters with this vocabulary) for N steps, one epoch,
  from this GGUF as its teacher, in its own process; tokens/s, the teacher's share of the step time
  and both device memory figures go into the table, its whole report beside --out
  (<out stem>-distill.json).

Memory of that run on one H200 (~140 GiB), 72B teacher, 1B student, the defaults (4 x 1024 tokens a
step, dense fp32 teacher logits): teacher ~50 GB (weights 47.4 GB + scratch; its CuPy pool peak) +
~2.5 GB (the [4, 1024, 152064] fp32 logits it hands over); student ~43 GB (torch peak: fp32 weights,
grads and AdamW states 20.6 GB + ~5.5 MB a token of activations, logits and their gradients, 22.5 GB
at 4096 tokens; measured per token on the CPU from autograd's saved tensors): ~100 GB in all.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_7b beside this file

TOPK = 64
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distill.py"
LLAMA_GEN = 128  # llama-bench's tg test: tokens generated from an empty context


class Meter:
    """The process's device memory (the backend's MemoryReport: the drop in the device's free
    memory since the first CudaBackend started) and the CuPy pool's peak; nothing on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def used(self, teacher) -> str:
        if not self.cuda:
            return "n/a (cpu)"
        m = teacher.backend.memory_report()
        context = "" if m.context_counted else ", CUDA context not counted (no NVML)"
        return (f"{m.process_peak / 1e9:.2f} GB at the peak, {m.process_used / 1e9:.2f} GB after "
                f"(pool peak {m.pool_peak_held / 1e9:.2f} GB{context})")

    def reset(self, teacher) -> None:
        if self.cuda:
            import cupy as cp

            gc.collect()
            cp.get_default_memory_pool().free_all_blocks()
            teacher.backend.reset_peak()


def _median_s(fn, reps: int = 3) -> float:
    fn()  # warm-up: kernels of this shape compiled, pool grown
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2-72b")
    ap.add_argument("--model", type=Path, default=None, help="an existing model file of that shape")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs; figures not the model's)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--prefill", default="1x512,1x2048,4x2048", help="BxT shapes of the prefill figures")
    ap.add_argument("--memory", default="1x2048,4x2048", help="BxT shapes of the memory figures (top-64 output)")
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per batch size")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--remove", action="store_true", help="delete the model file at the end")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--example-steps", type=int, default=0,
                    help="then run examples/distill.py for this many steps (one epoch) with this teacher")
    ap.add_argument("--example-student", default="1b", help="the example's --student-size")
    ap.add_argument("--example-batch", type=int, default=4, help="the example's rows per step")
    ap.add_argument("--example-seq-len", type=int, default=1024, help="the example's tokens per row")
    ap.add_argument("--example-top-k", type=int, default=0, help="the example's --top-k (0: dense teacher logits)")
    ap.add_argument("--llama-bench", action="store_true",
                    help="then llama.cpp's llama-bench on the same GGUF (bench/llama_bench.py), the GPU freed first")
    a = ap.parse_args(argv)
    for name in ("example_steps", "example_top_k"):
        if getattr(a, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("example_batch", "example_seq_len"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


def example_command(a: argparse.Namespace, model: Path, report: Path) -> list[str]:
    """examples/distill.py on `model` for --example-steps steps: --rows makes them exactly one epoch."""
    return [sys.executable, str(EXAMPLE), "--teacher", str(model), "--device", a.device,
            "--student-size", a.example_student, "--rows", str(a.example_steps * a.example_batch),
            "--batch", str(a.example_batch), "--seq-len", str(a.example_seq_len), "--top-k", str(a.example_top_k),
            "--report-json", str(report)]


def example_rows(r: dict) -> list[str]:
    """The table rows of the example's report (examples/distill.py summarize())."""
    mode = f"top-{r['top_k']}" if r["top_k"] else "dense logits"
    rows = [f"| distillation example: {r['student_size']} student ({r['student_parameters']:,} parameters), "
            f"{r['steps']} steps of {r['batch']}x{r['seq_len']}, {mode} | {r['tokens_per_s']:,.0f} tokens/s; teacher "
            f"{100 * r['teacher_share']:.1f}% of the step time (over {r['timed_steps']} steps after the first); loss "
            f"{r['loss_first_quarter']:.4f} -> {r['loss_last_quarter']:.4f} |"]
    m = r.get("memory")
    if m:
        rows.append(f"| device memory in the example | teacher pool peak {m['teacher_pool_peak_bytes'] / 1e9:.2f} GB, "
                    f"student peak allocated {m['student_max_allocated'] / 1e9:.2f} GB; example process "
                    f"{m['process_device_bytes'] / 1e9:.2f} GB; device used at the end {m['device_used_bytes'] / 1e9:.2f} GB |")
    return rows


def release() -> str:
    """Once the caller has dropped its teacher: hand the CuPy pool's blocks back, so that the
    example's process has the device; what this process still holds (its CUDA context), for the record."""
    gc.collect()
    import cupy as cp

    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()
    free, total = cp.cuda.runtime.memGetInfo()
    return f"{(total - free) / 1e9:.2f} GB in use on the device (the bench's process: its CUDA context)"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)

    import make_7b
    from llama_bench import EngineFigure, compare_table
    from llama_bench import run as llama_bench_run

    import q4k_engine
    from q4k_engine.errors import Q4KError

    def shapes(spec: str) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in s.split("x")) for s in spec.split(",") if s]  # type: ignore[misc]

    meter = Meter(a.device)
    suffix = f"-{a.layers}l" if a.layers else ""
    path = a.model or Path(tempfile.gettempdir()) / f"{a.shape}{suffix}-q4km-synthetic.gguf"
    if not path.exists():
        make_7b.write_model(path, a.shape, a.layers, fmt="gguf")
    t0 = time.perf_counter()
    teacher = q4k_engine.load(path, device=a.device)
    load_s = time.perf_counter() - t0
    cfg = teacher.config
    upload = getattr(teacher.backend, "upload", None)
    after_load = meter.used(teacher)
    card = teacher.backend.device_name if a.device == "cuda" else "CPU (NumPy reference)"
    print(f"loaded {teacher!r} in {load_s:.1f} s; {upload or ''}; device memory {after_load}", flush=True)
    rng = np.random.default_rng(0)

    def prompts(b: int, t: int) -> np.ndarray:
        return rng.integers(0, cfg.vocab_size, (b, t))

    peer: list[EngineFigure] = []  # the figures llama-bench has a test for
    rows = [f"| load (open, validate, upload) | {load_s:.1f} s |",
            f"| device memory after load | {after_load} |"]
    for b, t in shapes(a.memory):
        meter.reset(teacher)
        vals, ids = teacher.topk_logprobs(prompts(b, t), k=TOPK)[:2]
        assert vals.shape == (b, t, TOPK) and np.isfinite(vals).all(), "top-k output not finite"
        rows.append(f"| device memory, top-{TOPK} of every position, {b}x{t} | {meter.used(teacher)} |")
        print(rows[-1], flush=True)
        del vals, ids
    for b, t in shapes(a.prefill):
        p = prompts(b, t)
        fwd = _median_s(lambda: teacher.logits_for_batch(p))
        top = _median_s(lambda: teacher.topk_logprobs(p, k=TOPK))
        rows.append(f"| prefill {b}x{t} | {b * t / fwd:,.0f} tokens/s (last-position logits); "
                    f"{b * t / top:,.0f} tokens/s (top-{TOPK} of every position) |")
        print(rows[-1], flush=True)
        if b == 1:
            peer.append(EngineFigure(f"prefill 1x{t} (last-position logits)", t / fwd, f"pp{t}"))
    meter.reset(teacher)
    g = None
    for b in (int(x) for x in a.decode_batches.split(",")):
        p = prompts(b, a.prompt)
        teacher.generate(p, 3, ignore_eos=True)  # compile and capture this batch size
        g = teacher.generate(p, a.steps + 1, ignore_eos=True)
        ms = g.step_ms()
        rows.append(f"| decode batch {b} ({g.mode}{f', {g.note}' if g.note else ''}) | {b / ms * 1e3:,.1f} tokens/s "
                    f"({ms:.2f} ms/step after a {a.prompt}-token prompt) |")
        print(rows[-1], flush=True)
        if b == 1:
            peer.append(EngineFigure(f"decode batch 1 ({a.prompt}-token prompt, {a.steps} steps)", 1e3 / ms,
                                     f"tg{LLAMA_GEN}"))
    rows.append(f"| device memory at the end | {meter.used(teacher)} |")
    size = path.stat().st_size
    if a.example_steps:
        del teacher, g  # the example loads its own: two 72B teachers do not fit
        print(f"released the bench's teacher: {release() if a.device == 'cuda' else 'cpu'}", flush=True)
        report = (a.out.with_name(f"{a.out.stem}-distill.json") if a.out
                  else Path(tempfile.gettempdir()) / f"{path.stem}-distill.json")
        cmd = example_command(a, path, report)
        print("running " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"bench_large: examples/distill.py failed (its output above); {path} is kept")
        rows += example_rows(json.loads(report.read_text()))
        print(f"example report: {report}", flush=True)

    peer_text = ""
    if a.llama_bench:
        teacher = g = None  # llama-bench gets the device (all but this process's CUDA context)
        if a.device == "cuda":
            print(f"released the bench's teacher: {release()}", flush=True)
        try:
            lrows = llama_bench_run(path, prompts=tuple(t for b, t in shapes(a.prefill) if b == 1), gen=LLAMA_GEN)
            peer_text = "\n\n" + compare_table(peer, lrows, f"llama.cpp on the same file in this run: llama-bench "
                                             f"{lrows[0].build}, {lrows[0].backend}, flash attention "
                                             f"{lrows[0].flash_attn}, all layers on the GPU, mean of {lrows[0].reps} "
                                             "reps (bench/llama_bench.py).")
        except Q4KError as e:  # the engine's figures are kept
            peer_text = f"\n\nllama.cpp's llama-bench: not run: {e}"

    head = [
        f"Large teacher, {card}, {datetime.date.today()}: {path.name} ({a.shape}{suffix}: {cfg.n_layers} layers, "
        f"hidden {cfg.hidden}, ffn {cfg.ffn}, heads {cfg.n_heads}/{cfg.n_kv_heads}, vocab {cfg.vocab_size}; "
        f"{size / 1e9:.2f} GB Q4_K_M GGUF, synthetic weights).",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    text = "\n".join(head + rows) + peer_text
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    if a.remove and a.model is None:
        teacher = None  # the last reference: the file's mapping closes before the unlink
        path.unlink()
        print(f"removed {path}")


if __name__ == "__main__":
    main()
