"""Property: a mutated model file (flipped bytes, overwritten fields, truncation) either loads
cleanly into consistent tensors or fails with a one-line Q4KError — never another exception,
never a hang, never an out-of-bounds read."""
from __future__ import annotations

import itertools
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from q4k_engine.apr import read_apr
from q4k_engine.dtypes import TYPE_INFO
from q4k_engine.errors import Q4KError
from q4k_engine.gguf_file import read_gguf
from q4k_engine.loader import open_model
from q4k_engine.quants import dequantize_rows
from q4k_engine.synthetic import write_synthetic

TINY = dict(hidden=64, ffn=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, n_merges=8)
SETTINGS = settings(max_examples=int(os.environ.get("Q4K_FUZZ_EXAMPLES", 400)), deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def originals(workdir) -> dict[str, tuple[bytes, int]]:
    """Each format's valid file and the length of its structural prefix (header, metadata,
    index), where mutations are most interesting."""
    apr = write_synthetic(workdir / "base.apr", "qwen2", "apr", seed=1, keep_ggml_codes=True, **TINY)
    gguf = write_synthetic(workdir / "base.gguf", "gemma3", "gguf", seed=2, **TINY)
    apr_prefix = read_apr(apr).header.data_offset
    g = read_gguf(gguf)
    base = g.buffer.__array_interface__["data"][0]
    gguf_prefix = min(t.data.__array_interface__["data"][0] for t in g.tensors.values()) - base
    return {"apr": (apr.read_bytes(), apr_prefix), "gguf": (gguf.read_bytes(), gguf_prefix)}


@st.composite
def mutations(draw, size: int, prefix: int):
    anywhere, structural = st.integers(0, size - 1), st.integers(0, prefix - 1)
    ops = draw(st.lists(
        st.one_of(
            st.tuples(st.just("xor"), st.one_of(structural, anywhere), st.integers(1, 255)),
            st.tuples(st.just("put"), structural, st.binary(min_size=1, max_size=8)),
        ),
        min_size=1, max_size=6,
    ))
    cut = draw(st.one_of(st.none(), anywhere))
    fix_crc = draw(st.booleans())  # re-seal the APR header so the mutation reaches the deeper checks
    return ops, cut, fix_crc


def mutate(data: bytes, ops, cut, fix_crc: bool) -> bytes:
    out = bytearray(data)
    for op, pos, arg in ops:
        if op == "xor":
            out[pos] ^= arg
        else:
            out[pos : pos + len(arg)] = arg
    if fix_crc and out[:3] == b"APR" and len(out) >= 64:
        struct.pack_into("<I", out, 40, zlib.crc32(bytes(out[:40] + out[44:64])))
    return bytes(out if cut is None else out[:cut])


_names = itertools.count()


def check_outcome(workdir: Path, data: bytes, suffix: str) -> None:
    path = workdir / f"m{next(_names)}{suffix}"
    path.write_bytes(data)
    try:
        model = open_model(path)
    except Q4KError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        assert "internal" not in msg, f"a corrupt file slipped past the checks: {msg}"
        return
    finally:
        path.unlink()
    for t in model.tensors.values():  # a clean load is a usable one
        assert t.dtype in TYPE_INFO and t.data.size == t.nbytes
        dequantize_rows(t, 0, 1)


@pytest.mark.parametrize("fmt", ["apr", "gguf"])
def test_mutated_files(originals, workdir, fmt):
    data, prefix = originals[fmt]

    @SETTINGS
    @given(mutations(len(data), prefix))
    def prop(m):
        check_outcome(workdir, mutate(data, *m), f".{fmt}")

    prop()


def test_originals_load(originals, workdir):
    for fmt, (data, _) in originals.items():
        check_outcome(workdir, data, f".{fmt}")
