"""Write a synthetic Q4_K_M model of a published shape (default Qwen2-7B) for the benchmarks, fast.

Random but valid GGML blocks with trained-model statistics, llama.cpp's Q4_K_M tensor types and a
synthetic tokenizer of the model's vocabulary size (q4k_engine.shapes), streamed tensor by tensor
to APR or GGUF (by the suffix, or --format); the GGUF also loads in llama.cpp. The 7B is ~4.4 GiB,
the 72B ~44 GiB (47 GB).

    python bench/make_7b.py /tmp/qwen2-7b-q4km.apr                      # the benchmarks' 7B
    python bench/make_7b.py /tmp/qwen2-72b-q4km.gguf --shape qwen2-72b  # shapes: --list
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from q4k_engine.errors import Q4KError
from q4k_engine.shapes import SHAPES, get_shape, weight_bytes, write_shape

DEFAULT_PATH = Path(tempfile.gettempdir()) / "qwen2-7b-q4km-synthetic.apr"


def write_model(path: Path, shape: str = "qwen2-7b", n_layers: int | None = None, seed: int = 0,
                fmt: str | None = None, workers: int | None = None, progress: bool = False) -> Path:
    """Write the model, refusing first when the disk cannot hold it; print size, time and rate."""
    need = weight_bytes(get_shape(shape).config(n_layers))
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    if need > free:
        raise SystemExit(f"make_7b: {path}: needs {need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free on its disk")
    t0 = time.perf_counter()
    write_shape(path, shape, fmt, n_layers=n_layers, seed=seed, workers=workers, progress=progress)
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"make_7b: wrote {path} ({shape}{f', {n_layers} layers' if n_layers else ''}, {size / 1e9:.2f} GB = "
          f"{size / 2**30:.2f} GiB) in {dt:.1f} s ({size / dt / 1e9:.2f} GB/s)", flush=True)
    return path


def ensure_7b(path: str | Path | None = None) -> Path:
    """`path`, or the default file in the temp dir, written first (with its timing printed) if missing:
    the benchmarks' shared Qwen2-7B model."""
    path = Path(path) if path else DEFAULT_PATH
    return path if path.exists() else write_model(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path, nargs="?")
    ap.add_argument("--shape", default="qwen2-7b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (quick runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", dest="fmt", choices=["apr", "gguf"], default=None,
                    help="default: gguf if PATH ends in .gguf, else apr")
    ap.add_argument("--workers", type=int, default=None, help="threads per tensor (default: CPU count)")
    ap.add_argument("--list", action="store_true", help="list the shapes and their Q4_K_M sizes")
    a = ap.parse_args()
    if a.list:
        for name, s in SHAPES.items():
            print(f"{name:<11} {s.arch:<6} {s.n_layers:>3} layers, hidden {s.hidden:>5}, ffn {s.ffn:>5}, heads "
                  f"{s.n_heads}/{s.n_kv_heads}, vocab {s.vocab:>6}: {weight_bytes(s.config()) / 1e9:6.2f} GB  ({s.source})")
        return
    if a.path is None:
        ap.error("PATH is required (or --list)")
    try:
        write_model(a.path, a.shape, a.layers, a.seed, a.fmt, a.workers, progress=sys.stderr.isatty())
    except Q4KError as e:
        raise SystemExit(f"make_7b: {e}") from None


if __name__ == "__main__":
    main()
