"""convert: portable APR types, Q4_K_M re-quantization, metadata carried through GGUF -> APR -> GGUF.

Synthetic models (seed printed) for the rules; the real Gemma 3 270M for what a user converts:
every dtype code of its APR is portable, its logits match the GGUF's, and every `general.*` /
`tokenizer.*` key survives GGUF -> APR -> GGUF (read back with llama.cpp's own gguf package).
"""
from __future__ import annotations

import dataclasses
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import q4k_engine
from q4k_engine.apr import DTYPE_CODES_KEY, PORTABLE, read_apr
from q4k_engine.binio import human_bytes
from q4k_engine.cli.main import main
from q4k_engine.convert import (
    carried_metadata,
    portable_type,
    q4_k_m_type,
    requantize,
    save_model,
    to_portable,
)
from q4k_engine.dtypes import GGMLType
from q4k_engine.errors import InputError, Q4KWarning
from q4k_engine.loader import open_model
from q4k_engine.quants import dequantize, quantize
from q4k_engine.synthetic import synthetic_model
from q4k_engine.tensors import ModelFile, QTensor

from conftest import fresh_seed
from hf_reference import TABLE_HEADER, parity, table_row

PORTABLE_CODES = {0, 1, 12, 14, 30}


def apr_index_codes(path: Path) -> dict[str, int]:
    """Tensor name -> dtype code, read straight from the APR index (apr-v2-format.md §2, §4.1),
    independently of the engine's reader."""
    data = path.read_bytes()
    count = struct.unpack_from("<I", data, 8)[0]
    pos = struct.unpack_from("<Q", data, 24)[0]
    codes = {}
    for _ in range(count):
        n = struct.unpack_from("<H", data, pos)[0]
        name = data[pos + 2 : pos + 2 + n].decode()
        code, ndim = struct.unpack_from("<BB", data, pos + 2 + n)
        codes[name] = code
        pos += 2 + n + 2 + 8 * ndim + 16
    return codes


