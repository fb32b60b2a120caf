"""From a ModelFile to a file on disk: APR/GGUF writing, Q4_K_M re-quantization, portable APR types.

`save_model` writes a ModelFile as APR or GGUF. Three things decide what it holds besides the
tensors' bytes:

* Metadata: the config (loader.config_to_*_metadata), the TokenizerSpec, and every other
  `general.*` / `tokenizer.*` fact of the source (`carried_metadata`), so that GGUF -> APR -> GGUF
  gives llama.cpp the same tokenizer (add_space_prefix, unknown/padding ids, add_eos_token...).
* Portable APR types (`portable_type`, `to_portable`): an APR file holds only {F32, F16, BF16,
  Q4_K, Q6_K} unless the caller asks for GGML's codes (`keep_ggml_codes`), see apr.py.
* `requantize` (convert --quantize q4_k_m) turns float weights into llama.cpp's Q4_K_M mix.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .apr import (
    GGUF_KEY_PREFIXES,
    GGUF_KEY_SPELLINGS,
    PORTABLE,
    TOKENIZER_KEYS as APR_TOKENIZER_KEYS,
    write_apr,
)
from .dtypes import GGMLType, row_bytes
from .errors import FormatError, InputError, Q4KWarning
from .gguf_file import TOKENIZER_KEYS as GGUF_TOKENIZER_KEYS, write_gguf
from .loader import _BLK, config_to_apr_metadata, config_to_gguf_metadata, hf_name, tokenizer_to_metadata
from .tensors import ModelFile, QTensor

FLOAT_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})
F16_MAX = 65504.0
_CHUNK_VALUES = 1 << 20  # values decoded and re-encoded at a time: memory stays bounded for any tensor
FILE_TYPE_Q4_K_M = 15  # general.file_type of a Q4_K_M file (llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M)

# --------------------------------------------------------------------------------------------
# re-encoding one tensor


def _reencode(t: QTensor, target: GGMLType, where: str) -> tuple[QTensor, float]:
    """`t` encoded as `target` (F32 instead of F16 when a value exceeds F16's range), a block of
    rows at a time, and the largest absolute change of any of its values."""
    from .quants import dequantize, dequantize_rows, quantize  # heavy; only conversions need it

    rows, cols = t.rows, t.cols
    out = np.empty(rows * row_bytes(target, cols), np.uint8)
    step = max(1, _CHUNK_VALUES // cols)
    worst = 0.0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        x = dequantize_rows(t, start, stop)
        if not np.isfinite(x).all():
            raise FormatError(f"{where}: tensor {t.name} holds non-finite values; it cannot be re-encoded")
        if target == GGMLType.F16 and float(np.abs(x).max()) > F16_MAX:
            return _reencode(t, GGMLType.F32, where)
        rb = row_bytes(target, cols)
        encoded = quantize(x, target)
        out[start * rb : stop * rb] = encoded
        worst = max(worst, float(np.abs(dequantize(encoded, target, x.shape) - x).max()))
    return QTensor(t.name, target, t.shape, out), worst


# --------------------------------------------------------------------------------------------
# portable APR types


def portable_type(shape: tuple[int, ...]) -> GGMLType:
    """The portable APR type that a tensor of any other type (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q5_K,
    ...) is re-encoded to. One rule, by shape only: vectors (norms, biases) F32, the only type
    realizar reads them as (apr-v2-format.md §6.4); matrices F16 (F32 where a value exceeds
    F16's range, which `_reencode` decides and the report shows).

    Why F16 and not a K-quant where rows are whole 256-blocks: a teacher's logits come first.
    F16 keeps every value of a 4/5/8-bit source to within a relative 2^-11; re-quantizing rounds a
    second time. Measured on SmolLM2-135M Q4_1 (13 positions, against its GGUF): Q6_K for its 30
    ffn_down matrices and F16 for the rest gave mean KL 1.8e-2 and top-1 92% (282 MiB); F16 for
    all gave mean KL 3.1e-6 and top-1 100% (312 MiB). Q4_K would be worse still. K-quants cannot
    hold other rows anyway: aprender's and realizar's flat dequantizers misread padded rows
    (§5.2). A user who wants a small portable file quantizes a float source (`requantize`).
    """
    return GGMLType.F32 if len(shape) == 1 else GGMLType.F16


@dataclass(frozen=True)
class Reencoded:
    """One tensor `to_portable` changed: its name, types, and the largest absolute change of a value."""

    name: str
    source: GGMLType
    target: GGMLType
    max_abs_change: float


def to_portable(model: ModelFile, *, progress: bool = False) -> tuple[ModelFile, list[Reencoded]]:
    """`model` with every tensor outside apr.PORTABLE re-encoded after `portable_type`, and the
    list of what changed (empty when the model already was portable)."""
    from tqdm import tqdm

    todo = [t for t in model.tensors.values() if t.dtype not in PORTABLE]
    if not todo:
        return model, []
    tensors, done = dict(model.tensors), []
    for t in tqdm(todo, desc="re-encoding", unit="tensor", disable=not progress):
        new, change = _reencode(t, portable_type(t.shape), str(model.path))
        tensors[t.name] = new
        done.append(Reencoded(t.name, t.dtype, new.dtype, change))
    return dataclasses.replace(model, tensors=tensors), done


# --------------------------------------------------------------------------------------------
# metadata carried through


def carried_metadata(model: ModelFile) -> dict[str, Any]:
    """The source's `general.*` / `tokenizer.*` facts that neither the config nor the TokenizerSpec
    write, in GGUF spelling (general.architecture and general.alignment describe the written
    file, not the model, and are left to the writers)."""
    meta = model.metadata
    if model.format == "apr":
        back = {apr: gguf for gguf, apr in GGUF_KEY_SPELLINGS.items()}
        meta = {back.get(k, k): v for k, v in meta.items() if k in back or k.startswith(GGUF_KEY_PREFIXES)}
    # The TokenizerSpec writes its own fields; one it lacks (a padding id absent from the spec) is carried.
    spec = model.tokenizer
    written = {key for field, key in GGUF_TOKENIZER_KEYS.items() if spec is not None and getattr(spec, field) is not None}
    own = {*written, "general.architecture", "general.alignment"}
    return {k: v for k, v in meta.items() if k.startswith(GGUF_KEY_PREFIXES) and k not in own and v is not None}


# --------------------------------------------------------------------------------------------
# saving


def save_model(
    path: Path | str,
    model: ModelFile,
    fmt: str = "apr",
    *,
    names: str = "hf",
    materialize_head: bool = True,
    keep_ggml_codes: bool = False,
    progress: bool = False,
) -> Path:
    """Write `model` as APR (`names` "hf" or "gguf") or GGUF; tensor bytes are copied verbatim.

    APR: a tied head is written as an explicit `lm_head.weight` (with `tied_embeddings`), as
    aprender does, because realizar's loader has no tied fallback (§6.3); `open_model` folds it
    back. `materialize_head=False` leaves it out (smaller file, ours-only). Tensors outside the
    portable types are re-encoded (`to_portable`) with a warning that counts them; call
    `to_portable` first for the per-tensor report. `keep_ggml_codes=True` writes them under
    GGML's codes instead: a file that only q4k-engine reads correctly.
    """
    if fmt not in ("apr", "gguf"):
        raise InputError(f"unknown output format {fmt!r} (apr or gguf)")
    if names not in ("hf", "gguf"):
        raise InputError(f"unknown tensor naming {names!r} (hf or gguf)")
    config = model.config
    carried = carried_metadata(model)
    if fmt == "gguf":
        meta = config_to_gguf_metadata(config) | carried
        if model.tokenizer is not None:
            meta |= tokenizer_to_metadata(model.tokenizer, GGUF_TOKENIZER_KEYS)
        return write_gguf(path, meta, list(model.tensors.values()), progress=progress)
    if not keep_ggml_codes:
        model, done = to_portable(model, progress=progress)
        if done:
            worst = max(done, key=lambda r: r.max_abs_change)
            warnings.warn(
                f"{path}: re-encoded {len(done)} tensors of types "
                f"{', '.join(sorted({r.source.name for r in done}))} to portable APR types (largest change "
                f"{worst.max_abs_change:.3g}, {worst.name}); keep_ggml_codes=True keeps GGML's codes",
                Q4KWarning,
                stacklevel=2,
            )
    tensors = list(model.tensors.values())
    meta = config_to_apr_metadata(config) | {GGUF_KEY_SPELLINGS.get(k, k): v for k, v in carried.items()}
    meta["original_format"] = model.format
    if config.tied_head and materialize_head:
        tensors.append(dataclasses.replace(model.tensors["token_embd.weight"], name="output.weight"))
        meta["tied_embeddings"] = True
    if model.tokenizer is not None:
        meta |= tokenizer_to_metadata(model.tokenizer, APR_TOKENIZER_KEYS)
    if names == "hf":
        tensors = [dataclasses.replace(t, name=hf_name(t.name, config.sandwich_norm)) for t in tensors]
    return write_apr(path, meta, tensors, progress=progress)


# --------------------------------------------------------------------------------------------
# re-quantization (convert --quantize q4_k_m, synthetic models)


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get Q6_K in a Q4_K_M file: the first and last eighth,
    and every third layer in between (integer division as in llama-quant.cpp)."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, cols: int, n_layers: int, tied: bool) -> GGMLType:
    """Storage type of a 2-D weight in our Q4_K_M, after llama.cpp's rules.

    Q6_K for the output head (the embedding when tied) and for attn_v/ffn_down of the layers
    `_use_more_bits` picks; Q4_K for every other matrix. K-quants need rows of whole 256-blocks;
    other rows are F16 (llama.cpp would use Q5_0/Q5_1/Q8_0 there, codes that aprender and
    realizar misread in an APR file, see apr.py; F16 is portable and exact enough).
    """
    if cols % 256:
        return GGMLType.F16
    m = _BLK.fullmatch(name)
    high = (
        name == "output.weight"
        or (tied and name == "token_embd.weight")
        or (m is not None and m.group(2) in ("attn_v.weight", "ffn_down.weight") and _use_more_bits(int(m.group(1)), n_layers))
    )
    return GGMLType.Q6_K if high else GGMLType.Q4_K


def requantize(model: ModelFile, scheme: str = "q4_k_m", *, progress: bool = False) -> ModelFile:
    """Quantize the float tensors of `model` after `scheme`: 2-D weights per `q4_k_m_type`,
    1-D tensors (norms, biases) to F32. Tensors already quantized keep their bytes: decoding and
    re-encoding them would only add error (an APR writer still makes non-portable ones portable).
    `general.file_type` then says Q4_K_M."""
    from tqdm import tqdm

    if scheme != "q4_k_m":
        raise InputError(f"unknown quantization scheme {scheme!r} (supported: q4_k_m)")
    config = model.config
    out: dict[str, QTensor] = {}
    for name, t in tqdm(model.tensors.items(), desc="quantizing", unit="tensor", disable=not progress):
        target = GGMLType.F32 if len(t.shape) == 1 else q4_k_m_type(name, t.cols, config.n_layers, config.tied_head)
        if t.dtype not in FLOAT_TYPES or target == t.dtype:
            out[name] = t
            continue
        out[name] = _reencode(t, target, str(model.path))[0]
        if out[name].dtype != target:
            warnings.warn(f"{model.path}: tensor {name} is stored as F32: a value exceeds F16's range", Q4KWarning,
                          stacklevel=2)
    metadata = model.metadata | ({"general.file_type": FILE_TYPE_Q4_K_M} if "general.file_type" in model.metadata else {})
    return dataclasses.replace(model, tensors=out, metadata=metadata)
