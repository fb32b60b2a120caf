"""engine/quants.py against gguf-py (the independent reference) and against GGML's reference quantizers.

Dequantizers must match `gguf.quants.dequantize` bit for bit, block-padded rows included.
Quantizers must produce valid GGML blocks (gguf decodes them to the same bits), reconstruct with
sane error, and reproduce GGML's quantize_row_*_ref bytes (golden hashes below).
"""
from __future__ import annotations

import hashlib
import time

import gguf
import numpy as np
import pytest

from q4k_engine import quants
from q4k_engine.dtypes import SUPPORTED, TYPE_INFO, GGMLType, row_bytes
from q4k_engine.errors import FormatError, InputError, UnsupportedError
from q4k_engine.quants import dequantize, dequantize_rows, quantize
from q4k_engine.tensors import QTensor

QUANT_TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
FLOAT_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16]
# byte offsets of the f16 scale fields (d, and m / dmin) inside one block
F16_FIELDS = {
    GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q8_0: [0],
    GGMLType.Q4_K: [0, 2], GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208],
}


def gguf_dequant(data: np.ndarray, dtype: GGMLType, rows: int) -> np.ndarray:
    """The reference: gguf-py decodes [rows, row_bytes] (whole blocks) to float32 [rows, padded cols]."""
    return np.asarray(gguf.quants.dequantize(data.reshape(rows, -1), gguf.GGMLQuantizationType(int(dtype))), np.float32)


def assert_bits_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == ref.shape, (ours.dtype, ours.shape, ref.shape)
    diff = ours.view(np.uint32) != ref.view(np.uint32)
    assert not diff.any(), f"{int(diff.sum())} of {diff.size} values differ; first at {np.argwhere(diff)[0]}"


def random_float_bytes(rng: np.random.Generator, dtype: GGMLType, n: int) -> np.ndarray:
    """n finite values of a float type, spanning many magnitudes (f16 subnormals included), as bytes."""
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-7, 4, n)
    if dtype == GGMLType.F32:
        return x.astype("<f4").view(np.uint8)
    if dtype == GGMLType.F16:
        return np.clip(x, -65504, 65504).astype("<f2").view(np.uint8)
    return (x.astype("<f4").view("<u4") >> 16).astype("<u2").view(np.uint8)  # BF16, truncated


def random_blocks(rng: np.random.Generator, dtype: GGMLType, n_blocks: int) -> np.ndarray:
    """n_blocks random blocks [n_blocks, type_size] whose f16 scales are finite (some 0, some subnormal)."""
    info = TYPE_INFO[dtype]
    if dtype in FLOAT_TYPES:
        return random_float_bytes(rng, dtype, n_blocks).reshape(n_blocks, info.type_size)
    blocks = rng.integers(0, 256, size=(n_blocks, info.type_size), dtype=np.uint8)
    for off in F16_FIELDS[dtype]:
        scale = rng.choice([-1.0, 1.0], n_blocks) * 10.0 ** rng.uniform(-7, 1, n_blocks)
        scale[rng.random(n_blocks) < 0.05] = 0.0
        blocks[:, off : off + 2] = scale.astype("<f2").reshape(-1, 1).view(np.uint8)
    return blocks


# ----------------------------------------------------------------------------------------------
# dequantization


