"""Ray's overhead on one GPU: the 7B synthetic teacher over the same rows, single-process shards
against a Ray Data run of one GPU worker (issue 13: target >= 0.9).

    python bench/bench_ray.py                    # the 7B (bench/make_7b.py) on the GPU: ~3 minutes on an H200
    python bench/bench_ray.py --model demo --device cpu --rows 24 --min-len 8 --max-len 40 --shard-rows 4

Rows: bench_distill.write_rows (input_ids rows of seeded random lengths in [--min-len, --max-len]),
top-K float16 Parquet shards of --shard-rows rows. In the order run:
  (1) single process: shards.write_signals with the teacher in this process, after a warm-up forward
      (what `q4k-engine logits --out DIR/` runs); tokens/s = tokens / the call's seconds, the CLI's
      figure (the model file's sha256 is timed apart, as in bench_distill);
  (2) Ray: ray_run.write_signals_ray, one worker, on a local Ray instance started here
      (ray.init(num_gpus=1)); tokens/s = tokens / the worker's compute time, from the first shard's
      start to the last one's end. Ray's start, the driver's plan pass and the actor's model load
      happen once per run, not per token: printed apart, with the run's end-to-end seconds.
Printed: both rates, the ratio (2)/(1), and whether the two directories hold the same bytes (they must).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_distill and make_7b beside this file


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model file or `demo` (default: the 7B synthetic, made if missing)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--shard-rows", type=int, default=100)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where data and shards go (default: a temporary directory)")
    a = ap.parse_args()

    import q4k_engine
    from bench_distill import write_rows
    from q4k_engine.distill.ray_run import import_ray, write_signals_ray
    from q4k_engine.binio import sha256_file
    from q4k_engine.distill.shards import SignalOptions, write_signals

    ray = import_ray()
    import pyarrow.parquet  # noqa: F401  (imported once before (1): Ray's workers have it loaded already)
    import tqdm  # noqa: F401
    if a.model is None:
        import make_7b

        a.model = str(make_7b.ensure_7b())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    opts = SignalOptions(kind="topk", k=a.k, dtype="float16", batch_tokens=a.batch_tokens, shard_rows=a.shard_rows)

    # (1) single process
    t0 = time.perf_counter()
    teacher = q4k_engine.load(a.model, device=a.device, max_batch_tokens=a.batch_tokens)
    be = teacher.backend
    print(f"model {teacher!r} loaded in {time.perf_counter() - t0:.1f} s on {getattr(be, 'device_name', be.name)}")
    data = work / "data.jsonl"
    tokens = write_rows(data, a.rows, a.min_len, a.max_len, teacher.vocab_size, a.seed)
    print(f"dataset: {a.rows} input_ids rows, lengths {a.min_len}-{a.max_len} (seed {a.seed}), {tokens} tokens; "
          f"top-{a.k} float16 shards of {a.shard_rows} rows")
    teacher.topk_logprobs([np.arange(a.min_len) % teacher.vocab_size], a.k, tail=True)  # compile, cuBLAS set-up
    t0 = time.perf_counter()
    model_sha = sha256_file(teacher.model.path)
    print(f"model sha256 in {time.perf_counter() - t0:.1f} s")
    single = work / "single"
    s1 = write_signals(teacher, data, single, opts, model_sha256=model_sha, log=print)
    rate1 = s1.computed_tokens / s1.seconds
    print(f"(1) single process: {s1.shards} shards, {s1.tokens} tokens in {s1.seconds:.1f} s: {rate1:.0f} tokens/s")
    del teacher, be
    if a.device != "cpu":
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()  # the Ray worker's process loads its own copy

    # (2) Ray, one worker
    t0 = time.perf_counter()
    ray.init(num_gpus=1 if a.device == "cuda" else 0, include_dashboard=False, logging_level="WARNING")
    t_init = time.perf_counter() - t0
    on_ray = work / "ray"
    s2 = write_signals_ray(a.model, data, on_ray, opts, num_workers=1, device=a.device, log=print)
    ray.shutdown()
    rate2 = s2.computed_tokens / s2.worker_seconds
    print(f"(2) Ray, 1 worker: {s2.shards} shards, {s2.tokens} tokens in {s2.worker_seconds:.1f} s of the worker's "
          f"compute: {rate2:.0f} tokens/s (end to end {s2.seconds:.1f} s after a {t_init:.1f} s ray.init: "
          f"{s2.computed_tokens / (s2.seconds + t_init):.0f} tokens/s)")
    same = files(single) == files(on_ray)
    print(f"same bytes (every shard and the manifest): {'yes' if same else 'NO'}")
    print(f"ratio (2)/(1) = {rate2 / rate1:.3f} (target >= 0.9)")
    if a.workdir is None:
        shutil.rmtree(work)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
