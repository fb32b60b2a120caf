"""GGUF reader/writer: agreement with llama.cpp's gguf-py, and one-line errors on corrupt files."""
from __future__ import annotations

import struct
import time

import gguf
import numpy as np
import pytest

from q4k_engine.dtypes import GGMLType, tensor_bytes
from q4k_engine.errors import FormatError, UnsupportedError
from q4k_engine.gguf_file import read_gguf, write_gguf
from q4k_engine.tensors import QTensor

VT = gguf.GGUFValueType


# ------------------------------------------------------------------------------------------------
# an independent minimal GGUF builder, so tests can write what no writer would


def s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def u32(key: str, v: int) -> bytes:
    return kv(key, VT.UINT32, struct.pack("<I", v))


def strs(key: str, items: list[str], count: int | None = None) -> bytes:
    return kv(key, VT.ARRAY, struct.pack("<IQ", VT.STRING, len(items) if count is None else count) + b"".join(map(s, items)))


def info(name: str, ne: tuple[int, ...], code: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", code, offset)


def build(kvs: list[bytes], infos: list[bytes], data: bytes, *, version: int = 3, magic: bytes = b"GGUF", align: int = 32) -> bytes:
    out = magic + struct.pack("<IQQ", version, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return out + bytes(-len(out) % align) + data


BASE_KV = [kv("general.architecture", VT.STRING, s("llama")), u32("llama.block_count", 1), strs("tokenizer.ggml.tokens", ["a", "b"])]
BASE_INFO = [info("w", (32, 2), GGMLType.Q8_0, 0), info("n", (4,), GGMLType.F32, 96)]
BASE_DATA = bytes(range(68)) + bytes(28) + np.arange(4, dtype="<f4").tobytes()


def base(**kw) -> bytes:
    return build(kw.pop("kvs", BASE_KV), kw.pop("infos", BASE_INFO), kw.pop("data", BASE_DATA), **kw)


def write(tmp_path, data: bytes, name: str = "m.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def expect_error(path, error, *parts):
    with pytest.raises(error) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


# ------------------------------------------------------------------------------------------------


def test_base_file_reads(tmp_path):
    f = read_gguf(write(tmp_path, base()))
    assert f.metadata == {"general.architecture": "llama", "llama.block_count": 1, "tokenizer.ggml.tokens": ["a", "b"]}
    w, n = f.tensors["w"], f.tensors["n"]
    assert (w.dtype, w.shape, n.dtype, n.shape) == (GGMLType.Q8_0, (2, 32), GGMLType.F32, (4,))  # ne reversed
    assert w.data.tobytes() == BASE_DATA[:68] and n.data.view("<f4").tolist() == [0, 1, 2, 3]
    assert np.shares_memory(w.data, f.buffer)


def test_writer_matches_gguf_reader(tmp_path, rng):
    shapes = {GGMLType.Q4_K: (3, 512), GGMLType.Q6_K: (2, 256), GGMLType.Q8_0: (5, 64), GGMLType.Q5_0: (2, 32),
              GGMLType.Q4_1: (1, 96), GGMLType.F16: (3, 7), GGMLType.BF16: (2, 5), GGMLType.F32: (11,)}
    tensors = [
        QTensor(f"t.{dt.name}", dt, shape, rng.integers(0, 256, tensor_bytes(dt, shape), dtype=np.uint8))
        for dt, shape in shapes.items()
    ]
    meta = {
        "general.architecture": "qwen2", "general.name": "tést", "qwen2.block_count": 3,
        "qwen2.rope.freq_base": 1e6, "tokenizer.ggml.tokens": ["x", "y", "z"], "tokenizer.ggml.scores": [0, -1.5, 2],
        "tokenizer.ggml.token_type": [1, 1, 3], "tokenizer.ggml.add_bos_token": True, "big": -(2**40), "empty": [],
    }
    p = write_gguf(tmp_path / "o.gguf", meta, tensors)
    ours = read_gguf(p)
    ref = gguf.GGUFReader(p)
    types = {k: f.types for k, f in ref.fields.items()}
    assert types["qwen2.block_count"] == [VT.UINT32]
    assert types["qwen2.rope.freq_base"] == [VT.FLOAT32]
    assert types["tokenizer.ggml.token_type"] == [VT.ARRAY, VT.INT32]
    assert types["tokenizer.ggml.scores"] == [VT.ARRAY, VT.FLOAT32]
    assert types["tokenizer.ggml.add_bos_token"] == [VT.BOOL]
    assert types["big"] == [VT.INT64]
    assert "empty" not in ref.fields  # GGUF cannot store an empty array
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == field.contents(), key
    assert ours.metadata["tokenizer.ggml.scores"] == [0.0, -1.5, 2.0]
    assert len(ref.tensors) == len(tensors)
    for r in ref.tensors:
        t, src = ours.tensors[r.name], next(x for x in tensors if x.name == r.name)
        assert int(r.tensor_type) == int(t.dtype) == int(src.dtype)
        assert tuple(reversed(r.shape.tolist())) == t.shape == src.shape
        assert r.data.tobytes() == t.data.tobytes() == src.data.tobytes()


def test_bad_magic_and_versions(tmp_path):
    expect_error(write(tmp_path, base(magic=b"GGUX")), FormatError, "not a GGUF")
    expect_error(write(tmp_path, base(version=1), "v1.gguf"), UnsupportedError, "version 1")
    expect_error(write(tmp_path, base(version=3 << 24), "be.gguf"), UnsupportedError, "big-endian")


def test_truncation_everywhere(tmp_path):
    full = base()
    for cut in range(0, len(full) - 1, 5):
        expect_error(write(tmp_path, full[:cut], f"cut{cut}.gguf"), FormatError, "empty file" if cut == 0 else "")


def test_huge_counts_fail_fast(tmp_path):
    cases = {
        "array": base(kvs=[*BASE_KV[:2], strs("tokenizer.ggml.tokens", ["a", "b"], count=1 << 62)]),
        "numeric array": base(kvs=[kv("x", VT.ARRAY, struct.pack("<IQ", VT.INT32, 1 << 61))]),
        "string": base(kvs=[kv("x", VT.STRING, struct.pack("<Q", 1 << 60))]),
        "kv count": base()[:8] + struct.pack("<QQ", 2, 1 << 60) + base()[24:],
        "tensor count": base()[:8] + struct.pack("<QQ", 1 << 59, 3) + base()[24:],
    }
    for what, data in cases.items():
        t0 = time.perf_counter()
        expect_error(write(tmp_path, data, "huge.gguf"), FormatError)
        assert time.perf_counter() - t0 < 1.0, what


def test_bad_values_and_duplicates(tmp_path):
    cases = [
        (base(kvs=[kv("x", 99, b"")]), FormatError, "unknown value type 99"),
        (base(kvs=[kv("x", VT.ARRAY, struct.pack("<IQ", 77, 1))]), FormatError, "unknown array item type 77"),
        (base(kvs=[*BASE_KV, u32("llama.block_count", 2)]), FormatError, "duplicate metadata key llama.block_count"),
        (base(kvs=[kv("bad", VT.STRING, s("x")[:8] + b"\xff")]), FormatError, "UTF-8"),
        (base(kvs=[*BASE_KV, u32("general.alignment", 24)]), FormatError, "general.alignment"),
        (base(infos=[BASE_INFO[0], BASE_INFO[0]]), FormatError, "duplicate tensor name"),
    ]
    for i, (data, error, text) in enumerate(cases):
        expect_error(write(tmp_path, data, f"b{i}.gguf"), error, text)


def test_bad_tensor_infos(tmp_path):
    cases = [
        (info("w", (32, 2), 200, 0), FormatError, "unknown dtype code 200"),
        (info("w", (256, 1), 16, 0), UnsupportedError, "IQ2_XXS"),
        (info("w", (32, 2), GGMLType.Q8_1, 0), UnsupportedError, "Q8_1"),
        (info("w", (20, 2), GGMLType.Q8_0, 0), FormatError, "not a multiple"),
        (info("w", (32, 2), GGMLType.Q8_0, 8), FormatError, "alignment"),
        (info("w", (32, 2), GGMLType.Q8_0, 1 << 40), FormatError, "past the end"),
        (info("w", (32, 2 << 40), GGMLType.Q8_0, 0), FormatError, "past the end"),
        (info("w", (32, 0), GGMLType.Q8_0, 0), FormatError, "zero"),
        (s("w") + struct.pack("<I", 9) + bytes(80), FormatError, "absurd number of dims 9"),
    ]
    for i, (bad, error, text) in enumerate(cases):
        expect_error(write(tmp_path, base(infos=[bad, BASE_INFO[1]]), f"t{i}.gguf"), error, "tensor w", text)


# ------------------------------------------------------------------------------------------------
# the real models, against gguf-py's reader


@pytest.mark.parametrize("which", ["smollm", "gemma"])
def test_real_models_match_gguf_reader(which):
    from realmodels import gemma_path, smollm_path

    path = {"smollm": smollm_path, "gemma": gemma_path}[which]()
    ours = read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert len(ours.tensors) == len(ref.tensors)
    for r in ref.tensors:
        t = ours.tensors[r.name]
        assert int(r.tensor_type) == int(t.dtype)
        assert tuple(reversed(r.shape.tolist())) == t.shape
        start = t.data.__array_interface__["data"][0] - ours.buffer.__array_interface__["data"][0]
        assert start == r.data_offset and t.data.size == r.n_bytes
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == VT.ARRAY:  # both ends of long arrays: gguf-py decodes items one by one
            assert len(ours.metadata[key]) == len(field.data), key
            assert ours.metadata[key][:64] == field.contents(slice(0, 64)), key
            assert ours.metadata[key][-64:] == field.contents(slice(-64, None)), key
        else:
            assert ours.metadata[key] == field.contents(), key
