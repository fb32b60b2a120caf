"""Published model shapes (Qwen2 7B/32B/72B, Llama 3 8B/70B) as synthetic Q4_K_M models, made
tensor by tensor.

The whole-model benchmarks need a teacher of a real size whose speed and memory are those of the
real checkpoint; its values only need to be plausible. So no float weight is quantized: valid
GGML blocks are drawn directly (random quant bytes and scales; super-scales chosen so that the
dequantized weights have std ~0.02 and mean ~0, like a trained model). Tensor types follow
llama.cpp's Q4_K_M recipe (`q4_k_m_storage`): Q4_K matrices, Q6_K for the LM head and for
attn_v / ffn_down of the "more bits" layers, and llama.cpp's fallback where rows are not whole
256-blocks (Qwen2-72B's ffn_down, 29568 columns: Q5_0, Q8_0 for the Q6_K layers); F32 norms and
QKV biases. The tokenizer is synthetic.byte_level_tokenizer padded with unused `[PAD<i>]` tokens
to the vocabulary size, as llama.cpp's converter pads Qwen2's, so llama.cpp loads the GGUF.

`shape_model` returns a ModelFile whose tensor bytes are made only when a writer reads them
(`np.asarray`), one tensor at a time, in threads over chunks of the tensor; so `save_model`
streams a 47 GB model to disk holding one tensor (at most the ~1 GB LM head) in memory. The bytes
depend only on (seed, tensor name, chunk), never on the thread count or the writing order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import ModelConfig, expected_shapes
from .convert import FILE_TYPE_Q4_K_M, q4_k_m_type
from .dtypes import TYPE_INFO, GGMLType, tensor_bytes
from .errors import InputError
from .loader import arch_config
from .quants import f16_bytes
from .tensors import ModelFile, QTensor, TokenizerSpec

WEIGHT_STD = 0.02
_CHUNK_BYTES = 32 << 20  # one thread's share of a tensor (also the unit of the seeding)


@dataclass(frozen=True)
class Shape:
    """The dimensions of a published checkpoint (its config.json), by which name it is known."""

    arch: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    context: int
    source: str  # the checkpoint whose config.json these numbers are
    rope_theta: float | None = None  # None: the architecture's default
    rms_eps: float | None = None

    def config(self, n_layers: int | None = None) -> ModelConfig:
        extra = {k: v for k, v in (("rope_theta", self.rope_theta), ("rms_eps", self.rms_eps)) if v is not None}
        return arch_config(
            self.arch, n_layers=n_layers or self.n_layers, hidden=self.hidden, ffn=self.ffn, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, head_dim=self.hidden // self.n_heads, vocab_size=self.vocab,
            context_length=self.context, tied_head=False, **extra,
        )


SHAPES: dict[str, Shape] = {
    # CI's stand-in (llama.cpp's fallback types are tested with ffn 384, rows of 1.5 256-blocks).
    "tiny": Shape("qwen2", 2, 256, 512, 4, 2, 640, 2048, "none (test shape)"),
    "qwen2-7b": Shape("qwen2", 28, 3584, 18944, 28, 4, 152064, 32768, "Qwen/Qwen2-7B"),
    "qwen2-32b": Shape("qwen2", 64, 5120, 27648, 40, 8, 152064, 32768, "Qwen/Qwen2.5-32B-Instruct"),
    "qwen2-72b": Shape("qwen2", 80, 8192, 29568, 64, 8, 152064, 32768, "Qwen/Qwen2-72B"),
    "llama3-8b": Shape("llama", 32, 4096, 14336, 32, 8, 128256, 8192, "meta-llama/Meta-Llama-3-8B", 5e5, 1e-5),
    "llama3-70b": Shape("llama", 80, 8192, 28672, 64, 8, 128256, 8192, "meta-llama/Meta-Llama-3-70B", 5e5, 1e-5),
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise InputError(f"unknown model shape {name!r} (one of {', '.join(SHAPES)})")
    return SHAPES[name]


# --------------------------------------------------------------------------------------------
# tensor types


def q4_k_m_storage(name: str, cols: int, n_layers: int, tied: bool) -> GGMLType:
    """llama.cpp's Q4_K_M type of a matrix, its fallback for rows that are not whole 256-blocks
    included (llama-quant.cpp: Q4_K -> Q5_0, Q6_K -> Q8_0). The project's own quantizer writes
    F16 there (convert.q4_k_m_type: the types an APR file holds portably); a synthetic GGUF follows
    llama.cpp, so its size is a real file's."""
    intended = q4_k_m_type(name, 256, n_layers, tied)  # the recipe's K-quant for this tensor
    if cols % 256 == 0:
        return intended
    if cols % 32:
        raise InputError(f"{name}: rows of {cols} values are not whole 32-blocks")
    return GGMLType.Q8_0 if intended == GGMLType.Q6_K else GGMLType.Q5_0


