"""APR v2 (`.apr`) container: a memory-mapped, validating reader and an atomic writer.

The byte layout is /work/shared/docs/apr-v2-format.md (64-byte header, JSON metadata, binary
tensor index, 64-byte aligned tensor data, CRC32 footer). This module knows bytes, offsets, dtype
codes and metadata key spellings; model semantics (ModelConfig, tensor names) live in loader.py.

Dtype codes (the §4.3 code-8 trap), decided as follows:

* Written: GGML's numbering. Files q4k-engine writes hold only the portable set {0 F32, 1 F16,
  30 BF16, 12 Q4_K, 14 Q6_K} unless the user asks otherwise: convert.py re-encodes any other type
  by one stated rule (`convert.portable_type`), because upstream those codes mean something else
  (aprender reads 3/6/7 as F64/I8/U8 and rejects 2/13; realizar reads 8 as APR-native q4). With
  `keep_ggml_codes` the other GGML types real Q4_K_M files hold (Q4_0=2, Q4_1=3, Q5_0=6,
  Q8_0=8, Q5_K=13, ...) are written under their GGML codes and the file records
  `"q4k_engine.dtype_codes": "ggml"`; only q4k-engine reads that marker, so only q4k-engine
  reads such a file correctly.
* Read with the marker: codes are GGML, strictly.
* Read without it (files from aprender/realizar): a code with two meanings is resolved by the
  tensor's byte size, the only evidence in the file, as realizar's R-transformer does for 8:
  2 = Q4_0 or pre-GH-438 BF16; 3/6/7 = Q4_1/Q5_0/Q5_1 (realizar) or F64/I8/U8 (aprender);
  8 = Q8_0 (⌈n/32⌉·34 bytes) or APR-native q4 (⌈n/32⌉·18); 9 = Q8_1 or APR-native q8 (4+n).
  Sizes that match neither meaning are a FormatError.
* APR-native q4 (code 128, legacy 8) is repacked losslessly into GGML Q4_0 when rows are whole
  32-blocks (same scale and offset, only the nibble order differs), else decoded to F32;
  APR-native q8 (129, legacy 9) is decoded to F32. Both are copies, not views (legacy formats).

Header CRC: always written; verified on read whenever the stored value is non-zero (realizar's
test factories leave it 0, aprender always fills it). The footer CRC is written, and checked only
by `q4k-engine verify` (engine/verify.py): checking it means reading every byte of a multi-GB
file, which a plain open (a mapping) never does.
"""
from __future__ import annotations

import json
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import gguf
import numpy as np
from tqdm import tqdm

from .binio import Cursor, atomic_output, check_byte_ranges, map_file, shown
from .dtypes import TYPE_INFO, GGMLType, tensor_bytes
from .errors import FormatError, InputError, UnsupportedError
from .gguf_file import ggml_type
from .tensors import QTensor

MAGIC = b"APR\0"
READ_MAGICS = (b"APR\0", b"APR2")
HEADER = struct.Struct("<4sBBHIQIQQI20s")  # 64 bytes, §2
ALIGN = 64
MAX_NDIM = 8  # aprender never writes more (§4.1)
MAX_INT_DIGITS = 400  # any metadata integer beyond 10^400 is out of range anyway (and of float's range)
FLAG_ROW_MAJOR = 0x0400
REFUSED_FLAGS = {
    0x0001: "LZ4_COMPRESSED",
    0x0002: "ZSTD_COMPRESSED",
    0x0004: "ENCRYPTED",
    0x0008: "SIGNED",
    0x0010: "SHARDED",
    0x0800: "LAYOUT_COLUMN_MAJOR",
}
PORTABLE = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_K, GGMLType.Q6_K})
DTYPE_CODES_KEY = "q4k_engine.dtype_codes"

