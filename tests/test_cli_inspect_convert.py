"""`q4k-engine inspect` and `convert`, on synthetic and real models; errors as one line + exit 2."""
from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from q4k_engine.apr import DTYPE_CODES_KEY, read_apr
from q4k_engine.cli.main import main
from q4k_engine.dtypes import GGMLType
from q4k_engine.convert import q4_k_m_type, save_model
from q4k_engine.loader import open_model
from q4k_engine.quants import dequantize, quantize
from q4k_engine.synthetic import synthetic_model
from q4k_engine.tensors import ModelFile, QTensor


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, module_seed) -> tuple[ModelFile, Path]:
    m = synthetic_model("gemma3", seed=module_seed)
    return m, save_model(tmp_path_factory.mktemp("m") / "gemma3.gguf", m, "gguf")


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def assert_same_model(a: ModelFile, b: ModelFile) -> None:
    assert a.config == b.config
    assert a.tokenizer == b.tokenizer
    assert set(a.tensors) == set(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (t.dtype, t.shape) == (u.dtype, u.shape), name
        assert np.array_equal(t.data, u.data), name  # quantized blocks byte for byte


# ------------------------------------------------------------------------------------------------
# inspect


def test_inspect_text(gemma):
    m, path = gemma
    out = run("inspect", path).stdout
    assert "gemma3: 6 layers, hidden 256, ffn 512, heads 4 (kv 2) x 128" in out
    assert "byte-level BPE (gpt2)" in out and f"{len(m.tokenizer.tokens)} tokens" in out
    assert f"tensors    {len(m.tensors)}" in out
    assert "sliding window 8 (every 6th layer global)" in out and "gelu_tanh" in out
    for dtype in ("Q4_K", "Q6_K", "Q8_0", "Q5_0", "F32"):
        count = sum(t.dtype.name == dtype for t in m.tensors.values())
        assert any(line.split()[:2] == [dtype, str(count)] for line in out.splitlines()), dtype
    assert "GPU memory estimate, batch 1 x seq 2048" in out and "assumptions" in out


def test_inspect_json_and_estimate(gemma):
    m, path = gemma
    r = json.loads(run("inspect", path, "--json", "--batch", 3, "--seq", 100).stdout)
    c = m.config
    assert r["config"] == dataclasses.asdict(c) and r["format"] == "gguf" and r["tensor_count"] == len(m.tensors)
    assert r["tokenizer"]["model"] == "gpt2" and r["tokenizer"]["tokens"] == c.vocab_size
    for name in {t.dtype.name for t in m.tensors.values()}:
        ts = [t for t in m.tensors.values() if t.dtype.name == name]
        assert r["dtypes"][name] == {"count": len(ts), "bytes": sum(t.data.size for t in ts)}
    mem, n = r["memory"], 3 * 100
    b = mem["bytes"]
    assert (mem["batch"], mem["seq"]) == (3, 100)
    assert b["weights"] == sum(t.data.size for t in m.tensors.values())
    assert b["kv_cache_fp16"] == 2 * c.n_layers * n * c.n_kv_heads * c.head_dim * 2 == b["kv_cache_fp32"] // 2
    assert b["logits_fp32"] == n * c.vocab_size * 4 == 2 * b["logits_fp16"]
    from q4k_engine.kernels.matmul import SCRATCH_BYTES

    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_token = 2 * c.hidden + max(2 * q_dim + 2 * kv_dim, -(-c.ffn // 2))
    assert b["activations_fp32"] == n * per_token * 4 + 2 * SCRATCH_BYTES
    assert mem["total_fp16"] == b["weights"] + b["kv_cache_fp16"] + b["activations_fp32"] + b["logits_fp16"]
    assert mem["total_fp32"] > mem["total_fp16"] and len(mem["assumptions"]) >= 4


def test_inspect_without_tokenizer(gemma, tmp_path):
    bare = dataclasses.replace(gemma[0], tokenizer=None, config=dataclasses.replace(gemma[0].config, context_length=0))
    out = run("inspect", save_model(tmp_path / "bare.apr", bare, "apr", keep_ggml_codes=True)).stdout
    assert "tokenizer  none" in out and "context unknown" in out


def test_inspect_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("Q4K_CACHE", str(tmp_path))
    r = json.loads(run("inspect", "demo", "--json").stdout)
    assert r["config"]["arch"] == "llama" and Path(r["path"]).parent == tmp_path


# ------------------------------------------------------------------------------------------------
# convert


def test_convert_gguf_to_apr_and_back(gemma, tmp_path):
    m, path = gemma
    apr = tmp_path / "g.apr"
    r = run("convert", path, apr, "--keep-ggml-codes")  # byte for byte (tests/test_convert.py: portable types)
    assert "wrote" in r.stdout and str(apr) in r.stdout
    assert "note: Q5_0, Q8_0 tensors keep their GGML dtype codes" in r.stderr
    raw = read_apr(apr)
    assert "model.layers.0.pre_feedforward_layernorm.weight" in raw.tensors and "lm_head.weight" in raw.tensors
    assert raw.metadata[DTYPE_CODES_KEY] == "ggml"  # Q8_0/Q5_0 kept under their GGML codes
    src = open_model(path)
    assert_same_model(src, open_model(apr))
    # APR -> APR with GGUF names and no materialized head; APR -> GGUF
    apr2 = tmp_path / "g2.apr"
    run("convert", apr, apr2, "--names", "gguf", "--no-lm-head", "--keep-ggml-codes")
    raw2 = read_apr(apr2)
    assert "blk.0.ffn_norm.weight" in raw2.tensors and "output.weight" not in raw2.tensors
    assert_same_model(src, open_model(apr2))
    back = tmp_path / "back.bin"
    run("convert", apr2, back, "--to", "gguf")
    assert open_model(back).format == "gguf"
    assert_same_model(src, open_model(back))


def _float_model(m: ModelFile, dtype: GGMLType) -> ModelFile:
    tensors = {n: QTensor(n, dtype, t.shape, quantize(dequantize(t.data, t.dtype, t.shape), dtype)) for n, t in m.tensors.items()}
    return dataclasses.replace(m, tensors=tensors)


def test_convert_quantize_q4_k_m(tmp_path, rng):
    m = synthetic_model("qwen3", seed=int(rng.integers(1 << 31)))
    src = save_model(tmp_path / "f16.gguf", _float_model(m, GGMLType.F16), "gguf")
    out = tmp_path / "q.apr"
    assert "note:" not in run("convert", src, out, "--quantize", "q4_k_m").stderr
    q = open_model(out)
    assert DTYPE_CODES_KEY not in read_apr(out).metadata  # K-quants and F32 only: the portable codes
    c = q.config
    assert c == m.config
    for name, t in q.tensors.items():
        want = GGMLType.F32 if len(t.shape) == 1 else q4_k_m_type(name, t.cols, c.n_layers, c.tied_head)
        assert t.dtype == want, name
    assert {t.dtype for t in q.tensors.values()} == {GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F32}
    # quantized sources are copied, not re-quantized
    requant = tmp_path / "again.apr"
    run("convert", out, requant, "--quantize", "q4_k_m")
    assert_same_model(q, open_model(requant))


# ------------------------------------------------------------------------------------------------
# errors: one line on stderr, exit code 2, no traceback


def _corrupt(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def apr_file(gemma, tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("a") / "g.apr", gemma[0], "apr", keep_ggml_codes=True)


BAD_FILES = {
    "wrong magic": (lambda d: d.__setitem__(slice(0, 4), b"ZZZZ"), "not a GGUF or APR"),
    "truncated": (lambda d: d.__delitem__(slice(-1000, None)), "past the end"),
    "truncated metadata": (lambda d: d.__delitem__(slice(3000, None)), "truncated: APR metadata"),
    "bad header CRC": (lambda d: d.__setitem__(50, d[50] ^ 0xFF), "CRC mismatch"),
    "refused flag": (lambda d: d.__setitem__(6, d[6] | 0x04), "ENCRYPTED"),
    "data past EOF": (lambda d: (struct.pack_into("<Q", d, 32, 1 << 45), struct.pack_into("<I", d, 40, 0)), "data offset"),
    "huge tensor count": (lambda d: (struct.pack_into("<I", d, 8, 1 << 30), struct.pack_into("<I", d, 40, 0)), "tensor count"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_exit_2(apr_file, tmp_path, case):
    edit, text = BAD_FILES[case]
    bad = _corrupt(apr_file, tmp_path / "bad.apr", edit)
    for args in (["inspect", bad], ["convert", bad, tmp_path / "out.apr"]):
        r = run(*args, ok=False)
        assert r.exit_code == 2, (r.stdout, r.stderr, r.exception)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("q4k-engine: error: ") and str(bad) in lines[0] and text in lines[0]
        assert "Traceback" not in r.output and r.stdout == ""
    assert not (tmp_path / "out.apr").exists()


def test_cli_input_errors(apr_file, tmp_path):
    cases = [
        (["inspect", tmp_path / "missing.gguf"], "no such model file"),
        (["convert", apr_file, apr_file], "refusing to overwrite"),
        (["convert", apr_file, tmp_path / "no-dir" / "x.apr"], "does not exist"),
    ]
    for args, text in cases:
        r = run(*args, ok=False)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and text in r.stderr, r.stderr
    r = run("inspect", apr_file, "--batch", 0, ok=False)
    assert r.exit_code == 2  # click's own usage error


def test_real_subprocess_error(apr_file, tmp_path):
    bad = _corrupt(apr_file, tmp_path / "bad.apr", lambda d: d.__delitem__(slice(100, None)))
    proc = subprocess.run(
        [sys.executable, "-m", "q4k_engine.cli.main", "inspect", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"q4k-engine: error: {bad}: ")
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# the real models (architectures.md's table)


REAL = {
    "gemma": (dict(arch="gemma3", n_layers=18, hidden=640, n_heads=4, n_kv_heads=1, head_dim=256, vocab_size=262144,
                   sliding_window=512, tied_head=True),
              {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}, "llama"),
    "smollm": (dict(arch="llama", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
                    rope_theta=1e5, tied_head=True),
               {"F32": 61, "Q4_1": 210, "Q8_0": 1}, "gpt2"),
}


@pytest.mark.parametrize("which", sorted(REAL))
def test_real_model_inspect_and_convert(which, tmp_path):
    from realmodels import gemma_path, smollm_path

    path = {"gemma": gemma_path, "smollm": smollm_path}[which]()
    expect_config, expect_types, tok_model = REAL[which]
    r = json.loads(run("inspect", path, "--json").stdout)
    assert {k: r["config"][k] for k in expect_config} == expect_config
    assert {k: v["count"] for k, v in r["dtypes"].items()} == expect_types
    assert r["tokenizer"]["model"] == tok_model and r["tokenizer"]["tokens"] == expect_config["vocab_size"]
    out = tmp_path / f"{which}.apr"
    run("convert", path, out, "--keep-ggml-codes")
    assert_same_model(open_model(path), open_model(out))