def inventory(config: ModelConfig) -> list[tuple[str, tuple[int, ...], GGMLType]]:
    """(name, shape, type) of every tensor of a Q4_K_M file of `config`."""
    out = []
    for name, (shape, required) in expected_shapes(config).items():
        if not required:  # rope_freqs; the tied head
            continue
        dtype = GGMLType.F32 if len(shape) == 1 else q4_k_m_storage(name, shape[1], config.n_layers, config.tied_head)
        out.append((name, shape, dtype))
    return out


def weight_bytes(config: ModelConfig) -> int:
    """Bytes of all tensors of a Q4_K_M file of `config` (what the GPU holds after upload)."""
    return sum(tensor_bytes(dtype, shape) for _, shape, dtype in inventory(config))


# --------------------------------------------------------------------------------------------
# block generators

# std of a value in units of d for uniform random quant bytes: d = WEIGHT_STD / std / the rms of
# the per-block jitter (uniform 0.5-1.5). Q4_K's value is d sc q - dmin m: dmin is chosen so that
# the mean of dmin m cancels the mean of d sc q, and the spread of m adds to the variance.
_JITTER_RMS = np.sqrt(13 / 12)
_SC = np.arange(64.0)
_Q4 = np.arange(16.0)
_Q4K_MEAN = _SC.mean() * _Q4.mean()
_Q4K_DMIN = _Q4K_MEAN / _SC.mean()  # dmin / d
_Q4K_STD = np.sqrt((_SC ** 2).mean() * (_Q4 ** 2).mean() - _Q4K_MEAN ** 2 + (_Q4K_DMIN * _SC.std()) ** 2)
_Q6K_STD = np.sqrt((np.arange(-128.0, 128.0) ** 2).mean() * ((np.arange(64.0) - 32) ** 2).mean())
_Q5_0_STD = np.arange(-16.0, 16.0).std()
_Q8_0_STD = np.sqrt((np.arange(-128.0, 128.0) ** 2).mean())
# Offset of the f16 scale(s) in a block, and the std of the rest.
_SCALE_AT = {GGMLType.Q4_K: 0, GGMLType.Q6_K: 208, GGMLType.Q5_0: 0, GGMLType.Q8_0: 0}
_INT_STD = {GGMLType.Q4_K: _Q4K_STD, GGMLType.Q6_K: _Q6K_STD, GGMLType.Q5_0: _Q5_0_STD, GGMLType.Q8_0: _Q8_0_STD}
BLOCK_TYPES = tuple(_SCALE_AT)


def fill_blocks(out: np.ndarray, dtype: GGMLType, rng: np.random.Generator) -> None:
    """Fill `out` (uint8 [n_blocks, type_size]) with random valid blocks of `dtype` whose values
    have std ~WEIGHT_STD (each block's scale jittered by 0.5-1.5x) and mean ~0."""
    if dtype not in _SCALE_AT:
        raise InputError(f"no block generator for {GGMLType(dtype).name} (one of {', '.join(t.name for t in BLOCK_TYPES)})")
    n, size = out.shape
    if size != TYPE_INFO[dtype].type_size:
        raise InputError(f"{GGMLType(dtype).name} blocks are {TYPE_INFO[dtype].type_size} bytes, not {size}")
    words = -(-out.size // 8)
    out.reshape(-1)[:] = rng.bit_generator.random_raw(words).view(np.uint8)[: out.size]
    d = WEIGHT_STD / (_INT_STD[dtype] * _JITTER_RMS) * rng.uniform(0.5, 1.5, n)
    at = _SCALE_AT[dtype]
    out[:, at:at + 2] = f16_bytes(d)
    if dtype == GGMLType.Q4_K:  # dmin (any 6-bit mins are valid) cancels the mean of sc * q
        out[:, 2:4] = f16_bytes(d * _Q4K_DMIN)


def _key(seed: int, name: str, chunk: int) -> list[int]:
    """Seed words of one chunk of one tensor: a hash of the name, never Python's salted hash()."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return [seed, int.from_bytes(digest, "little"), chunk]


def _chunk_rng(seed: int, name: str, chunk: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(_key(seed, name, chunk))))


def tensor_bytes_for(name: str, shape: tuple[int, ...], dtype: GGMLType, seed: int, workers: int = 1) -> np.ndarray:
    """The bytes of one synthetic tensor (1-D uint8), made in chunks on `workers` threads."""
    if len(shape) == 1:
        rng = _chunk_rng(seed, name, 0)
        values = rng.normal(0.0, 0.1, shape) if name.endswith(".bias") else rng.uniform(0.8, 1.2, shape)
        return values.astype(np.float32).view(np.uint8).reshape(-1)
    info = TYPE_INFO[dtype]
    n_blocks = shape[0] * (shape[1] // info.block_size)
    out = np.empty((n_blocks, info.type_size), np.uint8)
    per_chunk = max(1, _CHUNK_BYTES // info.type_size)
    starts = range(0, n_blocks, per_chunk)

    def one(i: int) -> None:
        s = starts[i]
        fill_blocks(out[s:s + per_chunk], dtype, _chunk_rng(seed, name, i))

    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(workers, len(starts))) as ex:
            list(ex.map(one, range(len(starts))))  # list(): re-raise a worker's error
    else:
        for i in range(len(starts)):
            one(i)
    return out.reshape(-1)


class LazyBytes:
    """A tensor's bytes made when a writer reads them (np.asarray / np.ascontiguousarray call
    __array__); the writers need only dtype, ndim and size beforehand. Nothing is cached: a
    written tensor's memory is freed as soon as the writer drops it."""

    dtype = np.dtype(np.uint8)
    ndim = 1

    def __init__(self, size: int, make: Callable[[], np.ndarray]):
        self.size = size
        self.shape = (size,)
        self._make = make

    def __len__(self) -> int:
        return self.size

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self._make()
        if data.size != self.size:
            raise AssertionError(f"made {data.size} bytes, promised {self.size}")
        return data if dtype is None else data.astype(dtype)