# §3.1: canonical model-config keys and the aliases realizar accepts for them.
ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_dim", "d_model", "n_embd"),
    "num_layers": ("n_layers", "num_hidden_layers", "n_layer"),
    "num_heads": ("n_heads", "num_attention_heads", "n_head"),
    "num_kv_heads": ("n_kv_heads", "num_key_value_heads"),
    "vocab_size": ("n_vocab",),
    "intermediate_size": ("ffn_dim", "intermediate_dim", "n_inner"),
    "max_position_embeddings": ("max_seq_len", "context_length", "n_ctx"),
    "rms_norm_eps": ("layer_norm_eps", "norm_eps"),
}

# §3.2: TokenizerSpec field -> APR metadata key (written; also the first spelling tried on read).
TOKENIZER_KEYS: dict[str, str] = {
    "model": "tokenizer.model",
    "tokens": "tokenizer.vocabulary",
    "merges": "tokenizer.merges",
    "scores": "tokenizer.scores",
    "token_types": "tokenizer.token_type",
    "bos_id": "tokenizer.bos_token_id",
    "eos_id": "tokenizer.eos_token_id",
    "pad_id": "tokenizer.padding_token_id",  # aprender's spelling (GGUF_KEY_SPELLINGS)
    "add_bos": "tokenizer.add_bos_token",
    "pre": "tokenizer.pre_type",
    "chat_template": "tokenizer.chat_template",
}
# Other spellings seen in aprender/realizar files, tried when the key above is absent.
TOKENIZER_FALLBACKS: dict[str, str] = {
    "tokenizer.model": "tokenizer.model_type",
    "tokenizer.chat_template": "chat_template",
}

# GGUF `general.*` / `tokenizer.*` facts beyond the config and TokenizerSpec (unknown and padding
# token ids, add_space_prefix, add_eos_token, license, ...): GGUF key -> APR key where aprender
# has a field of its own (§3.2, §3.3). Every other such key is stored under its GGUF name (all
# readers keep unknown keys), so GGUF -> APR -> GGUF gives back what llama.cpp's tokenizer reads.
GGUF_KEY_SPELLINGS: dict[str, str] = {
    "general.name": "name",
    "tokenizer.ggml.padding_token_id": "tokenizer.padding_token_id",
}
# The GGUF key namespaces carried that way (`tokenizer.chat_template` itself is TokenizerSpec's).
GGUF_KEY_PREFIXES = ("general.", "tokenizer.ggml.", "tokenizer.chat_template.", "tokenizer.huggingface.", "tokenizer.rwkv.")


