"""Parity of q4k-engine's reference forward (cpu) against Hugging Face transformers, as a table.

    python bench/parity_hf.py                      # both real models + synthetic models of every arch
    python bench/parity_hf.py --only gemma --device cuda

For each model: all-position logits of a few prompts, ours vs transformers loading the same GGUF in
float32 on CPU (tests/hf_reference.py says how each architecture is loaded), then llama.cpp's
KL-divergence statistics (KL(reference || ours), nats): max |dlogit|, mean / p99 / max KLD, top-1
agreement. Synthetic models are written fresh into a temporary folder (seed printed).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hf_reference import TABLE_HEADER, hf_logits, hf_model, parity, table_row  # noqa: E402

import q4k_engine  # noqa: E402
from q4k_engine.synthetic import write_synthetic  # noqa: E402

PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched. Ünïcödé: 日本語, emoji 🚀!",
    "Knowledge distillation trains a small student model to match the logits of a large teacher.",
)
SYNTHETIC_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def real_models() -> dict[str, Path]:
    from realmodels import gemma_path, smollm_path  # skips (raises) when a package is missing

    out = {}
    for name, fn in (("smollm2-135m", smollm_path), ("gemma3-270m", gemma_path)):
        try:
            out[name] = fn()
        except BaseException as e:  # pytest.skip raises a BaseException subclass
            print(f"{name}: not available ({e})", file=sys.stderr)
    return out


def measure(path: Path, seqs: list[list[int]], device: str) -> tuple:
    t0 = time.perf_counter()
    teacher = q4k_engine.load(path, device=device)
    logits, lengths = teacher.logits_per_position(seqs)
    ours = [logits[i, :n] for i, n in enumerate(lengths)]
    t1 = time.perf_counter()
    ref = hf_logits(hf_model(path), seqs)
    t2 = time.perf_counter()
    return parity(ref, ours), t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only models whose name contains this")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per real model")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = ap.parse_args()
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    print(f"seed={seed} device={args.device}")
    rows = []
    for name, path in real_models().items():
        if args.only in name:
            teacher = q4k_engine.load(path, device="cpu")
            seqs = [teacher.encode(p) for p in PROMPTS[: args.prompts]]
            p, t_ours, t_ref = measure(path, seqs, args.device)
            rows.append(table_row(name, p))
            print(f"{name}: ours {t_ours:.1f}s, transformers {t_ref:.1f}s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in SYNTHETIC_ARCHS:
            name = f"synthetic-{arch}"
            if args.only not in name:
                continue
            path = write_synthetic(Path(tmp) / f"{arch}.gguf", arch, "gguf", seed=int(rng.integers(2**31)))
            vocab = q4k_engine.load(path, device="cpu").vocab_size
            seqs = [rng.integers(0, vocab, n).tolist() for n in (48, 13, 30)]
            p, _, _ = measure(path, seqs, args.device)
            rows.append(table_row(name, p))
    print(TABLE_HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