# --------------------------------------------------------------------------------------------
# models


def shape_tokenizer(vocab: int) -> TokenizerSpec:
    """synthetic.byte_level_tokenizer, padded to `vocab` tokens with unused `[PAD<i>]` entries
    (GGUF token type 5, as llama.cpp's converter pads Qwen2's vocabulary to its embedding rows)."""
    from .synthetic import byte_level_tokenizer

    base = byte_level_tokenizer()
    n = len(base.tokens)
    if vocab < n:
        raise InputError(f"vocabulary of {vocab} is smaller than the synthetic tokenizer's {n} tokens")
    pads = [f"[PAD{i}]" for i in range(n, vocab)]
    return dataclasses.replace(base, tokens=[*base.tokens, *pads], token_types=[*base.token_types, *[5] * len(pads)])


def shape_model(shape: str | Shape, *, n_layers: int | None = None, seed: int = 0,
                workers: int | None = None) -> ModelFile:
    """The synthetic Q4_K_M model of a shape (name or Shape), its tensors made lazily (module
    docstring); `n_layers` cuts the layer count (quick runs); `workers` threads per tensor
    (default: the CPU count)."""
    spec = get_shape(shape) if isinstance(shape, str) else shape
    name = shape if isinstance(shape, str) else f"{spec.arch}-custom"
    config = spec.config(n_layers)
    workers = workers or os.cpu_count() or 1
    tensors: dict[str, QTensor] = {}
    for tname, tshape, dtype in inventory(config):
        nbytes = tensor_bytes(dtype, tshape)

        def make(tname: str = tname, tshape: tuple[int, ...] = tshape, dtype: GGMLType = dtype) -> np.ndarray:
            return tensor_bytes_for(tname, tshape, dtype, seed, workers)

        tensors[tname] = QTensor(tname, dtype, tshape, LazyBytes(nbytes, make))  # type: ignore[arg-type]
    label = f"synthetic-{name}-q4_k_m" + (f"-{config.n_layers}l" if n_layers else "")
    # general.file_type: llama.cpp otherwise guesses the file type from the commonest tensor type,
    # which for few layers or the 72B's many F32 norms and biases reads "all F32"
    return ModelFile(Path(label), "synthetic", config, tensors, shape_tokenizer(spec.vocab),
                     {"general.name": label, "general.file_type": FILE_TYPE_Q4_K_M})


def write_shape(path: Path | str, shape: str | Shape, fmt: str | None = None, *, n_layers: int | None = None,
                seed: int = 0, workers: int | None = None, progress: bool = False) -> Path:
    """Write the synthetic model of `shape` to `path` as APR or GGUF (default: by the suffix),
    streaming tensor by tensor; atomic (no partial file under `path` on failure)."""
    from .apr import PORTABLE
    from .convert import save_model

    path = Path(path)
    fmt = fmt or ("gguf" if path.suffix.lower() == ".gguf" else "apr")
    model = shape_model(shape, n_layers=n_layers, seed=seed, workers=workers)
    foreign = sorted({t.dtype.name for t in model.tensors.values() if t.dtype not in PORTABLE})
    if fmt == "apr" and foreign:
        raise InputError(f"{path}: this shape has {'/'.join(foreign)} tensors (llama.cpp's Q4_K_M fallback for rows "
                         "that are not whole 256-value blocks), which APR readers other than q4k-engine misread: "
                         "write a .gguf")
    return save_model(path, model, fmt, progress=progress)