def align64(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class AprHeader:
    magic: bytes
    version: tuple[int, int]
    flags: int
    tensor_count: int
    metadata_offset: int
    metadata_size: int
    tensor_index_offset: int
    data_offset: int
    checksum: int


@dataclass
class AprFile:
    """A parsed APR file: raw metadata and tensors under the names stored in the file."""

    path: Path
    header: AprHeader
    metadata: dict[str, Any]
    tensors: dict[str, QTensor]
    buffer: np.ndarray  # the mapping the tensor views point into
    data_end: int  # end of the last tensor's bytes (the footer CRC, if any, follows its padding)


# --------------------------------------------------------------------------------------------
# metadata


def canonical_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with every §3.1 alias folded onto its canonical key (the canonical key wins).

    `null` counts as absent, as in aprender (which writes null for unset typed fields).
    `architecture` falls back to `model_type` like realizar's R-transformer.
    """
    out = {k: v for k, v in meta.items() if not (v is None and (k in ALIASES or k == "architecture"))}
    for key, aliases in ALIASES.items():
        if out.get(key) is not None:
            continue
        for alias in aliases:
            if meta.get(alias) is not None:
                out[key] = meta[alias]
                break
    if not out.get("architecture") and isinstance(meta.get("model_type"), str):
        if meta["model_type"] not in ("", "auto"):
            out["architecture"] = meta["model_type"]
    return out


def _check_no_aliases(meta: Mapping[str, Any]) -> None:
    """§3.4 pitfall 1: a key together with its alias makes realizar drop all metadata."""
    for key, aliases in ALIASES.items():
        present = [k for k in (key, *aliases) if k in meta]
        if len(present) > 1:
            raise InputError(f"APR metadata would hold {present}: spellings of one key (apr-v2-format.md §3.4)")


def _json_default(value: Any) -> Any:
    # NumPy scalars must become JSON integers/floats: "896.0" for an int field breaks realizar (§3.4).
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise InputError(f"APR metadata value of type {type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------
# dtype codes


@dataclass(frozen=True)
class _Meaning:
    """One reading of a dtype code: its byte size, and how it becomes an engine tensor."""

    label: str
    nbytes: Callable[[tuple[int, ...]], int]
    ggml: GGMLType | None = None  # zero-copy view as this GGML type
    decode: Callable[[np.ndarray, tuple[int, ...]], tuple[GGMLType, np.ndarray]] | None = None
    # neither ggml nor decode: a valid aprender type the engine does not run (F64, integers)


def _n(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=object))


def _apr_q4_unpack(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """APR q4 blocks (f16 scale + 16 bytes, element i in byte i//2, even i = low nibble)."""
    blocks = raw.reshape(-1, 18)
    q = np.empty((len(blocks), 32), np.uint8)
    q[:, 0::2] = blocks[:, 2:] & 0x0F
    q[:, 1::2] = blocks[:, 2:] >> 4
    return blocks, q


def _decode_apr_q4(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[GGMLType, np.ndarray]:
    blocks, q = _apr_q4_unpack(raw)
    if shape[-1] % 32 == 0:
        # Same value rule as GGML Q4_0, (q - 8) * d; only the nibble order differs: Q4_0 keeps
        # elements 0-15 in the low nibbles and 16-31 in the high nibbles.
        out = np.empty_like(blocks)
        out[:, :2] = blocks[:, :2]
        out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
        return GGMLType.Q4_0, out.reshape(-1)
    scale = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)
    values = ((q.astype(np.float32) - 8.0) * scale).reshape(-1)[: _n(shape)]
    return GGMLType.F32, values.astype("<f4").view(np.uint8)


def _decode_apr_q8(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[GGMLType, np.ndarray]:
    scale = raw[:4].view("<f4")[0]
    values = raw[4:].view(np.int8).astype(np.float32) * scale
    return GGMLType.F32, values.astype("<f4").view(np.uint8)


def _ggml_meaning(t: GGMLType) -> _Meaning:
    label = f"{t.name} (GGML code {int(t)})"
    if t in TYPE_INFO:
        return _Meaning(label, lambda s: tensor_bytes(t, s), ggml=t)
    # A GGML type without an engine block table (Q8_1): sized by gguf-py's table, then refused.
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))]
    return _Meaning(label, lambda s: _n(s[:-1]) * -(-s[-1] // block) * size)


def _elementwise(label: str, itemsize: int) -> _Meaning:
    return _Meaning(label, lambda s: _n(s) * itemsize)


_APR_Q4 = _Meaning("APR-native q4", lambda s: -(-_n(s) // 32) * 18, decode=_decode_apr_q4)
_APR_Q8 = _Meaning("APR-native q8", lambda s: 4 + _n(s), decode=_decode_apr_q8)
_BF16_LEGACY = _Meaning("BF16 (pre-GH-438 code 2)", lambda s: _n(s) * 2, ggml=GGMLType.BF16)

# Readings of each code for files without the marker, GGML's first (§4.3, §10.3-4).
_FOREIGN_MEANINGS: dict[int, tuple[_Meaning, ...]] = {
    2: (_ggml_meaning(GGMLType.Q4_0), _BF16_LEGACY),
    3: (_ggml_meaning(GGMLType.Q4_1), _elementwise("F64 (aprender code 3)", 8)),
    4: (_elementwise("I32 (aprender code 4)", 4),),
    5: (_elementwise("I64 (aprender code 5)", 8),),
    6: (_ggml_meaning(GGMLType.Q5_0), _elementwise("I8 (aprender code 6)", 1)),
    7: (_ggml_meaning(GGMLType.Q5_1), _elementwise("U8 (aprender code 7)", 1)),
    8: (_ggml_meaning(GGMLType.Q8_0), _APR_Q4),
    9: (_ggml_meaning(GGMLType.Q8_1), _APR_Q8),
    128: (_APR_Q4,),
    129: (_APR_Q8,),
}


def _meanings(code: int, ggml_codes: bool, where: str) -> tuple[_Meaning, ...]:
    if not ggml_codes and code in _FOREIGN_MEANINGS:
        return _FOREIGN_MEANINGS[code]
    return (_ggml_meaning(ggml_type(code, where)),)


def _resolve_tensor(
    name: str, code: int, shape: tuple[int, ...], raw: np.ndarray, ggml_codes: bool, where: str
) -> QTensor:
    meanings = _meanings(code, ggml_codes, where)
    for m in meanings:
        if m.nbytes(shape) != raw.size:
            continue
        if m.ggml is not None:
            return QTensor(name, m.ggml, shape, raw)
        if m.decode is not None:
            dtype, data = m.decode(raw, shape)
            return QTensor(name, dtype, shape, data)
        raise UnsupportedError(f"{where}: dtype {m.label} is not supported by the engine")
    expected = " or ".join(f"{m.nbytes(shape)} as {m.label}" for m in meanings)
    raise FormatError(f"{where}: size {raw.size} bytes does not match dims {list(shape)} (expected {expected})")


# --------------------------------------------------------------------------------------------
# reader


def read_header(buf: np.ndarray, path: Path | str) -> AprHeader:
    if len(buf) < HEADER.size:
        raise FormatError(f"{path}: truncated APR file: {len(buf)} bytes, the header alone needs {HEADER.size}")
    magic, major, minor, flags, tc, mo, ms, io, do, crc, _ = HEADER.unpack_from(buf, 0)
    if magic not in READ_MAGICS:
        if magic[:3] == b"APR":
            raise UnsupportedError(f"{path}: APR variant {magic!r} is not APR v2 (only APR\\0 and APR2 are read)")
        raise FormatError(f"{path}: not an APR file (magic {magic!r})")
    refused = [name for bit, name in REFUSED_FLAGS.items() if flags & bit]
    if refused:
        raise UnsupportedError(f"{path}: APR flag {', '.join(refused)} (0x{flags:04x}) is not supported")
    if crc:
        header = buf[: HEADER.size].tobytes()
        computed = zlib.crc32(header[:40] + header[44:]) & 0xFFFFFFFF
        if computed != crc:
            raise FormatError(f"{path}: APR header CRC mismatch (stored 0x{crc:08x}, computed 0x{computed:08x})")
    return AprHeader(magic, (major, minor), flags, tc, mo, ms, io, do, crc)


def _read_metadata(buf: np.ndarray, h: AprHeader, path: Path) -> dict[str, Any]:
    if h.metadata_size == 0:
        return {}
    cur = Cursor(buf, path, h.metadata_offset)
    if h.metadata_offset < HEADER.size:
        raise FormatError(f"{path}: metadata offset {h.metadata_offset} overlaps the header")
    raw = cur.raw(h.metadata_size, "APR metadata")

    def bounded_int(text: str) -> int:
        # int() of a long digit string is quadratic and beyond 4300 digits a bare ValueError
        # about sys.set_int_max_str_digits; no metadata integer needs more than a few digits.
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            raise FormatError(f"{path}: APR metadata holds an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS} are read)")
        return int(text)

    try:
        meta = json.loads(raw.decode("utf-8"), parse_int=bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise FormatError(f"{path}: APR metadata is not valid UTF-8 JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: APR metadata is a JSON {type(meta).__name__}, expected an object")
    return meta


def read_apr(path: Path | str) -> AprFile:
    """Parse and validate an APR v2 file; tensors are zero-copy views into its mapping."""
    path = Path(path)
    buf = map_file(path)
    h = read_header(buf, path)
    meta = _read_metadata(buf, h, path)
    ggml_codes = meta.get(DTYPE_CODES_KEY) == "ggml"
    size = len(buf)
    if not h.tensor_index_offset <= h.data_offset <= size:
        raise FormatError(
            f"{path}: tensor index offset {h.tensor_index_offset} / data offset {h.data_offset} "
            f"out of order or past the end of the file ({size} bytes)"
        )
    if h.tensor_index_offset < HEADER.size:
        raise FormatError(f"{path}: tensor index offset {h.tensor_index_offset} overlaps the header")
    if h.metadata_size and h.metadata_offset < h.tensor_index_offset < h.metadata_offset + h.metadata_size:
        raise FormatError(
            f"{path}: tensor index offset {h.tensor_index_offset} lies inside the metadata "
            f"[{h.metadata_offset}, {h.metadata_offset + h.metadata_size})"
        )
    min_entry = 2 + 1 + 1 + 8 + 16  # a one-dim entry with an empty name
    if h.tensor_count * min_entry > h.data_offset - h.tensor_index_offset:
        raise FormatError(
            f"{path}: tensor count {h.tensor_count} cannot fit in the "
            f"{h.data_offset - h.tensor_index_offset}-byte tensor index"
        )
    cur = Cursor(buf, path, h.tensor_index_offset, h.data_offset)
    tensors: dict[str, QTensor] = {}
    ranges: list[tuple[str, int, int]] = []
    for i in range(h.tensor_count):
        name = cur.text(cur.scalar("<H", f"tensor index entry {i}"), f"tensor index entry {i} name")
        label = f"tensor {shown(name)}"
        where = f"{path}: {label}"
        code, ndim = cur.unpack("<BB", f"{label} dtype")
        if not 1 <= ndim <= MAX_NDIM:
            raise FormatError(f"{where}: absurd number of dims {ndim}")
        shape = tuple(int(d) for d in cur.unpack(f"<{ndim}Q", f"{label} dims"))
        offset, nbytes = cur.unpack("<QQ", f"{label} offset and size")
        if name in tensors:
            raise FormatError(f"{where}: duplicate tensor name in the index")
        if 0 in shape:
            raise FormatError(f"{where}: dims {list(shape)} contain a zero")
        start = h.data_offset + offset
        if start + nbytes > size:
            raise FormatError(
                f"{where}: data [{start}, {start + nbytes}) lies past the end of the file ({size} bytes)"
            )
        tensors[name] = _resolve_tensor(name, code, shape, buf[start : start + nbytes], ggml_codes, where)
        ranges.append((name, start, start + nbytes))
    _check_data_offset(h, cur.pos, path)
    # aprender and realizar's writer start every tensor 64-byte aligned (padding between them),
    # realizar's test factories pack them back to back; aprender appends a 4-byte footer CRC. A
    # file whose tensors are neither all aligned nor packed has an offset that moved.
    aligned = all((start - h.data_offset) % ALIGN == 0 for _, start, _ in ranges)
    check_byte_ranges(path, ranges, h.data_offset, size, ALIGN if aligned else 1, tail=ALIGN + 4)
    return AprFile(path, h, meta, tensors, buf, max((r[2] for r in ranges), default=h.data_offset))


def _check_data_offset(h: AprHeader, index_end: int, path: Path) -> None:
    """The data section starts right after the index, or at the next 64-byte boundary: where every
    known writer puts it (§1: aprender and realizar pad to 64, realizar's test factories do not
    pad). Anything else, e.g. a data_offset shifted by one under a re-computed header CRC, would
    read every tensor from the wrong bytes."""
    allowed = sorted({index_end, align64(index_end), h.tensor_index_offset + align64(index_end - h.tensor_index_offset)})
    if h.data_offset not in allowed:
        raise FormatError(
            f"{path}: data offset {h.data_offset} does not follow the tensor index, which ends at {index_end} "
            f"(expected {' or '.join(map(str, allowed))})"
        )


def footer_crc(f: AprFile) -> tuple[int, int] | None:
    """(stored, computed) footer CRC32 (§2.3) when the file has a footer, else None.

    aprender pads the last tensor to 64 bytes and appends the CRC of everything before it, so a
    footer is there exactly when the file ends 4 bytes after that padding; realizar's writers
    add none. Reads the whole file: for `verify`, never for a plain open.
    """
    size = len(f.buffer)
    if size != align64(f.data_end) + 4:
        return None
    crc = 0
    step = 64 << 20
    for start in range(0, size - 4, step):
        crc = zlib.crc32(f.buffer[start : min(start + step, size - 4)], crc)
    return int(f.buffer[size - 4 :].view("<u4")[0]), crc & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# writer


def _index_entry(t: QTensor, offset: int) -> bytes:
    name = t.name.encode("utf-8")
    if len(name) > 0xFFFF:
        raise InputError(f"tensor name too long for APR ({len(name)} bytes): {t.name[:60]}...")
    return (
        struct.pack("<H", len(name)) + name + struct.pack("<BB", int(t.dtype), len(t.shape))
        + struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<QQ", offset, t.data.size)
    )


def write_apr(
    path: Path | str,
    metadata: Mapping[str, Any],
    tensors: Iterable[QTensor],
    *,
    flags: int = FLAG_ROW_MAJOR,
    progress: bool = False,
) -> Path:
    """Write an APR v2 file the way aprender's AprV2Writer lays it out (§1, §7.2), atomically.

    Tensors are sorted by name (byte order) in the index and the data; every section and tensor
    starts 64-byte aligned; header and footer carry CRC32s.
    """
    path = Path(path)
    tensors = sorted(tensors, key=lambda t: t.name.encode("utf-8"))
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise InputError(f"{path}: duplicate tensor name {t.name}")
        seen.add(t.name)
        if not 1 <= len(t.shape) <= MAX_NDIM or 0 in t.shape:
            raise InputError(f"{path}: tensor {t.name} has unwritable shape {list(t.shape)}")
        if t.data.dtype != np.uint8 or t.data.ndim != 1 or t.data.size != t.nbytes:
            raise InputError(
                f"{path}: tensor {t.name}: {t.dtype.name} {list(t.shape)} needs {t.nbytes} bytes, "
                f"got a {t.data.dtype} array of shape {t.data.shape}"
            )
    if refused := [n for bit, n in REFUSED_FLAGS.items() if flags & bit]:
        raise InputError(f"{path}: refusing to write APR flag {', '.join(refused)}")
    meta = dict(metadata)
    if any(t.dtype not in PORTABLE for t in tensors):
        meta[DTYPE_CODES_KEY] = "ggml"
    _check_no_aliases(meta)
    try:
        meta_json = json.dumps(meta, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError as e:
        raise InputError(f"{path}: APR metadata is not valid JSON ({e})") from None
    meta_bytes = meta_json.encode("utf-8")

    index, offset = bytearray(), 0
    for t in tensors:
        index += _index_entry(t, offset)
        offset += align64(t.data.size)
    index_offset = HEADER.size + align64(len(meta_bytes))
    data_offset = index_offset + align64(len(index))
    header = bytearray(
        HEADER.pack(MAGIC, 2, 0, flags, len(tensors), HEADER.size, len(meta_bytes), index_offset, data_offset, 0, bytes(20))
    )
    struct.pack_into("<I", header, 40, zlib.crc32(bytes(header[:40] + header[44:])) & 0xFFFFFFFF)

    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        crc = 0

        def put(data: bytes | memoryview) -> None:
            nonlocal crc
            f.write(data)
            crc = zlib.crc32(data, crc)

        put(bytes(header))
        put(meta_bytes + bytes(index_offset - HEADER.size - len(meta_bytes)))
        put(bytes(index) + bytes(data_offset - index_offset - len(index)))
        with tqdm(total=offset, unit="B", unit_scale=True, desc=path.name, file=sys.stderr, disable=not progress) as bar:
            for t in tensors:
                put(memoryview(np.ascontiguousarray(t.data)))
                put(bytes(align64(t.data.size) - t.data.size))
                bar.update(align64(t.data.size))
        f.write(struct.pack("<I", crc & 0xFFFFFFFF))
    return path
