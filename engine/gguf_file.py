"""GGUF container: a memory-mapped, validating reader and a writer (through gguf.GGUFWriter).

The reader is our own rather than gguf.GGUFReader: on corrupt files GGUFReader raises whatever
NumPy or struct raise (IndexError, ValueError, KeyError...), and a corrupted array length makes it
loop for ~2^64 iterations appending empty reads. Here every count is checked against the bytes
left before it is trusted, every read goes through binio.Cursor, and each problem is a one-line
FormatError naming the file and the key or tensor. Tensor data are zero-copy views.

Shapes: GGUF lists ne = [ne0 (contiguous), ne1, ...]; tensors here use the reverse, row-major
[..., ne1, ne0] = [out, in] order, over the same bytes (apr-v2-format.md §4.4).
"""
from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import gguf
import numpy as np
from tqdm import tqdm

from .binio import Cursor, atomic_output, check_byte_ranges, map_file, shown
from .dtypes import TYPE_INFO, GGMLType, tensor_bytes
from .errors import FormatError, InputError, UnsupportedError
from .tensors import QTensor

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_NDIM = 4  # GGML_MAX_DIMS
MAX_NESTING = 2  # arrays of arrays of scalars at most; GGUF allows nesting, nobody uses more

# TokenizerSpec field -> GGUF key (architectures.md, "GGUF names and metadata").
TOKENIZER_KEYS: dict[str, str] = {
    "model": "tokenizer.ggml.model",
    "tokens": "tokenizer.ggml.tokens",
    "merges": "tokenizer.ggml.merges",
    "scores": "tokenizer.ggml.scores",
    "token_types": "tokenizer.ggml.token_type",
    "bos_id": "tokenizer.ggml.bos_token_id",
    "eos_id": "tokenizer.ggml.eos_token_id",
    "pad_id": "tokenizer.ggml.padding_token_id",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "pre": "tokenizer.ggml.pre",
    "chat_template": "tokenizer.chat_template",
}


class ValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_NUMPY: dict[ValueType, str] = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8", ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}


@dataclass
class GGUFFile:
    path: Path
    version: int
    alignment: int
    metadata: dict[str, Any]
    tensors: dict[str, QTensor]  # GGUF names, shapes in [out, in] order
    buffer: np.ndarray  # the mapping the tensor views point into


def ggml_type(code: int, where: str) -> GGMLType:
    """The GGML type of a dtype code whose block size the engine knows; else a one-line error."""
    if code in GGMLType._value2member_map_ and GGMLType(code) in TYPE_INFO:
        return GGMLType(code)
    if code in gguf.GGMLQuantizationType._value2member_map_:
        name = gguf.GGMLQuantizationType(code).name
        raise UnsupportedError(f"{where}: dtype {name} (GGML code {code}) is not supported")
    raise FormatError(f"{where}: unknown dtype code {code}")


# --------------------------------------------------------------------------------------------
# reader


def _read_value(cur: Cursor, vtype: int, what: str, depth: int = 0) -> Any:
    try:
        vt = ValueType(vtype)
    except ValueError:
        raise FormatError(f"{cur.path}: {what} has unknown value type {vtype}") from None
    if vt == ValueType.STRING:
        return cur.text(cur.scalar("<Q", what), what)
    if vt != ValueType.ARRAY:
        value = cur.array(_NUMPY[vt], 1, what)[0]
        return bool(value) if vt == ValueType.BOOL else value.item()
    itype, count = cur.unpack("<IQ", what)
    if itype == ValueType.ARRAY and depth >= MAX_NESTING:
        raise FormatError(f"{cur.path}: {what} nests arrays deeper than {MAX_NESTING}")
    if itype in (ValueType.STRING, ValueType.ARRAY):
        min_item = 8 if itype == ValueType.STRING else 12
        cur.need(count * min_item, f"{what} ({count} items)")  # before looping over `count`
        return [_read_value(cur, itype, what, depth + 1) for _ in range(count)]
    try:
        dtype = _NUMPY[ValueType(itype)]
    except (ValueError, KeyError):
        raise FormatError(f"{cur.path}: {what} has unknown array item type {itype}") from None
    items = cur.array(dtype, count, f"{what} ({count} items)")
    return items.astype(bool).tolist() if itype == ValueType.BOOL else items.tolist()


