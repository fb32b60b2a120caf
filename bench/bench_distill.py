"""Distillation signals at scale: the 7B synthetic teacher over a dataset to top-k Parquet shards,
against the same engine's bare forward on the same rows and batches (issue 11, "Measure").

    python bench/bench_distill.py                       # the 7B (bench/make_7b.py) on the GPU
    python bench/bench_distill.py --model demo --device cpu --rows 12 --min-len 8 --max-len 40 --dense-rows 3

First, one sequence of --max-len tokens: device memory of all-position top-K (+ tail) and of fp16
logits delivered by `logits_chunks`, both reduced / delivered in chunks of positions (issue 12).
Rows are `input_ids` rows of seeded random lengths in [--min-len, --max-len], written as JSONL. In
the order run (after a warm-up forward that pays kernel compilation):
  (b) the shard writer, `write_signals` (what `q4k-engine logits --out DIR/ --top-k K` runs):
      rows read from the JSONL, top-K Parquet shards written by the writer thread while the GPU
      computes; the model file's sha256 is timed apart (once per run, whatever the dataset's size);
  (a) the bare forward + top-K reduction over the same shards and length groups, output left on the
      device, nothing read from disk or written;
  (c) dense float16 safetensors shards of the first --dense-rows rows only: a 7B's dense logits are
      300 KB per token, so the dense run is bounded (24 rows of ~1,100 tokens: ~8 GB on disk, deleted after).
Printed: tokens/s of each, the ratio (b)/(a) (target >= 0.85), peak host RSS after each phase
(getrusage: a high-water mark, so it only grows; it counts the model file's pages mapped while
uploading), the device memory the process took (CudaBackend.memory_report: the drop in free memory
since the backend started, CUDA context included where NVML is available) and the pool's peak per
phase (reset before each).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_7b beside this file


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def write_rows(path: Path, n: int, lo: int, hi: int, vocab: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    tokens = 0
    with open(path, "w") as f:
        for _ in range(n):
            ids = rng.integers(0, vocab, int(rng.integers(lo, hi + 1)))
            tokens += len(ids)
            f.write(json.dumps({"input_ids": ids.tolist()}) + "\n")
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model file or `demo` (default: the 7B synthetic, made if missing)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--min-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: the library's (SignalOptions)")
    ap.add_argument("--dense-rows", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where data and shards go (default: a temporary directory)")
    a = ap.parse_args()

    import q4k_engine
    from q4k_engine.distill.rows import RowOptions, length_batches, read_rows
    from q4k_engine.binio import sha256_file
    from q4k_engine.distill.shards import SignalOptions, _shards, bytes_per_token, write_signals

    a.batch_tokens = a.batch_tokens or SignalOptions.batch_tokens

    if a.model is None:
        import make_7b

        a.model = str(make_7b.ensure_7b())
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher = q4k_engine.load(a.model, device=a.device, max_batch_tokens=a.batch_tokens, dtype="float16")
    be = teacher.backend
    sync = getattr(getattr(be.xp, "cuda", None), "Device", None)

    def synchronize() -> None:
        if sync is not None:
            sync().synchronize()

    print(f"model {teacher!r} loaded in {time.perf_counter() - t0:.1f} s on {getattr(be, 'device_name', be.name)}")
    data = work / "data.jsonl"
    tokens = write_rows(data, a.rows, a.min_len, a.max_len, teacher.vocab_size, a.seed)
    print(f"dataset: {a.rows} input_ids rows, lengths {a.min_len}-{a.max_len} (seed {a.seed}), {tokens} tokens")

    def memory(phase: str) -> str:
        parts = [f"host RSS peak {rss_gb():.2f} GB"]
        report = getattr(be, "memory_report", None)
        if report is not None:
            m = report()
            parts.append(f"device memory of the process: peak {m.process_peak / 1e9:.2f} GB, now "
                         f"{m.process_used / 1e9:.2f} GB "
                         f"({'CUDA context included' if m.context_counted else 'CUDA context not counted: no NVML'}); "
                         f"pool peak {m.pool_peak_held / 1e9:.2f} GB held ({m.pool_peak_used / 1e9:.2f} GB in arrays)")
        return f"  memory after {phase}: " + "; ".join(parts)

    # warm-up: kernel compilation and cuBLAS set-up are not the steady state
    teacher.topk_logprobs([np.arange(a.min_len) % teacher.vocab_size], a.k, tail=True)
    synchronize()
    reset = getattr(be, "reset_peak", lambda: None)

    # issue 12 item 5: all positions of one long sequence, reduced (top-k) or delivered (fp16 chunks)
    # chunk by chunk on the device, never [T, vocab] float32 whole
    one = [np.random.default_rng(a.seed).integers(0, teacher.vocab_size, a.max_len)]
    reset()
    teacher.topk_logprobs(one, a.k, tail=True, output="dlpack")
    synchronize()
    print(f"1x{a.max_len} top-{a.k} + tail, {teacher.chunk_tokens} positions per LM-head chunk:")
    print(memory("1 sequence top-k"))
    reset()
    for c in teacher.logits_chunks(one, dtype="float16", output="dlpack"):
        c.logits.sum()  # a consumer that uses each chunk and lets it go
    synchronize()
    print(memory("1 sequence logits_chunks fp16"))

    t0 = time.perf_counter()
    model_sha = sha256_file(teacher.model.path)
    print(f"model sha256 in {time.perf_counter() - t0:.1f} s ({teacher.model.path.stat().st_size / 1e9:.2f} GB)")

    # (b) the shard writer
    opts = SignalOptions(kind="topk", k=a.k, dtype="float16", batch_tokens=a.batch_tokens)
    reset()
    out = work / "topk"
    s = write_signals(teacher, data, out, opts, model_sha256=model_sha, log=print)
    b_rate = s.computed_tokens / s.seconds
    print(f"(b) top-{a.k} Parquet shards: {s.shards} shards, {s.tokens} tokens, {s.bytes / 1e9:.2f} GB in "
          f"{s.seconds:.1f} s: {b_rate:.0f} tokens/s")
    print(memory("(b)"))

    # (a) bare forward + top-k over the same shards and groups, nothing written
    reset()
    per_token = bytes_per_token(opts, teacher.vocab_size)
    t0 = time.perf_counter()
    n_a = 0
    for _, _, _, rows in _shards(read_rows(data, teacher, RowOptions()), opts, per_token, 0, 0):
        lengths = [len(r.input_ids) for r in rows]
        for group in length_batches(lengths, opts.batch_tokens):
            teacher.topk_logprobs([rows[i].input_ids for i in group], a.k, tail=True, output="dlpack")
            n_a += sum(lengths[i] for i in group)
        synchronize()
    a_seconds = time.perf_counter() - t0
    a_rate = n_a / a_seconds
    print(f"(a) bare forward + top-{a.k} (same rows and batches, read from JSONL, nothing written): "
          f"{n_a} tokens in {a_seconds:.1f} s: {a_rate:.0f} tokens/s")
    print(memory("(a)"))
    print(f"ratio (b)/(a) = {b_rate / a_rate:.3f} (target >= 0.85)")
    shutil.rmtree(out)

    # (c) dense float16 safetensors, bounded
    dense_data = work / "dense.jsonl"
    with open(data) as src, open(dense_data, "w") as dst:
        for _, line in zip(range(a.dense_rows), src):
            dst.write(line)
    reset()
    out = work / "dense"
    s = write_signals(teacher, dense_data, out, SignalOptions(kind="dense", k=None, dtype="float16",
                                                             batch_tokens=a.batch_tokens),
                      model_sha256=model_sha, log=print)
    print(f"(c) dense float16 safetensors, first {a.dense_rows} rows only: {s.shards} shards, {s.tokens} tokens, "
          f"{s.bytes / 1e9:.2f} GB in {s.seconds:.1f} s: {s.computed_tokens / s.seconds:.0f} tokens/s "
          f"({s.bytes / s.seconds / 1e9:.2f} GB/s written)")
    print(memory("(c)"))
    shutil.rmtree(out)
    if a.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
