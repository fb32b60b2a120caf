"""APR v2 container: golden bytes, layout rules, CRCs, flags, dtype codes, metadata aliases."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from q4k_engine.apr import (
    DTYPE_CODES_KEY,
    FLAG_ROW_MAJOR,
    REFUSED_FLAGS,
    TOKENIZER_FALLBACKS,
    TOKENIZER_KEYS,
    canonical_metadata,
    read_apr,
    write_apr,
)
from q4k_engine.dtypes import GGMLType, tensor_bytes
from q4k_engine.errors import FormatError, InputError, UnsupportedError
from q4k_engine.loader import tokenizer_from_metadata, tokenizer_to_metadata
from q4k_engine.quants import dequantize
from q4k_engine.tensors import QTensor, TokenizerSpec

# apr-v2-format.md §7.3, transcribed from the document.
GOLDEN = bytes.fromhex(
    "41 50 52 00 02 00 00 04 02 00 00 00 40 00 00 00 00 00 00 00 28 00 00 00 80 00 00 00 00 00 00 00"
    "c0 00 00 00 00 00 00 00 bd 18 bc d1 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"
) + b'{"architecture":"llama","hidden_size":8}' + bytes(24) + (
    bytes.fromhex("01 00 62 00 01 01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 04 00 00 00 00 00 00 00")
    + bytes.fromhex("01 00 77 00 01 02 00 00 00 00 00 00 00 40 00 00 00 00 00 00 00 08 00 00 00 00 00 00 00")
    + bytes(6)  # two 29-byte entries padded to 64 (the doc's "61 B" miscounts; its offsets and CRCs agree with 58)
) + bytes.fromhex("00 00 00 3f") + bytes(60) + bytes.fromhex("00 00 80 3f 00 00 00 40") + bytes(56) + bytes.fromhex(
    "a1 63 1a 8e"
)


def f32(name: str, values: list[float]) -> QTensor:
    return QTensor(name, GGMLType.F32, (len(values),), np.array(values, "<f4").view(np.uint8))


def craft(
    meta: dict | bytes,
    entries: list[tuple[str, int, tuple[int, ...], bytes]],
    *,
    flags: int = FLAG_ROW_MAJOR,
    magic: bytes = b"APR\0",
    crc: bool = True,
) -> bytes:
    """An APR file built straight from the spec's outline (§7.2), independent of engine.apr, with
    entries in the given order and any dtype code, so tests can build what the writer refuses."""
    meta_bytes = meta if isinstance(meta, bytes) else json.dumps(meta, separators=(",", ":")).encode()
    a64 = lambda n: -(-n // 64) * 64  # noqa: E731
    index, data = b"", b""
    for name, code, dims, raw in entries:
        nb = name.encode()
        index += struct.pack("<H", len(nb)) + nb + struct.pack("<BB", code, len(dims))
        index += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<QQ", len(data), len(raw))
        data += raw + bytes(a64(len(raw)) - len(raw))
    io = 64 + a64(len(meta_bytes))
    do = io + a64(len(index))
    header = bytearray(64)
    header[0:4], header[4], header[5] = magic, 2, 0
    struct.pack_into("<HIQIQQ", header, 6, flags, len(entries), 64, len(meta_bytes), io, do)
    if crc:
        struct.pack_into("<I", header, 40, zlib.crc32(bytes(header[:40] + header[44:])))
    out = bytes(header) + meta_bytes + bytes(io - 64 - len(meta_bytes)) + index + bytes(do - io - len(index)) + data
    return out + struct.pack("<I", zlib.crc32(out))


def write(tmp_path: Path, data: bytes, name: str = "m.apr") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def assert_one_line(e: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


# ------------------------------------------------------------------------------------------------
# layout


def test_golden_bytes(tmp_path):
    assert len(GOLDEN) == 324
    p = write_apr(tmp_path / "g.apr", {"architecture": "llama", "hidden_size": 8}, [f32("w", [1.0, 2.0]), f32("b", [0.5])])
    assert p.read_bytes() == GOLDEN
    # the spec's own outline reproduces it too
    w = np.array([1.0, 2.0], "<f4").tobytes()
    b = np.array([0.5], "<f4").tobytes()
    assert craft({"architecture": "llama", "hidden_size": 8}, [("b", 0, (1,), b), ("w", 0, (2,), w)]) == GOLDEN
    f = read_apr(p)
    assert f.header.checksum == 0xD1BC18BD and f.header.data_offset == 192
    assert f.tensors["w"].data.view("<f4").tolist() == [1.0, 2.0]


def _random_tensor(rng: np.random.Generator, name: str, dtype: GGMLType) -> QTensor:
    rows = int(rng.integers(1, 5))
    block = {GGMLType.Q4_K: 256, GGMLType.Q6_K: 256}.get(dtype, 32)
    cols = block * int(rng.integers(1, 3)) + (int(rng.integers(0, 7)) if dtype in (GGMLType.Q4_K, GGMLType.Q6_K) else 0)
    shape = (rows, cols) if rng.random() < 0.8 else (cols,)
    data = rng.integers(0, 256, tensor_bytes(dtype, shape), dtype=np.uint8)
    return QTensor(name, dtype, shape, data)


@pytest.mark.parametrize("portable", [True, False])
def test_roundtrip_layout(tmp_path, rng, portable):
    dtypes = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_K, GGMLType.Q6_K]
    if not portable:
        dtypes += [GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_1, GGMLType.Q4_0, GGMLType.Q5_K]
    names = [f"t{int(i)}.ä.weight" for i in rng.permutation(40)[: 3 * len(dtypes)]]
    tensors = [_random_tensor(rng, n, dtypes[i % len(dtypes)]) for i, n in enumerate(names)]
    meta = {"architecture": "llama", "name": "ünï", "num_layers": 3, "x": [1.5, None]}
    p = write_apr(tmp_path / "r.apr", meta, tensors)
    raw = p.read_bytes()
    f = read_apr(p)
    h = f.header
    assert raw[:4] == b"APR\0" and h.version == (2, 0) and h.flags == FLAG_ROW_MAJOR
    assert h.metadata_offset == 64 and h.tensor_index_offset % 64 == 0 and h.data_offset % 64 == 0
    assert struct.unpack("<I", raw[-4:])[0] == zlib.crc32(raw[:-4])
    assert h.checksum == zlib.crc32(raw[:40] + raw[44:64])
    expect_meta = dict(meta) if portable else {**meta, DTYPE_CODES_KEY: "ggml"}
    assert f.metadata == expect_meta
    assert list(f.tensors) == sorted(names)  # index order is byte order of the names
    starts = []
    for t in tensors:
        got = f.tensors[t.name]
        assert (got.dtype, got.shape) == (t.dtype, t.shape)
        assert np.array_equal(got.data, t.data)
        assert np.shares_memory(got.data, f.buffer) and not got.data.flags.writeable  # a view of the mapping
        start = got.data.__array_interface__["data"][0] - f.buffer.__array_interface__["data"][0]
        assert start % 64 == 0
        pad_end = start + -(-t.data.size // 64) * 64
        assert not any(raw[start + t.data.size : pad_end])  # zero padding
        starts.append((t.name, start))
    assert [n for n, _ in sorted(starts, key=lambda x: x[1])] == sorted(names)  # data in index order


def test_header_crc_verified(tmp_path):
    good = craft({"architecture": "llama"}, [("w", 0, (2,), bytes(8))])
    bad = bytearray(good)
    bad[44] ^= 0x01  # reserved byte: covered by the CRC
    p = write(tmp_path, bytes(bad))
    with pytest.raises(FormatError) as e:
        read_apr(p)
    assert_one_line(e, str(p), "CRC")
    # a zero CRC means "not computed" (realizar's test factories)
    unchecked = write(tmp_path, craft({"architecture": "llama"}, [("w", 0, (2,), bytes(8))], crc=False), "z.apr")
    assert read_apr(unchecked).tensors["w"].shape == (2,)


def test_magics(tmp_path):
    entries = [("w", 0, (2,), bytes(8))]
    assert read_apr(write(tmp_path, craft({}, entries, magic=b"APR2"))).header.magic == b"APR2"
    with pytest.raises(UnsupportedError) as e:
        read_apr(write(tmp_path, craft({}, entries, magic=b"APR1"), "v1.apr"))
    assert_one_line(e, "v1.apr", "APR1")
    with pytest.raises(FormatError) as e:
        read_apr(write(tmp_path, craft({}, entries, magic=b"NOPE"), "x.apr"))
    assert_one_line(e, "x.apr", "magic")


@pytest.mark.parametrize("bit,name", sorted(REFUSED_FLAGS.items()))
def test_refused_flags(tmp_path, bit, name):
    p = write(tmp_path, craft({}, [("w", 0, (2,), bytes(8))], flags=FLAG_ROW_MAJOR | bit))
    with pytest.raises(UnsupportedError) as e:
        read_apr(p)
    assert_one_line(e, str(p), name)
    with pytest.raises(InputError):
        write_apr(tmp_path / "o.apr", {}, [f32("w", [1.0])], flags=bit)


def test_informational_flags_accepted(tmp_path):
    p = write(tmp_path, craft({}, [("w", 0, (2,), bytes(8))], flags=0x0020 | 0x0200 | 0x0400))
    assert read_apr(p).header.flags == 0x0620


@pytest.mark.parametrize("cut", [0, 10, 63, 64, 100, 150, 200, 260])
def test_truncated(tmp_path, cut):
    full = craft({"architecture": "llama"}, [("a", 0, (4,), bytes(16)), ("b", 0, (20,), bytes(80))])
    p = write(tmp_path, full[:cut])
    with pytest.raises(FormatError) as e:
        read_apr(p)
    assert_one_line(e, str(p))


def test_bad_index_values(tmp_path):
    good = [("w", 0, (4,), bytes(16))]
    cases = {
        "size": [("w", 0, (5,), bytes(16))],  # 5 floats need 20 bytes
        "dims": [("w", 0, (0,), b"")],
        "code": [("w", 200, (4,), bytes(16))],
        "duplicate": good + good,
    }
    for problem, entries in cases.items():
        p = write(tmp_path, craft({}, entries), f"{problem}.apr")
        with pytest.raises(FormatError) as e:
            read_apr(p)
        assert_one_line(e, str(p), "tensor w")
    # offsets past the end of the file
    data = bytearray(craft({}, good))
    io = struct.unpack_from("<Q", data, 24)[0]
    struct.pack_into("<Q", data, io + 2 + 1 + 2 + 8, 1 << 40)
    p = write(tmp_path, bytes(data), "eof.apr")
    with pytest.raises(FormatError) as e:
        read_apr(p)
    assert_one_line(e, str(p), "past the end")
    # an absurd tensor count, and a data offset past EOF
    for field_off, value, what in ((8, 10**9, "tensor count"), (32, 1 << 50, "data offset")):
        data = bytearray(craft({}, good, crc=False))
        struct.pack_into("<I" if field_off == 8 else "<Q", data, field_off, value)
        p = write(tmp_path, bytes(data), "count.apr")
        with pytest.raises(FormatError) as e:
            read_apr(p)
        assert_one_line(e, str(p), what)


def test_bad_metadata(tmp_path):
    for meta in (b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000):
        p = write(tmp_path, craft(meta, [("w", 0, (2,), bytes(8))]))
        with pytest.raises(FormatError) as e:
            read_apr(p)
        assert_one_line(e, str(p), "metadata")


# ------------------------------------------------------------------------------------------------
# dtype codes (§4.3)


def _apr_q4(values: np.ndarray) -> bytes:
    """aprender's q4 writer (§5.5): per 32 values f16 scale = max|x|/7, q = round(x/s) + 8, element
    i in byte i//2 (even i low nibble)."""
    x = np.pad(values.reshape(-1), (0, -values.size % 32)).reshape(-1, 32)
    scale = np.abs(x).max(axis=1) / 7
    scale[scale == 0] = 1.0
    scale = scale.astype("<f2")
    q = (np.clip(np.round(x / scale[:, None].astype(np.float32)), -8, 7) + 8).astype(np.uint8)
    blocks = np.empty((len(x), 18), np.uint8)
    blocks[:, :2] = scale.view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = q[:, 0::2] | (q[:, 1::2] << 4)
    return blocks.tobytes()


