"""Read a whole model file and check its data: `q4k-engine verify MODEL`, `load(..., verify=True)`.

Opening a file (loader.open_model) validates its structure: header, metadata, names, shapes and
every tensor's byte range. It never reads tensor data (the file is mapped, pages come in as the
forward touches them), so bytes damaged inside a tensor open fine and then yield NaN logits, which
the provider refuses at run time. Verification finds them before: it reads every byte, checks the
APR footer CRC32 where the file has one (apr-v2-format.md §2.3; GGUF has no checksum), and decodes
every tensor with the NumPy dequantizers, a bounded block of rows at a time, looking for NaN/Inf.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .apr import footer_crc, read_apr
from .errors import FormatError
from .quants import dequantize_rows
from .tensors import ModelFile, QTensor

# Values decoded at a time (float32: 16 MiB), whatever the tensor's size.
CHUNK_VALUES = 1 << 22


@dataclass(frozen=True)
class TensorCheck:
    name: str
    dtype: str
    shape: tuple[int, ...]
    rows: int
    bad_row: int | None  # first row (all dims but the last, flattened) holding a NaN or Inf

    @property
    def ok(self) -> bool:
        return self.bad_row is None

    @property
    def status(self) -> str:
        return "ok" if self.ok else f"NaN/Inf in row {self.bad_row} of {self.rows}"


@dataclass(frozen=True)
class ChecksumCheck:
    ok: bool
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    path: str
    checksum: ChecksumCheck
    tensors: list[TensorCheck]

    @property
    def failures(self) -> list[str]:
        out = [] if self.checksum.ok else [self.checksum.detail]
        return out + [f"tensor {t.name} ({t.dtype}): {t.status}" for t in self.tensors if not t.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_if_failed(self) -> None:
        """One line for the whole report: how many checks failed, and the first of them."""
        failures = self.failures
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise FormatError(f"{self.path}: verification failed: {failures[0]}{more}; the file is corrupt")


def check_tensor(t: QTensor) -> TensorCheck:
    """Decode `t` block of rows by block of rows; the first row with a non-finite value, if any."""
    step = max(1, CHUNK_VALUES // max(t.cols, 1))
    bad = None
    for start in range(0, t.rows, step):
        values = dequantize_rows(t, start, min(start + step, t.rows))
        finite = np.isfinite(values)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite.all(axis=1))[0])
            break
    return TensorCheck(t.name, t.dtype.name, t.shape, t.rows, bad)


def check_checksum(model: ModelFile) -> ChecksumCheck:
    if model.format != "apr":
        return ChecksumCheck(True, f"none ({model.format.upper()} files carry no checksum)")
    crc = footer_crc(read_apr(model.path))
    if crc is None:
        return ChecksumCheck(True, "no footer CRC (written by a realizar tool, which adds none)")
    stored, computed = crc
    if stored != computed:
        return ChecksumCheck(False, f"footer CRC32 mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})")
    return ChecksumCheck(True, f"footer CRC32 0x{stored:08x} ok")


def verify_model(model: ModelFile, on_tensor: Callable[[TensorCheck], None] | None = None) -> VerifyReport:
    """Every check of the module on an opened model; `on_tensor` sees each tensor's result as it
    comes (the CLI prints it), since decoding a 7B file on the CPU takes a while."""
    checksum = check_checksum(model)
    tensors = []
    for t in model.tensors.values():
        check = check_tensor(t)
        tensors.append(check)
        if on_tensor is not None:
            on_tensor(check)
    return VerifyReport(str(model.path), checksum, tensors)