def _read_tensor_infos(cur: Cursor, count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    infos = []
    for i in range(count):
        name = cur.text(cur.scalar("<Q", f"tensor info {i} name"), f"tensor info {i} name")
        where = f"tensor {shown(name)}"
        ndim = cur.scalar("<I", f"{where} n_dims")
        if not 1 <= ndim <= MAX_NDIM:
            raise FormatError(f"{cur.path}: {where}: absurd number of dims {ndim}")
        ne = cur.unpack(f"<{ndim}Q", f"{where} dims")
        code, offset = cur.unpack("<IQ", f"{where} type and offset")
        infos.append((name, tuple(int(d) for d in reversed(ne)), code, offset))
    return infos


def read_gguf(path: Path | str) -> GGUFFile:
    """Parse and validate a GGUF v2/v3 file; tensors are zero-copy views into its mapping."""
    path = Path(path)
    buf = map_file(path)
    cur = Cursor(buf, path)
    if cur.raw(4, "GGUF magic") != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {buf[:4].tobytes()!r})")
    version = cur.scalar("<I", "GGUF version")
    if version & 0xFFFF == 0 and version:
        raise UnsupportedError(f"{path}: big-endian GGUF is not supported")
    if version not in (2, 3):
        raise UnsupportedError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    n_tensors, n_kv = cur.unpack("<QQ", "GGUF counts")
    # Cheapest possible entries: a key/value needs 13 bytes, a tensor info 32; anything more
    # than the file can hold is corruption, refused before a loop runs over it.
    if n_kv * 13 + n_tensors * 32 > len(buf) - cur.pos:
        raise FormatError(f"{path}: counts ({n_tensors} tensors, {n_kv} keys) cannot fit in {len(buf)} bytes")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.text(cur.scalar("<Q", "metadata key"), "metadata key")
        if key in meta:
            raise FormatError(f"{path}: duplicate metadata key {shown(key)}")
        meta[key] = _read_value(cur, cur.scalar("<I", f"metadata {shown(key)} type"), f"metadata {shown(key)}")
    infos = _read_tensor_infos(cur, n_tensors)

    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment {shown(alignment)} is not a positive power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, QTensor] = {}
    ranges: list[tuple[str, int, int]] = []
    for name, shape, code, offset in infos:
        where = f"{path}: tensor {shown(name)}"
        if name in tensors:
            raise FormatError(f"{where}: duplicate tensor name")
        if 0 in shape:
            raise FormatError(f"{where}: dims {list(shape)} contain a zero")
        dtype = ggml_type(code, where)
        block = TYPE_INFO[dtype].block_size
        if shape[-1] % block:
            raise FormatError(f"{where}: row length {shape[-1]} is not a multiple of the {dtype.name} block ({block})")
        if offset % alignment:
            raise FormatError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
        start, nbytes = data_start + offset, tensor_bytes(dtype, shape)
        if start + nbytes > len(buf):
            raise FormatError(
                f"{where}: data [{start}, {start + nbytes}) lies past the end of the file ({len(buf)} bytes)"
            )
        tensors[name] = QTensor(name, dtype, shape, buf[start : start + nbytes])
        ranges.append((name, start, start + nbytes))
    # llama.cpp and gguf-py lay tensors out back to back, each padded to the alignment: fewer than
    # `alignment` bytes between and after them. A changed general.alignment moves where the data
    # section starts, which this tiling rule (and the file's end) reveals.
    check_byte_ranges(path, ranges, data_start, len(buf), alignment, alignment)
    return GGUFFile(path, version, alignment, meta, tensors, buf)


# --------------------------------------------------------------------------------------------
# writer

# Keys whose GGUF type llama.cpp checks and that inference from Python values would get wrong.
_ARRAY_TYPES = {
    "tokenizer.ggml.token_type": gguf.GGUFValueType.INT32,
    "tokenizer.ggml.scores": gguf.GGUFValueType.FLOAT32,
}


def _value_type(values: list[Any], key: str) -> gguf.GGUFValueType:
    """GGUF type for Python values: llama.cpp wants u32 counts, f32 reals, i32 arrays."""
    VT = gguf.GGUFValueType
    if all(isinstance(v, bool) for v in values):
        return VT.BOOL
    if all(isinstance(v, str) for v in values):
        return VT.STRING
    if all(isinstance(v, (list, tuple)) for v in values):
        return VT.ARRAY
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        lo, hi = min(values), max(values)
        if 0 <= lo and hi < 2**32:
            return VT.UINT32
        if -(2**63) <= lo and hi < 2**63:
            return VT.INT64
        raise InputError(f"GGUF metadata {key}: integer out of 64-bit range")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return VT.FLOAT32
    raise InputError(f"GGUF metadata {key}: cannot store values of type {type(values[0]).__name__}")


def write_gguf(
    path: Path | str, metadata: Mapping[str, Any], tensors: Iterable[QTensor], *, progress: bool = False
) -> Path:
    """Write a GGUF v3 file (atomically) with gguf.GGUFWriter; tensor bytes are copied verbatim.

    Empty arrays are skipped (GGUF cannot store them). Tensors are announced first and their bytes
    read (np.asarray) one at a time while writing, so lazily made tensors (shapes.LazyBytes) are
    never all in memory at once.
    """
    path = Path(path)
    tensors = list(tensors)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InputError(f"{path}: GGUF metadata needs general.architecture")
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        for key, value in metadata.items():
            if key == "general.architecture" or value is None:
                continue
            if isinstance(value, (list, tuple)):
                if not value:
                    continue
                sub = _ARRAY_TYPES.get(key) or _value_type(list(value), key)
                if sub == gguf.GGUFValueType.UINT32:
                    sub = gguf.GGUFValueType.INT32  # llama.cpp reads integer arrays as i32
                w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub)
            else:
                w.add_key_value(key, value, _value_type([value], key))
        for t in tensors:
            if t.cols % TYPE_INFO[t.dtype].block_size:
                raise UnsupportedError(
                    f"{path}: tensor {t.name}: rows of {t.cols} values are not whole {t.dtype.name} "
                    "blocks, which GGUF cannot store"
                )
            w.add_tensor_info(t.name, (*t.shape[:-1], t.row_bytes), np.dtype(np.uint8), t.nbytes,
                              raw_dtype=gguf.GGMLQuantizationType(int(t.dtype)))
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            total = sum(t.nbytes for t in tensors)
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, file=sys.stderr, disable=not progress) as bar:
                for t in tensors:  # in announcement order: the writer pops its tensor infos in order
                    w.write_tensor_data(np.asarray(t.data).reshape(*t.shape[:-1], t.row_bytes))
                    bar.update(t.nbytes)
        finally:
            w.close()
    return path
