"""Issue 16 on the CPU: the synthetic models of published shapes (q4k_engine.shapes, bench/make_7b.py)
and the guards that keep 72B-sized inputs from wrapping int32 indices. The GPU side is
tests/test_large_gpu.py."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from q4k_engine.dtypes import GGMLType, TYPE_INFO
from q4k_engine.errors import InputError
from q4k_engine.loader import open_model
from q4k_engine.provider import TeacherModel, make_backend
from q4k_engine.quants import dequantize
from q4k_engine.shapes import (
    SHAPES, WEIGHT_STD, fill_blocks, get_shape, inventory, q4_k_m_storage, shape_model, tensor_bytes_for,
    weight_bytes, write_shape,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fmt", ["apr", "gguf"])
def test_tiny_shape_loads_and_runs(tmp_path, rng, fmt):
    """The tiny shape is written streaming, read back by the loader with the shape's config and
    types, and runs through the reference forward to finite, non-trivial logits."""
    seed = int(rng.integers(0, 2**31))
    path = write_shape(tmp_path / f"tiny.{fmt}", "tiny", seed=seed, workers=2)
    model = open_model(path)
    spec = get_shape("tiny")
    c = model.config
    assert (c.arch, c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.vocab_size) == (
        spec.arch, spec.n_layers, spec.hidden, spec.ffn, spec.n_heads, spec.n_kv_heads, spec.vocab)
    assert {n: (t.shape, t.dtype) for n, t in model.tensors.items()} == {n: (s, d) for n, s, d in inventory(c)}
    assert path.stat().st_size >= weight_bytes(c)
    teacher = TeacherModel(model, make_backend("cpu"))
    ids = teacher.encode("The ferry leaves the north bank at seven")
    assert teacher.decode(ids, skip_special=True) == "The ferry leaves the north bank at seven"
    logits = teacher.logits_for_batch([ids])
    assert logits.shape == (1, spec.vocab) and np.isfinite(logits).all() and logits.std() > 1e-3


# ffn_down rows of 384 values are not whole 256-blocks, as Qwen2-72B's 29568 are not
ODD_FFN = dataclasses.replace(get_shape("tiny"), ffn=384)


def test_gguf_is_what_llama_cpp_expects(tmp_path):
    """llama.cpp wants one token per embedding row and the Q4_K_M types with its fallbacks; the
    engine reads and runs them."""
    path = write_shape(tmp_path / "odd.gguf", ODD_FFN, seed=1)
    r = gguf.GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == ODD_FFN.vocab
    teacher = TeacherModel(open_model(path), make_backend("cpu"))
    assert np.isfinite(teacher.logits_for_batch([[1, 2, 3]])).all()
    types = {t.name: GGMLType(int(t.tensor_type)) for t in r.tensors}
    # ffn_down's 384 columns are not 256-blocks: Q5_0 where Q4_K was meant, Q8_0 on "more bits" layers
    assert types["blk.0.ffn_down.weight"] == GGMLType.Q5_0 and types["blk.1.ffn_down.weight"] == GGMLType.Q8_0
    assert types["output.weight"] == GGMLType.Q6_K and types["token_embd.weight"] == GGMLType.Q4_K


def test_bytes_depend_only_on_seed_and_name(rng):
    """Same bytes whatever the thread count; other seeds or names give other bytes."""
    seed = int(rng.integers(0, 2**31))
    shape = (1024, 8192)  # 4.7 MB of Q4_K: several chunks with a small chunk size
    import q4k_engine.shapes as shapes

    old = shapes._CHUNK_BYTES
    shapes._CHUNK_BYTES = 1 << 20
    try:
        one = tensor_bytes_for("w", shape, GGMLType.Q4_K, seed, workers=1)
        three = tensor_bytes_for("w", shape, GGMLType.Q4_K, seed, workers=3)
        other = tensor_bytes_for("w2", shape, GGMLType.Q4_K, seed, workers=3)
    finally:
        shapes._CHUNK_BYTES = old
    assert np.array_equal(one, three)
    assert not np.array_equal(one, other)


@pytest.mark.parametrize("dtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q5_0, GGMLType.Q8_0])
def test_blocks_have_trained_statistics(rng, dtype):
    """Dequantized (by the reference dequantizer), the random blocks have std ~0.02 and mean ~0."""
    info = TYPE_INFO[dtype]
    cols = 4096
    n = 256 * (cols // info.block_size)
    blocks = np.empty((n, info.type_size), np.uint8)
    fill_blocks(blocks, dtype, rng)
    w = dequantize(blocks.reshape(-1), dtype, (256, cols))
    assert np.isfinite(w).all()
    assert abs(w.std() / WEIGHT_STD - 1) < 0.05, f"std {w.std():.4f}"
    assert abs(w.mean()) < 0.1 * WEIGHT_STD, f"mean {w.mean():.5f}"


def test_published_sizes():
    """The Q4_K_M file sizes of llama.cpp's conversions of these checkpoints (within 1%)."""
    published = {"qwen2-7b": 4.68e9, "qwen2-32b": 19.85e9, "qwen2-72b": 47.4e9, "llama3-8b": 4.92e9}
    for name, size in published.items():
        assert abs(weight_bytes(get_shape(name).config()) / size - 1) < 0.01, name
    # Qwen2-72B's ffn_down (29568 columns) takes llama.cpp's fallback types
    assert q4_k_m_storage("blk.11.ffn_down.weight", 29568, 80, False) == GGMLType.Q5_0
    assert q4_k_m_storage("blk.0.ffn_down.weight", 29568, 80, False) == GGMLType.Q8_0


