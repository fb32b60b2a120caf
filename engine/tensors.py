"""Plain data that flows from the file readers to the backends."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig
from .dtypes import GGMLType, row_bytes, tensor_bytes


@dataclass(frozen=True)
class QTensor:
    """One stored tensor: raw bytes (a zero-copy view of the mapped file) plus dtype and shape.

    `shape` is row-major, outermost first (APR/NumPy order: a weight is [out, in]); GGUF's ne is
    reversed on read. The bytes are exactly the file's bytes: Q4_K stays Q4_K.
    """

    name: str
    dtype: GGMLType
    shape: tuple[int, ...]
    data: np.ndarray  # 1-D uint8 view, len == nbytes

    @property
    def rows(self) -> int:
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.dtype, self.cols)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.dtype, self.shape)


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer embedded in a model file, in GGUF's vocabulary (`tokenizer.ggml.*`)."""

    model: str  # "gpt2" (byte-level BPE with merges) or "llama" (SentencePiece with scores)
    tokens: list[str]
    merges: list[str] | None = None
    scores: list[float] | None = None
    token_types: list[int] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    pre: str | None = None
    chat_template: str | None = None


@dataclass
class ModelFile:
    """A parsed, validated model file. Tensors use the internal (GGUF-style) names."""

    path: Path
    format: str  # "apr" or "gguf"
    config: ModelConfig
    tensors: dict[str, QTensor]
    tokenizer: TokenizerSpec | None
    metadata: dict[str, Any] = field(default_factory=dict)
    _keepalive: Any = None  # the mmap / reader that owns the tensor views