def run(*args: Any, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def values(t: QTensor) -> np.ndarray:
    return dequantize(t.data, t.dtype, t.shape)


@pytest.fixture(scope="module")
def models() -> dict[str, ModelFile]:
    seed = fresh_seed("test_convert synthetic models")
    return {
        "llama": synthetic_model("llama", seed=seed),  # attn_q Q4_1 (rows of 256)
        "qwen2": synthetic_model("qwen2", seed=seed),  # attn_k Q8_0 (rows of 256)
        # hidden 320: Q8_0 embedding and Q5_0 attn_k, rows that are not whole 256-blocks
        "gemma3": synthetic_model("gemma3", seed=seed, hidden=320, n_layers=2),
    }


# ------------------------------------------------------------------------------------------------
# portable APR types


def test_portable_type_rule():
    assert portable_type((640,)) == GGMLType.F32
    assert portable_type((1024, 640)) == GGMLType.F16
    assert portable_type((640, 2048)) == GGMLType.F16  # rows a K-quant could hold: F16 all the same
    assert portable_type((8, 4, 256)) == GGMLType.F16


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_apr_holds_portable_codes_by_default(models, arch, tmp_path):
    m = models[arch]
    foreign = {n: t for n, t in m.tensors.items() if t.dtype not in PORTABLE}
    assert foreign  # the synthetic models carry Q4_1 / Q8_0 / Q5_0 tensors
    portable, report = to_portable(m)
    assert {r.name for r in report} == set(foreign)
    for r in report:
        src, new = foreign[r.name], portable.tensors[r.name]
        assert (r.source, r.target, new.dtype, new.shape) == (src.dtype, portable_type(src.shape), r.target, src.shape)
        assert r.max_abs_change == np.abs(values(new) - values(src)).max()  # the reported change is the real one
        assert r.max_abs_change <= 2**-11 * np.abs(values(src)).max(), r  # F16's rounding, no more
    assert all(portable.tensors[n] is t for n, t in m.tensors.items() if n not in foreign)

    with pytest.warns(Q4KWarning, match=f"re-encoded {len(report)} tensors"):
        path = save_model(tmp_path / "m.apr", m, "apr")
    assert set(apr_index_codes(path).values()) <= PORTABLE_CODES
    assert DTYPE_CODES_KEY not in read_apr(path).metadata
    opened = open_model(path)
    assert opened.config == m.config
    for name, t in portable.tensors.items():
        assert (opened.tensors[name].dtype, np.array_equal(opened.tensors[name].data, t.data)) == (t.dtype, True), name


def test_keep_ggml_codes(models, tmp_path):
    m = models["gemma3"]
    path = save_model(tmp_path / "m.apr", m, "apr", keep_ggml_codes=True)
    codes = apr_index_codes(path)
    assert codes["model.embed_tokens.weight"] == GGMLType.Q8_0 and read_apr(path).metadata[DTYPE_CODES_KEY] == "ggml"
    opened = open_model(path)
    assert all(np.array_equal(opened.tensors[n].data, t.data) and opened.tensors[n].dtype == t.dtype
               for n, t in m.tensors.items())


def test_f16_out_of_range_becomes_f32(models):
    m = models["gemma3"]
    big = np.linspace(-1e5, 1e5, 4 * 320, dtype=np.float32).reshape(4, 320)
    t = QTensor("blk.0.attn_k.weight", GGMLType.Q8_0, big.shape, quantize(big, GGMLType.Q8_0))
    model = dataclasses.replace(m, tensors={t.name: t})
    out, report = to_portable(model)
    assert report[0].target == out.tensors[t.name].dtype == GGMLType.F32
    assert np.array_equal(values(out.tensors[t.name]), values(t))


def test_cli_convert_reports_reencoding(models, tmp_path):
    src = save_model(tmp_path / "g.gguf", models["gemma3"], "gguf")
    out = tmp_path / "g.apr"
    r = run("convert", src, out)
    foreign = sorted(n for n, t in models["gemma3"].tensors.items() if t.dtype not in PORTABLE)
    for name in foreign:
        t = models["gemma3"].tensors[name]
        assert f"re-encoded {name}: {t.dtype.name} -> F16 (largest change " in r.stdout
    assert f"re-encoded {len(foreign)} tensors to portable APR types" in r.stdout
    assert "largest absolute change of any weight: " in r.stdout
    assert f"size {human_bytes(src.stat().st_size)} -> {human_bytes(out.stat().st_size)}" in r.stdout
    assert r.stderr == "" and set(apr_index_codes(out).values()) <= PORTABLE_CODES

    kept = tmp_path / "kept.apr"
    r = run("convert", src, kept, "--keep-ggml-codes")
    assert "re-encoded" not in r.stdout
    assert "Q5_0, Q8_0 tensors keep their GGML dtype codes" in r.stderr and "only q4k-engine reads this file" in r.stderr
    assert {GGMLType.Q8_0, GGMLType.Q5_0} <= set(apr_index_codes(kept).values())
    assert "ONLY q4k-engine reads such a file" in " ".join(run("convert", "--help").stdout.split())
    r = run("convert", src, tmp_path / "x.gguf", "--keep-ggml-codes", ok=False)
    assert r.exit_code == 2 and "APR output only" in r.stderr and not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------------------
# --quantize q4_k_m


def test_q4_k_m_policy_matches_llama_cpp_counts():
    # Gemma 3 270M Q4_K_M (architectures.md): 18 layers, 9 ffn_down tensors in Q6_K.
    n = 18
    down = Counter(q4_k_m_type(f"blk.{i}.ffn_down.weight", 2048, n, True) for i in range(n))
    assert down == {GGMLType.Q6_K: 9, GGMLType.Q4_K: 9}
    assert q4_k_m_type("output.weight", 4096, n, False) == GGMLType.Q6_K
    assert q4_k_m_type("token_embd.weight", 4096, n, True) == GGMLType.Q6_K
    assert q4_k_m_type("token_embd.weight", 4096, n, False) == GGMLType.Q4_K
    # rows that K-quants cannot hold: F16, never Q8_0/Q5_0 (codes other APR readers misread)
    assert q4_k_m_type("blk.3.attn_q.weight", 640, n, True) == GGMLType.F16
    assert q4_k_m_type("output.weight", 100, n, True) == GGMLType.F16


def _as_float(model: ModelFile, dtype: GGMLType) -> ModelFile:
    tensors = {n: QTensor(n, dtype, t.shape, quantize(values(t), dtype)) for n, t in model.tensors.items()}
    return dataclasses.replace(model, tensors=tensors)


@pytest.mark.parametrize("dtype", [GGMLType.F32, GGMLType.BF16])
def test_requantize(models, dtype):
    src = _as_float(models["qwen2"], dtype)
    src.tensors["blk.0.attn_v.weight"] = models["qwen2"].tensors["blk.0.attn_v.weight"]  # already quantized
    q = requantize(src, "q4_k_m")
    cfg = q.config
    for name, t in q.tensors.items():
        if name == "blk.0.attn_v.weight":
            assert t is src.tensors[name]
        elif len(t.shape) == 1:
            assert t.dtype == GGMLType.F32
        else:
            assert t.dtype == q4_k_m_type(name, t.cols, cfg.n_layers, cfg.tied_head)
            x, y = values(src.tensors[name]), values(t)
            assert np.sqrt(np.mean((x - y) ** 2)) < 0.15 * np.sqrt(np.mean(x**2)), name
    with pytest.raises(InputError):
        requantize(src, "q2_k")


def test_quantize_hidden_640_is_portable(tmp_path):
    # Gemma 3 270M's hidden size: no K-quant holds its rows; today's fallback must not be Q8_0.
    m = synthetic_model("gemma3", seed=fresh_seed("hidden 640"), hidden=640, n_layers=2)
    src = save_model(tmp_path / "f16.gguf", _as_float(m, GGMLType.F16), "gguf")
    out = tmp_path / "q.apr"
    r = run("convert", src, out, "--quantize", "q4_k_m")
    assert "re-encoded" not in r.stdout and r.stderr == ""  # nothing left to re-encode
    codes = apr_index_codes(out)
    assert set(codes.values()) <= PORTABLE_CODES and DTYPE_CODES_KEY not in read_apr(out).metadata
    q = open_model(out)
    assert Counter(t.dtype for n, t in q.tensors.items() if t.cols == 640 and len(t.shape) == 2)[GGMLType.F16] > 0
    c = q.config
    for name, t in q.tensors.items():
        assert t.dtype == (GGMLType.F32 if len(t.shape) == 1 else q4_k_m_type(name, t.cols, c.n_layers, c.tied_head)), name
    gguf_out = tmp_path / "q.gguf"
    run("convert", src, gguf_out, "--quantize", "q4_k_m")
    assert {t.dtype for t in open_model(gguf_out).tensors.values()} <= PORTABLE


# ------------------------------------------------------------------------------------------------
# metadata through GGUF -> APR -> GGUF


def gguf_fields(path: Path, prefixes: tuple[str, ...] = ("general.", "tokenizer.")) -> dict[str, tuple]:
    """key -> (value types, value) of every key with one of `prefixes`, read with gguf-py."""
    reader = gguf.GGUFReader(path)
    return {k: (tuple(f.types), f.contents()) for k, f in reader.fields.items() if k.startswith(prefixes)}


EXTRA_KEYS = {
    "general.license": "apache-2.0",
    "general.tags": ["a", "b"],
    "general.quantization_version": 2,
    "tokenizer.ggml.add_space_prefix": False,
    "tokenizer.ggml.add_eos_token": True,
    "tokenizer.ggml.add_sep_token": False,
    "tokenizer.ggml.unknown_token_id": 3,
    "tokenizer.ggml.padding_token_id": 0,
    "tokenizer.chat_template.tool_use": "{{ tools }}",
}


def test_metadata_round_trip(models, tmp_path):
    m = models["qwen2"]
    m = dataclasses.replace(m, metadata={**m.metadata, **EXTRA_KEYS})
    first = save_model(tmp_path / "a.gguf", m, "gguf")
    apr = tmp_path / "a.apr"
    run("convert", first, apr)
    meta = read_apr(apr).metadata
    # aprender's own spellings where it has a field, GGUF's otherwise
    assert meta["tokenizer.padding_token_id"] == 0 and meta["name"] == "synthetic-qwen2"
    assert meta["tokenizer.ggml.add_space_prefix"] is False and meta["general.tags"] == ["a", "b"]
    back = tmp_path / "b.gguf"
    run("convert", apr, back)
    want, got = gguf_fields(first), gguf_fields(back)
    assert set(EXTRA_KEYS) <= set(want)
    for key, value in want.items():
        assert got.get(key) == value, key
    assert carried_metadata(open_model(apr)) == carried_metadata(open_model(first))


# ------------------------------------------------------------------------------------------------
# the real Gemma 3 270M


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> dict[str, Any]:
    from realmodels import gemma_path

    src = gemma_path()
    d = tmp_path_factory.mktemp("gemma")
    apr, back = d / "gemma.apr", d / "back.gguf"
    report = run("convert", src, apr).stdout
    run("convert", apr, back)
    return {"src": src, "apr": apr, "back": back, "report": report}


@pytest.mark.slow
def test_gemma_apr_is_portable_and_reported(gemma):
    codes = apr_index_codes(gemma["apr"])
    assert set(codes.values()) <= PORTABLE_CODES, Counter(codes.values())
    assert DTYPE_CODES_KEY not in read_apr(gemma["apr"]).metadata
    src = open_model(gemma["src"])
    foreign = {n for n, t in src.tensors.items() if t.dtype not in PORTABLE}
    assert len(foreign) == 91  # 81 Q5_0 + 10 Q8_0 (architectures.md)
    lines = [l for l in gemma["report"].splitlines() if l.startswith("re-encoded ") and " -> " in l]
    assert {l.split()[1].rstrip(":") for l in lines} == foreign and all(" -> F16 " in l for l in lines)
    print(gemma["report"].splitlines()[-2:])


@pytest.mark.slow
def test_gemma_apr_logits_match_gguf(gemma):
    ref_model = q4k_engine.load(gemma["src"], device="cpu")
    ids = ref_model.encode("The capital of France is Paris, and the capital of Italy is")
    ref = ref_model.logits_per_position([ids])[0][0]
    del ref_model
    ours = q4k_engine.load(gemma["apr"], device="cpu").logits_per_position([ids])[0][0]
    p = parity([ref], [ours])
    print(TABLE_HEADER, table_row("gemma3-270m GGUF vs portable APR", p), sep="\n")
    assert len(ids) >= 12 and p.kld.mean <= 1e-4 and p.same_top_p == 1.0, p


@pytest.mark.slow
def test_gemma_round_trip_keeps_general_and_tokenizer_keys(gemma):
    want, got = gguf_fields(gemma["src"]), gguf_fields(gemma["back"])
    for key in ("tokenizer.ggml.add_space_prefix", "tokenizer.ggml.unknown_token_id", "general.license"):
        assert key in want
    missing = sorted(k for k in want if k not in got)
    assert not missing, missing
    for key, value in want.items():
        assert got[key] == value, key
