"""GGML tensor types: one data-driven table shared by APR, GGUF, the quantizers and the kernels.

Codes are GGML's `ggml_type` numbering, which APR v2 uses for codes 0-31 (apr-v2-format.md §4.3).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    BF16 = 30


@dataclass(frozen=True)
class TypeInfo:
    block_size: int  # elements per block
    type_size: int  # bytes per block


TYPE_INFO: dict[GGMLType, TypeInfo] = {
    GGMLType.F32: TypeInfo(1, 4),
    GGMLType.F16: TypeInfo(1, 2),
    GGMLType.BF16: TypeInfo(1, 2),
    GGMLType.Q4_0: TypeInfo(32, 18),
    GGMLType.Q4_1: TypeInfo(32, 20),
    GGMLType.Q5_0: TypeInfo(32, 22),
    GGMLType.Q5_1: TypeInfo(32, 24),
    GGMLType.Q8_0: TypeInfo(32, 34),
    GGMLType.Q2_K: TypeInfo(256, 84),
    GGMLType.Q3_K: TypeInfo(256, 110),
    GGMLType.Q4_K: TypeInfo(256, 144),
    GGMLType.Q5_K: TypeInfo(256, 176),
    GGMLType.Q6_K: TypeInfo(256, 210),
}

# Types the engine can dequantize and multiply (CPU and CUDA). Others are refused at load time.
SUPPORTED: frozenset[GGMLType] = frozenset(
    {
        GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1,
        GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
    }
)


def row_bytes(dtype: GGMLType, cols: int) -> int:
    """Bytes of one stored row of `cols` values; quantized rows are padded to whole blocks."""
    info = TYPE_INFO[dtype]
    return -(-cols // info.block_size) * info.type_size


def tensor_bytes(dtype: GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes of a row-major tensor whose last dim is contiguous (APR/NumPy order)."""
    if not shape:
        return TYPE_INFO[dtype].type_size
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * row_bytes(dtype, shape[-1])
