"""pytest-benchmark runs of the teacher through its public API (what a distillation loop calls).

    python -m pytest bench/test_bench_teacher.py --benchmark-only                      # demo model
    Q4K_BENCH_MODEL=/tmp/qwen2-7b-q4km-synthetic.apr python -m pytest bench/test_bench_teacher.py \
        --benchmark-only -k cuda --benchmark-columns=median,rounds

Each benchmark records `tokens_per_s` (from the median round) in its extra_info, and on the GPU the
engine's own peak-memory figure. The peer comparisons (dense fp16 forward, Hugging Face
transformers) are in bench/bench_model.py, which runs them in the same process on the same card.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import q4k_engine
from q4k_engine.gpu import probe

MODEL = os.environ.get("Q4K_BENCH_MODEL", "demo")
SHAPES = [(1, 512), (4, 512), (2, 2048)]


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def teacher(request):
    if request.param == "cuda" and not probe().usable:
        pytest.skip(f"no CUDA GPU: {probe().reason}")
    if request.param == "cpu" and MODEL != "demo":
        pytest.skip("the NumPy reference is the oracle, not a fast path: benchmark it on the demo model only")
    return q4k_engine.load(MODEL, device=request.param, output="dlpack", dtype="float16")


def _sync(teacher) -> None:
    if teacher.device == "cuda":
        teacher.backend.xp.cuda.Device().synchronize()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("positions", ["all", "last"])
def test_teacher_logits(benchmark, teacher, shape, positions):
    b, t = shape
    ids = np.random.default_rng(0).integers(0, teacher.vocab_size, (b, t))

    def run():
        if positions == "all":
            teacher.logits_per_position(ids)
        else:
            teacher.logits_for_batch(ids)
        _sync(teacher)

    if teacher.device == "cuda":
        teacher.backend.reset_peak()
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = round(b * t / benchmark.stats["median"])
    if teacher.device == "cuda":
        benchmark.extra_info["peak_gb"] = round(teacher.backend.memory_report().pool_peak_held / 1e9, 3)