@pytest.mark.parametrize("dtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_bit_exact(dtype, rng):
    info = TYPE_INFO[dtype]
    rows = int(rng.integers(1, 40))
    per_row = int(rng.integers(1, 12)) * (1 if info.block_size > 1 else 32)
    data = random_blocks(rng, dtype, rows * per_row).reshape(-1)
    cols = per_row * info.block_size
    ref = gguf_dequant(data, dtype, rows)
    out = dequantize(data, dtype, (rows, cols))
    assert np.isfinite(out).all()
    assert_bits_equal(out, ref)


@pytest.mark.parametrize("dtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_dequantize_arbitrary_bytes_match_gguf_including_nan(dtype, rng):
    """Raw random bytes (NaN/inf scales possible): same NaN positions, identical bits elsewhere."""
    info = TYPE_INFO[dtype]
    rows, per_row = 16, 8
    data = rng.integers(0, 256, size=rows * per_row * info.type_size, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf_dequant(data, dtype, rows)
        out = dequantize(data, dtype, (rows, per_row * info.block_size))
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    assert_bits_equal(np.where(nan, 0, out), np.where(nan, 0, ref))


@pytest.mark.parametrize("dtype", QUANT_TYPES, ids=lambda t: t.name)
def test_padded_rows_drop_the_tail(dtype, rng):
    """cols % block != 0: every row has row_bytes(dtype, cols) bytes; decoded values past cols are dropped."""
    bs = TYPE_INFO[dtype].block_size
    lead = (2, int(rng.integers(1, 6)))  # 3-D shape: all leading dims are rows
    rows = lead[0] * lead[1]
    cols = int(rng.integers(1, 3 * bs))
    if cols % bs == 0:
        cols -= 1
    n_blocks = -(-cols // bs)
    data = random_blocks(rng, dtype, rows * n_blocks).reshape(-1)
    assert data.size == rows * row_bytes(dtype, cols)
    out = dequantize(data, dtype, (*lead, cols))
    assert out.shape == (*lead, cols) and out.flags.c_contiguous
    assert_bits_equal(out.reshape(rows, cols), gguf_dequant(data, dtype, rows)[:, :cols])


@pytest.mark.parametrize("dtype", [GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_chunk_boundaries_do_not_matter(dtype, rng, monkeypatch):
    """Large tensors are decoded chunk by chunk; a tiny chunk size must give the same bits."""
    info = TYPE_INFO[dtype]
    rows, per_row = 7, 5
    data = random_blocks(rng, dtype, rows * per_row).reshape(-1)
    whole = dequantize(data, dtype, (rows, per_row * info.block_size))
    monkeypatch.setattr(quants, "_CHUNK_VALUES", 3 * info.block_size)
    assert_bits_equal(dequantize(data, dtype, (rows, per_row * info.block_size)), whole)


def test_float_types_return_fresh_arrays(rng):
    data = random_float_bytes(rng, GGMLType.F32, 64)
    keep = data.copy()
    data.flags.writeable = False  # as a read-only file mapping
    out = dequantize(data, GGMLType.F32, (8, 8))
    out[:] = 0  # must not fail, must not touch the file bytes
    assert np.array_equal(data, keep) and not np.shares_memory(out, data)


@pytest.mark.parametrize("dtype", [GGMLType.Q4_1, GGMLType.Q6_K, GGMLType.F16], ids=lambda t: t.name)
def test_dequantize_rows_equals_slice_of_whole(dtype, rng):
    info = TYPE_INFO[dtype]
    rows = 23
    cols = 2 * info.block_size + info.block_size // 2 if info.block_size > 1 else 40
    data = random_blocks(rng, dtype, rows * (row_bytes(dtype, cols) // info.type_size)).reshape(-1)
    t = QTensor("blk.0.ffn_up.weight", dtype, (rows, cols), data)
    whole = dequantize(t.data, dtype, t.shape)
    for _ in range(5):
        start = int(rng.integers(0, rows + 1))
        stop = int(rng.integers(start, rows + 1))
        part = dequantize_rows(t, start, stop)
        assert part.shape == (stop - start, cols)
        assert_bits_equal(part, whole[start:stop])


def test_dequantize_rows_bounds_and_size_errors(rng):
    data = random_blocks(rng, GGMLType.Q8_0, 4).reshape(-1)
    t = QTensor("token_embd.weight", GGMLType.Q8_0, (4, 32), data)
    with pytest.raises(InputError, match="token_embd.weight"):
        dequantize_rows(t, 2, 5)
    with pytest.raises(InputError):
        dequantize_rows(t, 3, 2)
    short = QTensor("token_embd.weight", GGMLType.Q8_0, (4, 32), data[:-1])
    with pytest.raises(FormatError, match=r"token_embd\.weight.*Q8_0.*136.*135"):
        dequantize_rows(short, 0, 1)


def test_dequantize_errors(rng):
    data = random_blocks(rng, GGMLType.Q4_K, 2).reshape(-1)
    with pytest.raises(FormatError, match=r"blk\.3\.attn_q\.weight: Q4_K .*\(2, 256\).*288.*287"):
        dequantize(data[:-1], GGMLType.Q4_K, (2, 256), name="blk.3.attn_q.weight")
    with pytest.raises(FormatError, match="bytes"):
        dequantize(data, GGMLType.Q4_K, (3, 256))
    with pytest.raises(FormatError, match="uint8"):
        dequantize(data.view(np.int8), GGMLType.Q4_K, (2, 256))
    with pytest.raises(FormatError, match="uint8"):
        dequantize(data.reshape(2, -1), GGMLType.Q4_K, (2, 256))
    with pytest.raises(FormatError, match="negative"):
        dequantize(data, GGMLType.Q4_K, (-2, 256))
    for unsupported in (GGMLType.Q5_1, GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q8_K):
        assert unsupported not in SUPPORTED
        with pytest.raises(UnsupportedError, match=unsupported.name):
            dequantize(data, unsupported, (2, 256))
    with pytest.raises(UnsupportedError, match="99"):
        dequantize(data, 99, (2, 256))


def test_dequantize_empty_and_vector_shapes(rng):
    assert dequantize(np.zeros(0, np.uint8), GGMLType.Q4_K, (0, 512)).shape == (0, 512)
    norm = random_float_bytes(rng, GGMLType.F32, 640)
    out = dequantize(norm, GGMLType.F32, (640,))
    assert out.shape == (640,) and np.array_equal(out, norm.view("<f4"))


# ----------------------------------------------------------------------------------------------
# quantization


def weights_like(rng: np.random.Generator, cols: int) -> np.ndarray:
    """Weights-like data: mostly normal rows of varied scale, plus outlier, all-zero, constant rows."""
    x = rng.standard_normal((24, cols)) * 10.0 ** rng.uniform(-3, 1, (24, 1))
    x[3] = 0.0
    x[5, : cols // 2] = 0.0
    x[7] = -0.37
    x[9, rng.integers(0, cols, 6)] *= 60.0  # a few outliers
    x[11] = np.abs(x[11])  # one-signed rows
    x[13] = -np.abs(x[13])
    x[15] = rng.standard_t(2, cols)  # heavy tails
    return x.astype(np.float32)


def rel_rms(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y.astype(np.float64) - x) ** 2)) / np.sqrt(np.mean(x.astype(np.float64) ** 2)))


# relative RMS bounds on N(0,1) data; Q8_0's own step (amax/127 over 32 normals) gives ~0.0053
REL_RMS_BOUND = {
    GGMLType.Q4_K: 0.09, GGMLType.Q6_K: 0.02, GGMLType.Q8_0: 0.007,
    GGMLType.BF16: 0.003, GGMLType.F16: 0.0005, GGMLType.F32: 0.0,
}


@pytest.mark.parametrize("dtype", list(REL_RMS_BOUND), ids=lambda t: t.name)
def test_quantize_roundtrip_error_and_valid_blocks(dtype, rng):
    info = TYPE_INFO[dtype]
    cols = int(rng.choice([256, 512, 640, 1000]))  # 640 and 1000 force row padding for K-quants
    x = weights_like(rng, cols)
    t0 = time.perf_counter()
    q = quantize(x, dtype)
    dt = time.perf_counter() - t0
    assert q.dtype == np.uint8 and q.shape == (x.shape[0] * row_bytes(dtype, cols),)
    y = dequantize(q, dtype, x.shape)
    # the bytes are valid GGML blocks: gguf decodes them to the same bits
    assert_bits_equal(y, gguf_dequant(q, dtype, x.shape[0])[:, :cols])

    normal = rng.standard_normal((64, cols)).astype(np.float32)
    err_normal = rel_rms(dequantize(quantize(normal, dtype), dtype, normal.shape), normal)
    err_mixed = rel_rms(y, x)
    per_row = [rel_rms(y[r], x[r]) for r in range(len(x)) if np.any(x[r])]
    print(f"{dtype.name}: rel-RMS normal {err_normal:.5f}, weights-like {err_mixed:.5f}, "
          f"worst row {max(per_row):.5f}, quantize {x.size / max(dt, 1e-9) / 1e6:.1f} Mvalues/s")
    assert err_normal <= REL_RMS_BOUND[dtype]
    assert max(per_row) <= 3 * REL_RMS_BOUND[dtype]
    for r in (3, 7):  # all-zero and constant rows are reproduced (constant within rounding of the scale)
        assert np.allclose(y[r], x[r], rtol=0, atol=abs(float(x[r, 0])) * 4e-3)
    if info.block_size > 1:  # zero-padding: a row's padded blocks never leak into the next row
        assert np.array_equal(y[3], np.zeros(cols, np.float32))


@pytest.mark.parametrize("dtype", [GGMLType.Q8_0, GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_quantize_matches_gguf_quantizer(dtype, rng):
    """gguf-py's Q8_0 (bit-exact with GGML's reference, it says), F16 and BF16 encoders give the same bytes."""
    x = weights_like(rng, 512)
    ref = np.asarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType(int(dtype)))).view(np.uint8).reshape(-1)
    assert np.array_equal(quantize(x, dtype), ref)


def minmax_q4_k(x: np.ndarray) -> np.ndarray:
    """The simple per-sub-block min/max Q4_K method (apr-v2-format.md §5.3), reconstructed values."""
    sub = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(axis=2), 0)
    scale = (sub.max(axis=2) - lo) / 15
    d = (scale.max(axis=1) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-lo).max(axis=1) / 63).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.round(scale / d[:, None])), 0, 63)
        mn = np.clip(np.nan_to_num(np.round(-lo / dmin[:, None])), 0, 63)
        ds, dm = d[:, None] * sc, dmin[:, None] * mn
        q = np.clip(np.nan_to_num(np.round((sub + dm[:, :, None]) / ds[:, :, None])), 0, 15)
    return (ds[:, :, None] * q - dm[:, :, None]).reshape(x.shape)


def test_q4_k_search_beats_minmax(rng):
    x = np.concatenate([rng.standard_normal((32, 512)), weights_like(rng, 512)]).astype(np.float32)
    ours = rel_rms(dequantize(quantize(x, GGMLType.Q4_K), GGMLType.Q4_K, x.shape), x)
    simple = rel_rms(minmax_q4_k(x), x)
    print(f"Q4_K rel-RMS: GGML search {ours:.5f}, min/max {simple:.5f}")
    assert ours <= simple


def golden_input() -> np.ndarray:
    """Fixed, platform-independent input (integer hashing, exact dyadic scaling): 8 rows of spread
    values with outliers, a zero super-block, a constant sub-block and a negative-only super-block;
    7 rows of small multiples of 1/8, where GGML's round-half-to-even ties occur; one row where
    Q8_0 meets exact .5 ties (amax 127, so d = 1), which C roundf sends away from zero."""
    i = np.arange(16 * 1024, dtype=np.int64)
    h = (i * 2654435761 + 12345) % 4294967296
    x = ((h % 65536) - 32768) / 8192.0 * (1 + (h >> 16) % 4)
    x[8 * 1024 :] = ((h[8 * 1024 :] >> 20) % 31 - 15) / 8.0
    x[::97] *= 40.0
    x[256:512] = 0.0
    x[1024:1056] = 0.75
    x[1536:1792] = -np.abs(x[1536:1792]) - 1.0
    ties = ((h >> 8) % 253 - 126) + 0.5
    ties[::32] = 127.0
    x[15 * 1024 :] = ties[15 * 1024 :]
    return x.astype(np.float32).reshape(16, 1024)


# SHA-256 of the bytes GGML's quantize_row_{q4_K,q6_K,q8_0}_ref write for golden_input(), from
# llama.cpp's ggml-quants.c built with gcc -O2 -ffp-contract=off (no fused multiply-add: a build
# with -march=native lets the compiler fuse some products and changes a few blocks).
GOLDEN_SHA256 = {
    GGMLType.Q4_K: "6c7a3baf8c5b92faea2acf05a07205cb21f6586a7a0984b01f6a2fef567f7241",
    GGMLType.Q6_K: "2ad5a93b8be5b6714daba62d809fba811dcf028530ba5b224c28e7aad6f9a180",
    GGMLType.Q8_0: "f68b0fa2bead7fadf85af48d6a7ab6bbff37292eb64980d5124e6061f29e55ae",
}


@pytest.mark.parametrize("dtype", list(GOLDEN_SHA256), ids=lambda t: t.name)
def test_quantize_reproduces_ggml_reference_bytes(dtype):
    assert hashlib.sha256(quantize(golden_input(), dtype).tobytes()).hexdigest() == GOLDEN_SHA256[dtype]


def test_quantize_pads_rows_with_zeros(rng):
    x = rng.standard_normal((3, 300)).astype(np.float32)
    for dtype in (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0):
        bs = TYPE_INFO[dtype].block_size
        padded = np.zeros((3, -(-300 // bs) * bs), np.float32)
        padded[:, :300] = x
        assert np.array_equal(quantize(x, dtype), quantize(padded, dtype))


def test_quantize_errors():
    x = np.ones((2, 256), np.float32)
    for dtype in (GGMLType.Q4_0, GGMLType.Q5_K, GGMLType.Q2_K):
        with pytest.raises(UnsupportedError, match=dtype.name):
            quantize(x, dtype)
    bad = x.copy()
    bad[1, 7] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        quantize(bad, GGMLType.Q4_K)
    with pytest.raises(InputError):
        quantize(np.float32(1.0), GGMLType.Q8_0)


# ----------------------------------------------------------------------------------------------
# real models


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gemma", "smollm"])
def test_real_model_every_tensor_bit_exact(which):
    from realmodels import gemma_path, smollm_path

    path = gemma_path() if which == "gemma" else smollm_path()
    reader = gguf.GGUFReader(path)
    seen: dict[str, int] = {}
    ours_s = ref_s = 0.0
    for t in reader.tensors:
        dtype = GGMLType(int(t.tensor_type))
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF ne is innermost first
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        t0 = time.perf_counter()
        ours = dequantize(raw, dtype, shape, name=t.name)
        t1 = time.perf_counter()
        ref = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        ref_s += time.perf_counter() - t1
        ours_s += t1 - t0
        assert_bits_equal(ours, ref)
        if t.name == "token_embd.weight":
            qt = QTensor(t.name, dtype, shape, raw)
            assert_bits_equal(dequantize_rows(qt, 1000, 1037), ref[1000:1037])
        seen[dtype.name] = seen.get(dtype.name, 0) + 1
    print(f"{path.name}: {len(reader.tensors)} tensors {seen}; ours {ours_s:.2f}s, gguf {ref_s:.2f}s")
    expected = {"gemma": {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"}, "smollm": {"Q4_1", "Q8_0", "F32"}}[which]
    assert set(seen) == expected
