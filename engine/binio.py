"""Bounds-checked reading of memory-mapped model files, shared by the APR and GGUF readers.

Every read goes through `Cursor`, which checks the bytes exist before touching them, so a corrupt
or truncated file ends in a one-line FormatError naming the file, never in an out-of-bounds read
or a stray struct/numpy exception.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import FormatError, InputError


def map_file(path: Path) -> np.ndarray:
    """The whole file as a read-only 1-D uint8 array backed by an mmap (no copy).

    Views sliced from it keep the mapping alive; the file is never read eagerly.
    """
    with open_input(path) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise FormatError(f"{path}: empty file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=np.uint8)


@contextmanager
def open_input(path: Path) -> Iterator:
    """`open(path, "rb")` whose failures to open are one-line InputErrors naming the file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a model file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    with f:
        yield f


class Cursor:
    """A read position in a byte buffer; every read is bounds-checked against `end`."""

    def __init__(self, buf: np.ndarray, path: Path | str, pos: int = 0, end: int | None = None):
        self.buf = buf
        self.path = path
        self.pos = pos
        self.end = len(buf) if end is None else end

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise FormatError(
                f"{self.path}: truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"only {max(self.end - self.pos, 0)} remain"
            )

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def scalar(self, fmt: str, what: str):
        return self.unpack(fmt, what)[0]

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.buf[self.pos : self.pos + n].tobytes()
        self.pos += n
        return out

    def text(self, n: int, what: str) -> str:
        data = self.raw(n, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} at offset {self.pos - n} is not valid UTF-8") from None

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        """`count` little-endian items as a zero-copy view."""
        dtype = np.dtype(dtype)
        self.need(count * dtype.itemsize, what)
        out = self.buf[self.pos : self.pos + count * dtype.itemsize].view(dtype)
        self.pos += count * dtype.itemsize
        return out


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The project's one writer of output files (models, logits, shards). A crash, an error or Ctrl-C
    never leaves a half-written file under the final name nor a temporary one beside it, and
    readers of the old file keep a consistent view (the rename is atomic on POSIX). The file gets
    the mode a plain open() would give it (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: output directory {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:  # unwritable directory, full disk: the user's to fix, not a bug
        raise InputError(f"{path}: cannot write: {e.strerror or e}") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


UNITS = "kB, MB, GB = 1e3, 1e6, 1e9 bytes"  # stated by every report that uses human_bytes


def human_bytes(n: float) -> str:
    """A size for a message, in decimal units (kB = 1e3, MB = 1e6, GB = 1e9 bytes) as every memory
    figure of the engine: never mixed with binary ones (GiB) in one report."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} GB" if unit == "GB" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_byte_ranges(
    path: Path | str, ranges: list[tuple[str, int, int]], lo: int, hi: int, pad: int, tail: int
) -> None:
    """The tensors' bytes [start, end) tile the data section [lo, hi) the way safetensors demands
    of its header before any byte of data is trusted, give or take the writers' alignment:

    sorted by start, no two neighbours overlap, the gap before the first tensor and between
    neighbours holds fewer than `pad` bytes, the one after the last fewer than `tail` (padding and
    a footer). A byte no tensor owns means an offset moved or a dtype whose size differs from the
    writer's; an overlap, the same. One FormatError names the tensor or both tensors.
    """
    for name, start, end in ranges:
        if start < lo or end > hi:
            raise FormatError(f"{path}: tensor {shown(name)}: data [{start}, {end}) lies outside the data section [{lo}, {hi})")
    ordered = sorted(ranges, key=lambda r: (r[1], r[2]))
    if not ordered:
        return
    if ordered[0][1] - lo >= pad:
        raise FormatError(f"{path}: the {ordered[0][1] - lo} bytes before tensor {shown(ordered[0][0])} belong to no tensor")
    for (a, a_start, a_end), (b, b_start, b_end) in zip(ordered, ordered[1:]):
        if b_start < a_end:
            raise FormatError(f"{path}: tensors {shown(a)} [{a_start}, {a_end}) and {shown(b)} [{b_start}, {b_end}) overlap")
        if b_start - a_end >= pad:
            raise FormatError(f"{path}: the {b_start - a_end} bytes between tensors {shown(a)} and {shown(b)} belong to no tensor")
    name, _, end = ordered[-1]
    if hi - end >= tail:
        raise FormatError(
            f"{path}: the {hi - end} bytes after tensor {shown(name)}, the last one, belong to no tensor "
            f"(at most {tail - 1} can be padding or a footer)"
        )


def shown(value: object, limit: int = 80) -> str:
    """A file-supplied name or value, safe for a one-line message: printable and short."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


HASH_CHUNK = 8 << 20  # bytes read at a time when hashing a file


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks (a 7B model is never in memory at once); InputError when
    it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(HASH_CHUNK):
                h.update(block)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()