def test_shape_model_is_lazy():
    """A 72B model object costs nothing until a writer reads a tensor."""
    model = shape_model("qwen2-72b")
    assert len(model.tensors) == 3 + 80 * 12
    assert sum(t.nbytes for t in model.tensors.values()) == weight_bytes(model.config)
    assert model.tensors["blk.0.attn_q.bias"].data.size == 8192 * 4


def test_apr_refuses_fallback_types(tmp_path):
    """APR holds the portable types only: a shape with fallback types goes to GGUF, nothing written."""
    with pytest.raises(InputError, match="Q5_0/Q8_0 tensors .*write a .gguf"):
        write_shape(tmp_path / "odd.apr", ODD_FFN)
    assert not list(tmp_path.iterdir())


def test_unknown_shape():
    with pytest.raises(InputError, match="unknown model shape 'qwen9'"):
        get_shape("qwen9")


def test_make_7b_cli(tmp_path):
    """The benchmarks' entry: PATH alone writes the default shape; --list names every shape."""
    out = subprocess.run([sys.executable, str(REPO / "bench/make_7b.py"), "--list"], capture_output=True, text=True,
                         check=True).stdout
    assert all(name in out for name in SHAPES)
    path = tmp_path / "t.gguf"
    run = subprocess.run([sys.executable, str(REPO / "bench/make_7b.py"), str(path), "--shape", "tiny",
                          "--layers", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and open_model(path).config.n_layers == 1


def test_inspect_shape_estimate():
    """inspect --shape estimates a model that is never written; the top-k line is there."""
    from click.testing import CliRunner

    from q4k_engine.cli.main import main

    r = CliRunner().invoke(main, ["inspect", "--shape", "qwen2-72b", "-b", "4", "-t", "2048", "--json"])
    assert r.exit_code == 0, r.output
    import json

    m = json.loads(r.output)["memory"]
    assert m["bytes"]["weights"] == weight_bytes(get_shape("qwen2-72b").config())
    assert m["topk"] == 64 and m["total_topk"] > m["bytes"]["weights"]
    r = CliRunner().invoke(main, ["inspect"])
    assert r.exit_code == 2 and "MODEL file or --shape" in r.output


def test_attention_layout_refuses_int32_rows():
    """Row indices at 2^31 would wrap in the int32 copies the kernels take: refused, one line,
    before CuPy is touched."""
    from q4k_engine.kernels import ops

    with pytest.raises(InputError, match="2147483648"):
        ops.SeqLayout.build([0], [1], [0], [(1 << 31) - 5], [10])


def test_bench_large_runs_on_cpu(tmp_path):
    """bench/bench_large.py's stages end to end on the tiny shape (the GPU run is the lead's), the
    distillation example last (--example-steps) with the tiny student, its report beside --out."""
    model = write_shape(tmp_path / "tiny.gguf", "tiny", n_layers=1)
    out = tmp_path / "large.md"
    run = subprocess.run([sys.executable, str(REPO / "bench/bench_large.py"), "--shape", "tiny", "--device", "cpu",
                          "--model", str(model), "--prefill", "1x16,2x16", "--memory", "2x16",
                          "--decode-batches", "1,2", "--steps", "2", "--prompt", "8", "--out", str(out),
                          "--example-steps", "3", "--example-student", "tiny", "--example-batch", "2",
                          "--example-seq-len", "16", "--llama-bench"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    table = out.read_text()
    for figure in ("load (open, validate, upload)", "top-64 of every position, 2x16", "prefill 2x16",
                   "decode batch 2", "distillation example: tiny student", "3 steps of 2x16, dense logits"):
        assert figure in table, figure
    report = json.loads((tmp_path / "large-distill.json").read_text())
    assert report["teacher"] == str(model) and report["steps"] == 3 and report["batch"] == 2
    assert report["tokens"] == 3 * 2 * 16 and f"{report['student_parameters']:,} parameters" in table
    # llama-bench beside it when a binary runs here (a CPU build); else a line saying why not, the
    # engine's figures kept
    assert "| prefill 1x16 (last-position logits) |" in table or "llama.cpp's llama-bench: not run: " in table
    assert model.exists()  # --remove is off, and a given --model is never removed


@pytest.fixture(scope="module")
def bench_large():
    spec = importlib.util.spec_from_file_location("bench_large", REPO / "bench/bench_large.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_large_example_arguments(bench_large, tmp_path):
    a = bench_large.parse_args(["--shape", "qwen2-72b", "--example-steps", "20"])
    cmd = bench_large.example_command(a, tmp_path / "m.gguf", tmp_path / "r.json")
    assert cmd[1] == str(REPO / "examples/distill.py")
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert flags == {"--teacher": str(tmp_path / "m.gguf"), "--device": "cuda", "--student-size": "1b",
                     "--rows": "80", "--batch": "4", "--seq-len": "1024", "--top-k": "0",
                     "--report-json": str(tmp_path / "r.json")}  # 20 steps of 4 rows: one epoch
    assert bench_large.parse_args([]).example_steps == 0  # off unless asked
    for bad in (["--example-steps", "-1"], ["--example-batch", "0"], ["--example-seq-len", "0"],
                ["--example-top-k", "-2"]):
        with pytest.raises(SystemExit) as e:
            bench_large.parse_args(bad)
        assert e.value.code == 2