def _apr_q4_values(raw: bytes, n: int) -> np.ndarray:
    """Independent decode of APR q4: (nibble - 8) * scale, in element order."""
    out = []
    for b in range(len(raw) // 18):
        s = np.frombuffer(raw[18 * b : 18 * b + 2], "<f2")[0].astype(np.float32)
        for i in range(32):
            byte = raw[18 * b + 2 + i // 2]
            out.append(((byte >> 4) if i % 2 else (byte & 15)) - 8)
            out[-1] = np.float32(out[-1]) * s
    return np.array(out[:n], np.float32)


def test_code8_is_q8_0_or_apr_q4_by_size(tmp_path, rng):
    rows, cols = 3, 64
    q8 = rng.integers(0, 256, tensor_bytes(GGMLType.Q8_0, (rows, cols)), dtype=np.uint8).tobytes()
    values = rng.normal(0, 1, (rows, cols)).astype(np.float32)
    q4 = _apr_q4(values)
    p = write(tmp_path, craft({}, [("a", 8, (rows, cols), q8), ("b", 8, (rows, cols), q4), ("c", 128, (rows, cols), q4)]))
    f = read_apr(p)
    assert f.tensors["a"].dtype == GGMLType.Q8_0 and f.tensors["a"].data.tobytes() == q8
    expect = _apr_q4_values(q4, rows * cols).reshape(rows, cols)
    for name in "bc":  # legacy code 8 and APR-native 128: repacked losslessly into GGML Q4_0
        t = f.tensors[name]
        assert t.dtype == GGMLType.Q4_0 and t.shape == (rows, cols)
        np.testing.assert_array_equal(dequantize(t.data, t.dtype, t.shape), expect)
    # with our marker, code 8 is GGML Q8_0 only: a q4-sized tensor is corrupt
    p = write(tmp_path, craft({DTYPE_CODES_KEY: "ggml"}, [("b", 8, (rows, cols), q4)]), "marked.apr")
    with pytest.raises(FormatError) as e:
        read_apr(p)
    assert_one_line(e, str(p), "tensor b", "Q8_0")


def test_apr_native_unaligned_rows_and_q8(tmp_path, rng):
    shape = (3, 20)  # rows are not whole 32-blocks: q4 is decoded to F32
    values = rng.normal(0, 1, shape).astype(np.float32)
    q4 = _apr_q4(values)
    q8_scale = np.float32(0.05)
    q8_q = rng.integers(-127, 128, 60).astype(np.int8)
    q8 = np.array([q8_scale], "<f4").tobytes() + q8_q.tobytes()
    f = read_apr(write(tmp_path, craft({}, [("q4", 128, shape, q4), ("q8", 129, shape, q8), ("l8", 9, shape, q8)])))
    assert f.tensors["q4"].dtype == GGMLType.F32
    np.testing.assert_array_equal(f.tensors["q4"].data.view("<f4").reshape(shape), _apr_q4_values(q4, 60).reshape(shape))
    for name in ("q8", "l8"):
        assert f.tensors[name].dtype == GGMLType.F32
        np.testing.assert_array_equal(f.tensors[name].data.view("<f4"), q8_q.astype(np.float32) * q8_scale)


def test_foreign_code_meanings(tmp_path):
    n = 64
    cases = [
        (2, n * 2, GGMLType.BF16, None),  # pre-GH-438 BF16
        (2, tensor_bytes(GGMLType.Q4_0, (n,)), GGMLType.Q4_0, None),
        (3, tensor_bytes(GGMLType.Q4_1, (n,)), GGMLType.Q4_1, None),
        (6, tensor_bytes(GGMLType.Q5_0, (n,)), GGMLType.Q5_0, None),
        (3, n * 8, None, (UnsupportedError, "F64")),  # aprender F64
        (6, n, None, (UnsupportedError, "I8")),
        (16, 66, None, (UnsupportedError, "IQ2_XXS")),
        (200, 64, None, (FormatError, "unknown dtype code 200")),
        (12, 100, None, (FormatError, "does not match")),
    ]
    for code, size, dtype, error in cases:
        p = write(tmp_path, craft({}, [("t", code, (n,), bytes(size))]), f"c{code}-{size}.apr")
        if error is None:
            assert read_apr(p).tensors["t"].dtype == dtype
        else:
            with pytest.raises(error[0]) as e:
                read_apr(p)
            assert_one_line(e, str(p), "tensor t", error[1])


# ------------------------------------------------------------------------------------------------
# metadata


def test_aliases_folded_on_read():
    meta = {
        "architecture": None, "model_type": "qwen2", "hidden_dim": 8, "num_hidden_layers": 2,
        "num_heads": 4, "n_heads": 99, "n_kv_heads": None, "num_key_value_heads": 2,
        "n_vocab": 10, "ffn_dim": 16, "n_ctx": 64, "norm_eps": 1e-6, "extra": 1,
    }
    c = canonical_metadata(meta)
    assert c["architecture"] == "qwen2"
    assert (c["hidden_size"], c["num_layers"], c["num_heads"], c["num_kv_heads"]) == (8, 2, 4, 2)
    assert (c["vocab_size"], c["intermediate_size"], c["max_position_embeddings"], c["rms_norm_eps"]) == (10, 16, 64, 1e-6)
    assert c["extra"] == 1


def test_writer_refuses_key_with_alias(tmp_path):
    with pytest.raises(InputError) as e:
        write_apr(tmp_path / "a.apr", {"num_layers": 2, "num_hidden_layers": 2}, [f32("w", [1.0])])
    assert "num_hidden_layers" in str(e.value)
    assert not list(tmp_path.iterdir())


def test_writer_is_atomic(tmp_path):
    p = write_apr(tmp_path / "a.apr", {"architecture": "llama"}, [f32("w", [1.0])])
    before = p.read_bytes()
    bad = QTensor("w", GGMLType.F32, (2,), np.zeros(4, np.uint8))  # 4 bytes for 2 floats
    with pytest.raises(InputError):
        write_apr(p, {}, [bad])
    with pytest.raises(InputError):
        write_apr(p, {"x": float("nan")}, [f32("w", [1.0])])
    with pytest.raises(InputError):
        write_apr(p, {}, [f32("w", [1.0]), f32("w", [2.0])])
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.apr"]  # no temporary left behind


def test_numpy_scalars_become_json_numbers(tmp_path):
    p = write_apr(tmp_path / "a.apr", {"hidden_size": np.int64(896), "rope_theta": np.float32(1e6), "b": np.bool_(True)}, [f32("w", [1.0])])
    raw = p.read_bytes()
    meta = raw[64 : 64 + struct.unpack_from("<I", raw, 20)[0]]
    assert meta == b'{"hidden_size":896,"rope_theta":1000000.0,"b":true}'


@pytest.mark.parametrize(
    "spec",
    [
        TokenizerSpec("gpt2", ["a", "b", "ab", "<s>"], merges=["a b"], token_types=[1, 1, 1, 3], bos_id=3, eos_id=3,
                      add_bos=True, pre="gpt-2", chat_template="{{ x }}"),
        TokenizerSpec("llama", ["<unk>", "▁a", "é"], scores=[0.0, -1.5, -2.25], token_types=[2, 1, 1], bos_id=None, eos_id=0),
    ],
)
def test_tokenizer_keys_roundtrip(tmp_path, spec):
    meta = tokenizer_to_metadata(spec, TOKENIZER_KEYS)
    assert set(meta) <= set(TOKENIZER_KEYS.values())
    p = write_apr(tmp_path / "t.apr", meta, [f32("w", [1.0])])
    back = tokenizer_from_metadata(read_apr(p).metadata, TOKENIZER_KEYS, str(p), TOKENIZER_FALLBACKS)
    assert back == spec


def test_tokenizer_fallback_spellings(tmp_path):
    meta = {"tokenizer.vocabulary": ["x", "y"], "tokenizer.scores": [0, -1], "tokenizer.model_type": "llama", "chat_template": "t"}
    spec = tokenizer_from_metadata(meta, TOKENIZER_KEYS, "f", TOKENIZER_FALLBACKS)
    assert (spec.model, spec.scores, spec.chat_template) == ("llama", [0.0, -1.0], "t")
    for bad in ({"tokenizer.vocabulary": ["x", 3]}, {"tokenizer.vocabulary": ["x"], "tokenizer.scores": [1, 2]},
                {"tokenizer.vocabulary": ["x"], "tokenizer.eos_token_id": 5}):
        with pytest.raises(FormatError) as e:
            tokenizer_from_metadata(bad, TOKENIZER_KEYS, "file.apr", TOKENIZER_FALLBACKS)
        assert_one_line(e, "file.apr", "tokenizer.")
