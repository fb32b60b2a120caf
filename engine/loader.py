"""From a file on disk to a validated ModelFile: format detection, ModelConfig, names.

`open_model(path)` sniffs the magic (never the extension), parses the container (apr.py or
gguf_file.py), maps tensor names onto the internal GGUF-style names, builds the ModelConfig from
the metadata with the per-architecture switches of architectures.md, and checks every tensor the
config needs (presence, shape, dtype; the inventory is config.expected_shapes) before anything
downstream trusts the file. Writing files (and re-quantizing) is convert.py's.

Metadata flows through one spelling: GGUF's (`{arch}.block_count`, ...). APR metadata is first
translated key by key (`_KEYS`), so one function, `config_from_metadata`, serves both formats.
"""
from __future__ import annotations

import dataclasses
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .apr import (
    TOKENIZER_FALLBACKS as APR_TOKENIZER_FALLBACKS,
    TOKENIZER_KEYS as APR_TOKENIZER_KEYS,
    canonical_metadata,
    read_apr,
)
from .binio import open_input, shown
from .config import ARCHITECTURES, ModelConfig, expected_shapes
from .dtypes import SUPPORTED, GGMLType
from .errors import FormatError, Q4KError, UnsupportedError
from .gguf_file import TOKENIZER_KEYS as GGUF_TOKENIZER_KEYS, read_gguf
from .tensors import ModelFile, QTensor, TokenizerSpec

# --------------------------------------------------------------------------------------------
# architectures


@dataclass(frozen=True)
class ArchDefaults:
    """The columns of architectures.md's switch table that are fixed per architecture."""

    rope_neox: bool
    rope_theta: float
    rms_eps: float
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    act: str = "silu"
    embed_scale: bool = False
    rope_theta_local: float | None = None
    sliding_pattern: int = 0


ARCH_DEFAULTS: dict[str, ArchDefaults] = {
    "llama": ArchDefaults(rope_neox=False, rope_theta=1e4, rms_eps=1e-5),
    "mistral": ArchDefaults(rope_neox=False, rope_theta=1e4, rms_eps=1e-5),
    "qwen2": ArchDefaults(rope_neox=True, rope_theta=1e6, rms_eps=1e-6, qkv_bias=True),
    "qwen3": ArchDefaults(rope_neox=True, rope_theta=1e6, rms_eps=1e-6, qk_norm=True),
    "gemma3": ArchDefaults(
        rope_neox=True, rope_theta=1e6, rms_eps=1e-6, qk_norm=True, sandwich_norm=True,
        act="gelu_tanh", embed_scale=True, rope_theta_local=1e4, sliding_pattern=6,
    ),
}
assert set(ARCH_DEFAULTS) == set(ARCHITECTURES)


def arch_defaults(arch: Any, where: str) -> ArchDefaults:
    if not isinstance(arch, str) or not arch:
        raise FormatError(f"{where}: metadata has no architecture")
    if arch not in ARCH_DEFAULTS:
        raise UnsupportedError(f"{where}: architecture {shown(repr(arch))} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return ARCH_DEFAULTS[arch]


def arch_config(arch: str, **fields: Any) -> ModelConfig:
    """A ModelConfig whose fixed switches come from the architecture; `fields` gives the rest.

    Fields left out take the architecture's default (theta, eps, NEOX pairing, local theta,
    sliding pattern).
    """
    d = ARCH_DEFAULTS[arch]
    base = dict(
        rope_neox=d.rope_neox, rope_theta=d.rope_theta, rms_eps=d.rms_eps,
        rope_theta_local=d.rope_theta_local, sliding_pattern=d.sliding_pattern,
    )
    return ModelConfig(
        arch=arch, qkv_bias=d.qkv_bias, qk_norm=d.qk_norm, sandwich_norm=d.sandwich_norm,
        act=d.act, embed_scale=d.embed_scale, **{**base, **fields},
    )


# --------------------------------------------------------------------------------------------
# tensor names


_GLOBAL_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# In Gemma's HF naming `post_attention_layernorm` is the sandwich norm after attention, and the
# pre-FFN norm has its own name: the same HF name means different tensors per architecture.
_SANDWICH_HF = {
    **_LAYER_HF,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_HF_GLOBAL = {v.removeprefix("model."): k for k, v in _GLOBAL_HF.items()}
_HF_LAYER = {False: {v: k for k, v in _LAYER_HF.items()}, True: {v: k for k, v in _SANDWICH_HF.items()}}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")
_MAX_LAYER_DIGITS = 6  # 10^6 layers: beyond any model; the bound keeps int() away from huge digit strings
_HF_LAYER_RE = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")


def block_number(name: str, where: str) -> int | None:
    """The layer number N of a per-layer tensor name `blk.N.<kind>`; None for other names."""
    m = _BLK.fullmatch(name)
    if m is None:
        return None
    digits = m.group(1)
    if len(digits) > _MAX_LAYER_DIGITS:
        raise FormatError(f"{where}: tensor {shown(name)} has a layer number of {len(digits)} digits")
    return int(digits)


def hf_name(name: str, sandwich: bool) -> str:
    """Internal (GGUF-style) name -> HF-style APR name (§6.1); unknown names pass unchanged."""
    if name in _GLOBAL_HF:
        return _GLOBAL_HF[name]
    m = _BLK.fullmatch(name)
    table = _SANDWICH_HF if sandwich else _LAYER_HF
    if m and m.group(2) in table:
        return f"model.layers.{m.group(1)}.{table[m.group(2)]}"
    return name


def internal_name(name: str, sandwich: bool) -> str:
    """HF-style (with or without the `model.` prefix) or GGUF-style name -> internal name."""
    bare = name.removeprefix("model.")
    if bare in _HF_GLOBAL:
        return _HF_GLOBAL[bare]
    m = _HF_LAYER_RE.fullmatch(name)
    if m and m.group(2) in _HF_LAYER[sandwich]:
        return f"blk.{m.group(1)}.{_HF_LAYER[sandwich][m.group(2)]}"
    return name


_VECTOR_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})


def check_tensors(config: ModelConfig, tensors: Mapping[str, QTensor], where: str) -> None:
    """Every tensor the config needs is present with the right shape and a runnable dtype."""
    expected = expected_shapes(config)
    for name, (shape, required) in expected.items():
        t = tensors.get(name)
        if t is None:
            if required:
                raise FormatError(f"{where}: missing tensor {name}")
            continue
        if t.shape != shape:
            raise FormatError(f"{where}: tensor {name} has shape {list(t.shape)}, the config needs {list(shape)}")
        allowed = _VECTOR_TYPES if len(shape) == 1 else SUPPORTED
        if t.dtype not in allowed:
            raise UnsupportedError(f"{where}: tensor {name} has dtype {t.dtype.name}, which the engine does not run")
    for name in tensors:
        layer = block_number(name, where)
        if layer is not None and layer >= config.n_layers:
            raise FormatError(f"{where}: tensor {name} belongs to a layer beyond block_count {config.n_layers}")


# --------------------------------------------------------------------------------------------
# metadata <-> ModelConfig

# (APR canonical key, GGUF key after "{arch}.", ModelConfig field). rope_type and rope scaling,
# whose encodings differ between the formats, are handled beside the table.
_KEYS: tuple[tuple[str, str, str], ...] = (
    ("hidden_size", "embedding_length", "hidden"),
    ("num_layers", "block_count", "n_layers"),
    ("num_heads", "attention.head_count", "n_heads"),
    ("num_kv_heads", "attention.head_count_kv", "n_kv_heads"),
    ("intermediate_size", "feed_forward_length", "ffn"),
    ("vocab_size", "vocab_size", "vocab_size"),
    ("max_position_embeddings", "context_length", "context_length"),
    ("rope_theta", "rope.freq_base", "rope_theta"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon", "rms_eps"),
    ("head_dim", "attention.key_length", "head_dim"),
    ("sliding_window", "attention.sliding_window", "sliding_window"),
    ("sliding_window_pattern", "attention.sliding_window_pattern", "sliding_pattern"),
    ("rope_local_base_freq", "rope.freq_base_swa", "rope_theta_local"),
    ("attention_scale", "attention.scale", "attn_scale"),
)

# §3.1 bounds (realizar's contract gate) plus a few of our own for fields it does not check.
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "hidden": (1, 65536),
    "n_layers": (1, 256),
    "n_heads": (1, 256),
    "n_kv_heads": (1, 256),
    "ffn": (1, 262144),
    "vocab_size": (1, 1_000_000),
    "context_length": (0, 2_097_152),
    "head_dim": (2, 1024),
    "sliding_window": (0, 2_097_152),
    "sliding_pattern": (0, 256),
}
_REQUIRED = object()
_F32_MAX = float(np.finfo(np.float32).max)


def _number_text(value: Any) -> str:
    """A metadata number for a message: short, and never str() of a huge int (Python refuses
    to print one of more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return shown(repr(value))


def meta_int(value: Any, key: str, where: str, lo: int, hi: int) -> int:
    """A metadata integer in [lo, hi]. Bools, floats (2.0 and -0.0 included: JSON cannot say
    which was meant) and strings are refused, each with one line naming the key."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{where}: metadata {key} is {_number_text(value)}, expected an integer")
    if not lo <= value <= hi:
        raise FormatError(f"{where}: metadata {key} = {_number_text(value)} is outside [{lo}, {hi}]")
    return value


def meta_float(value: Any, key: str, where: str, lo: float, hi: float) -> float:
    """A metadata real in [lo, hi] (so never NaN or infinite). An integer too large for a float
    (a JSON literal of 10^309 and more) is out of range like 1e308 is, not an OverflowError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FormatError(f"{where}: metadata {key} is {_number_text(value)}, expected a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    if not lo <= number <= hi:
        raise FormatError(f"{where}: metadata {key} = {_number_text(value)} is outside [{lo:g}, {hi:g}]")
    return number


def meta_numbers(values: Any, key: str, where: str, integer: bool, lo: float, hi: float) -> list:
    """A metadata list of numbers (tokenizer scores, token types), each as meta_int/meta_float
    would take it; vectorized, since vocabularies hold 10^5 entries, and the first bad entry
    named through the scalar helper."""
    kind = int if integer else (int, float)
    if not isinstance(values, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise FormatError(f"{where}: metadata {key} is not a list of {'integers' if integer else 'numbers'}")
    try:
        arr = np.asarray(values, dtype=np.int64 if integer else np.float64)
        if ((arr >= lo) & (arr <= hi)).all():  # NaN compares False
            return arr.tolist()
    except OverflowError:  # an integer beyond int64/float64
        pass
    check = meta_int if integer else meta_float
    return [check(v, f"{key}[{i}]", where, lo, hi) for i, v in enumerate(values)]  # raises at the first bad entry


def _int_value(meta: Mapping[str, Any], key: str, field: str, where: str, default: Any = _REQUIRED) -> int:
    value = meta.get(key)
    if value is None:
        if default is _REQUIRED:
            raise FormatError(f"{where}: missing metadata {key}")
        return default
    return meta_int(value, key, where, *_INT_BOUNDS[field])


def _float_value(meta: Mapping[str, Any], key: str, where: str, default: Any, lo: float, hi: float) -> Any:
    value = meta.get(key)
    return default if value is None else meta_float(value, key, where, lo, hi)


def _rope_scale(meta: Mapping[str, Any], a: str, where: str) -> float:
    """Linear RoPE scaling (gemma3 4B+) as the multiplier applied to positions (1/factor)."""
    kind = meta.get(f"{a}.rope.scaling.type")
    factor = _float_value(meta, f"{a}.rope.scaling.factor", where, None, 1e-3, 1e3)
    if kind in (None, "none") and factor is None:
        return 1.0
    if kind not in (None, "linear"):
        raise UnsupportedError(f"{where}: RoPE scaling {shown(repr(kind))} is not supported (only linear)")
    return 1.0 / (factor if factor is not None else 1.0)


def _sliding_pattern(meta: Mapping[str, Any], a: str, n_layers: int, default: int, where: str) -> int:
    """`{arch}.attention.sliding_window_pattern`: an int (every p-th layer is global) or, as newer
    llama.cpp writes it, one bool per layer (True = sliding) that must follow such a period."""
    key = f"{a}.attention.sliding_window_pattern"
    value = meta.get(key)
    if not isinstance(value, list):
        return _int_value(meta, key, "sliding_pattern", where, default)
    if len(value) != n_layers or not all(isinstance(v, bool) for v in value):
        raise FormatError(f"{where}: metadata {key} is not one bool per layer ({n_layers})")
    if all(value):
        return 0
    for p in range(1, n_layers + 1):
        if all(v == ((i + 1) % p != 0) for i, v in enumerate(value)):
            return p
    raise UnsupportedError(f"{where}: metadata {key}: sliding layers {shown(repr(value))} follow no period")


def config_from_metadata(
    meta: Mapping[str, Any], tensors: Mapping[str, QTensor], where: str, *, rope_neox: bool | None = None
) -> ModelConfig:
    """ModelConfig from GGUF-style metadata and the tensors (vocab from the embedding, tied head
    when `output.weight` is absent). `rope_neox` overrides the architecture's pairing (APR
    files say it in `rope_type`). Every value is type- and range-checked.
    """
    a = meta.get("general.architecture")
    d = arch_defaults(a, where)

    def num(suffix: str, field: str, default: Any = _REQUIRED) -> int:
        return _int_value(meta, f"{a}.{suffix}", field, where, default)

    hidden = num("embedding_length", "hidden")
    n_heads = num("attention.head_count", "n_heads")
    n_kv = num("attention.head_count_kv", "n_kv_heads", n_heads)
    if n_kv > n_heads or n_heads % n_kv:
        raise FormatError(f"{where}: {n_heads} attention heads cannot be shared by {n_kv} KV heads")
    if meta.get(f"{a}.attention.key_length") is None and hidden % n_heads:
        raise FormatError(f"{where}: hidden size {hidden} is not a multiple of {n_heads} heads and no key_length is given")
    head_dim = num("attention.key_length", "head_dim", hidden // n_heads)
    if head_dim % 2:
        raise FormatError(f"{where}: head_dim {head_dim} is odd; RoPE needs pairs")
    for suffix in ("attention.value_length", "rope.dimension_count"):
        other = meta.get(f"{a}.{suffix}")
        if other is not None and meta_int(other, f"{a}.{suffix}", where, *_INT_BOUNDS["head_dim"]) != head_dim:
            raise UnsupportedError(f"{where}: {a}.{suffix} = {shown(repr(other))} differs from head_dim {head_dim}")

    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise FormatError(f"{where}: missing tensor token_embd.weight")
    if len(embd.shape) != 2 or embd.shape[1] != hidden:
        raise FormatError(f"{where}: tensor token_embd.weight has shape {list(embd.shape)}, expected [vocab, {hidden}]")
    vocab = embd.shape[0]
    meta_vocab = num("vocab_size", "vocab_size", vocab)
    if meta_vocab != vocab:
        raise FormatError(f"{where}: metadata {a}.vocab_size = {meta_vocab} but token_embd.weight has {vocab} rows")

    n_layers = num("block_count", "n_layers")
    attn_scale = _float_value(meta, f"{a}.attention.scale", where, None, 1e-6, 1e3)
    if attn_scale is None and a == "gemma3" and n_layers == 62:
        # Gemma 3 27B: query_pre_attn_scalar = hidden / heads, not head_dim (llama.cpp's rule).
        attn_scale = (hidden / n_heads) ** -0.5
    theta = _float_value(meta, f"{a}.rope.freq_base", where, 0.0, 0.0, 1e8)
    if 0.0 < theta < 1.0:
        raise FormatError(f"{where}: metadata {a}.rope.freq_base = {theta} is outside [1, 1e8]")
    return arch_config(
        a,
        n_layers=n_layers,
        hidden=hidden,
        ffn=num("feed_forward_length", "ffn"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_eps=_float_value(meta, f"{a}.attention.layer_norm_rms_epsilon", where, d.rms_eps, 1e-10, 0.01),
        rope_theta=theta or d.rope_theta,  # 0 means unset (§3.1)
        rope_neox=d.rope_neox if rope_neox is None else rope_neox,
        context_length=num("context_length", "context_length", 0),
        rope_theta_local=_float_value(meta, f"{a}.rope.freq_base_swa", where, d.rope_theta_local, 1.0, 1e8),
        rope_scale=_rope_scale(meta, a, where),
        sliding_window=num("attention.sliding_window", "sliding_window", 0),
        sliding_pattern=_sliding_pattern(meta, a, n_layers, d.sliding_pattern, where),
        tied_head="output.weight" not in tensors,
        attn_scale=attn_scale,
    )


def config_to_gguf_metadata(config: ModelConfig) -> dict[str, Any]:
    """GGUF keys that `config_from_metadata` reads back into `config` (tie aside: that is the
    presence of output.weight). Keys equal to the architecture's default are left out, so that
    other readers see the plain llama.cpp key set."""
    a, d = config.arch, ARCH_DEFAULTS[config.arch]
    defaults = {"rope_theta_local": d.rope_theta_local, "sliding_pattern": d.sliding_pattern,
                "sliding_window": 0, "context_length": 0, "attn_scale": None}
    meta: dict[str, Any] = {"general.architecture": a}
    for _, suffix, field in _KEYS:
        value = getattr(config, field)
        if field in defaults and value == defaults[field]:
            continue
        meta[f"{a}.{suffix}"] = value
    meta[f"{a}.attention.value_length"] = config.head_dim
    meta[f"{a}.rope.dimension_count"] = config.head_dim
    if config.rope_scale != 1.0:
        meta[f"{a}.rope.scaling.type"] = "linear"
        meta[f"{a}.rope.scaling.factor"] = 1.0 / config.rope_scale
    return meta


def config_to_apr_metadata(config: ModelConfig) -> dict[str, Any]:
    """APR keys (canonical spellings only, §9) carrying the same facts as the GGUF keys."""
    g = config_to_gguf_metadata(config)
    a = config.arch
    meta: dict[str, Any] = {"model_type": a, "architecture": a}
    for apr_key, suffix, _ in _KEYS:
        if f"{a}.{suffix}" in g:
            meta[apr_key] = g[f"{a}.{suffix}"]
    meta["rope_type"] = 2 if config.rope_neox else 0
    if config.rope_scale != 1.0:
        meta["rope_scaling"] = {"rope_type": "linear", "factor": 1.0 / config.rope_scale}
    return meta


def _apr_to_gguf_metadata(meta: Mapping[str, Any], arch: str, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {"general.architecture": arch}
    for apr_key, suffix, _ in _KEYS:
        if meta.get(apr_key) is not None:
            out[f"{arch}.{suffix}"] = meta[apr_key]
    scaling = meta.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise FormatError(f"{where}: metadata rope_scaling is {shown(repr(scaling))}, expected an object")
        out[f"{arch}.rope.scaling.type"] = scaling.get("rope_type", scaling.get("type"))
        out[f"{arch}.rope.scaling.factor"] = scaling.get("factor")
    return out


def _apr_rope_neox(meta: Mapping[str, Any], where: str) -> bool | None:
    rope_type = meta.get("rope_type")
    if rope_type is None:
        return None
    if meta_int(rope_type, "rope_type", where, 0, 255) not in (0, 2):
        raise UnsupportedError(f"{where}: metadata rope_type = {shown(repr(rope_type))} (only 0 = NORM and 2 = NEOX)")
    return rope_type == 2


# --------------------------------------------------------------------------------------------
# tokenizer <-> metadata (keys per format in apr.TOKENIZER_KEYS / gguf_file.TOKENIZER_KEYS)


def tokenizer_from_metadata(
    meta: Mapping[str, Any], keys: Mapping[str, str], where: str, fallbacks: Mapping[str, str] | None = None
) -> TokenizerSpec | None:
    """The embedded tokenizer, type-checked; None when the file carries no vocabulary."""
    fallbacks = fallbacks or {}

    def get(field: str) -> Any:
        key = keys[field]
        value = meta.get(key)
        return meta.get(fallbacks[key]) if value is None and key in fallbacks else value

    def str_list(field: str) -> list[str] | None:
        value = get(field)
        if value is not None and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise FormatError(f"{where}: metadata {keys[field]} is not a list of strings")
        return value

    def parallel(field: str, integer: bool, lo: float, hi: float) -> list | None:
        value = get(field)
        if value is None:
            return None
        numbers = meta_numbers(value, keys[field], where, integer, lo, hi)
        if len(numbers) != len(tokens):
            raise FormatError(f"{where}: metadata {keys[field]} has {len(numbers)} entries for {len(tokens)} tokens")
        return numbers

    def optional(field: str, kind: type | tuple[type, ...]) -> Any:
        value = get(field)
        if value is not None and not isinstance(value, kind):
            raise FormatError(f"{where}: metadata {keys[field]} is {shown(repr(value))}, expected {getattr(kind, '__name__', kind)}")
        return value

    tokens = str_list("tokens")
    if tokens is None:
        return None
    merges = str_list("merges")
    ids = {f: get(f) for f in ("bos_id", "eos_id", "pad_id")}
    for field, value in ids.items():
        if value is not None:  # a token id of the vocabulary
            meta_int(value, keys[field], where, 0, len(tokens) - 1)
    return TokenizerSpec(
        model=optional("model", str) or ("gpt2" if merges else "llama"),
        tokens=tokens,
        merges=merges,
        scores=parallel("scores", False, -_F32_MAX, _F32_MAX),  # GGUF stores them as float32
        token_types=parallel("token_types", True, -(2**31), 2**31 - 1),  # as int32
        bos_id=ids["bos_id"],
        eos_id=ids["eos_id"],
        pad_id=ids["pad_id"],
        add_bos=bool(optional("add_bos", bool)),
        pre=optional("pre", str),
        chat_template=optional("chat_template", str),
    )


def tokenizer_to_metadata(spec: TokenizerSpec, keys: Mapping[str, str]) -> dict[str, Any]:
    values = {
        "model": spec.model, "tokens": spec.tokens, "merges": spec.merges, "scores": spec.scores,
        "token_types": spec.token_types, "bos_id": spec.bos_id, "eos_id": spec.eos_id,
        "pad_id": spec.pad_id, "add_bos": spec.add_bos, "pre": spec.pre, "chat_template": spec.chat_template,
    }
    return {keys[f]: v for f, v in values.items() if v is not None}


# --------------------------------------------------------------------------------------------
# opening


def _sniff(path: Path) -> str:
    with open_input(path) as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if magic[:3] == b"APR":
        return "apr"
    if not magic:
        raise FormatError(f"{path}: empty file")
    raise FormatError(f"{path}: not a GGUF or APR model file (magic {magic!r})")


def _fold_tied_head(meta: Mapping[str, Any], tensors: dict[str, QTensor]) -> None:
    """aprender materialises lm_head from the embedding and says so (`tied_embeddings`, §3.3);
    an identical copy is dropped so the head is tied again and uploaded once."""
    head, embd = tensors.get("output.weight"), tensors.get("token_embd.weight")
    if meta.get("tied_embeddings") is not True or head is None or embd is None:
        return
    if (head.dtype, head.shape) == (embd.dtype, embd.shape) and np.array_equal(head.data, embd.data):
        del tensors["output.weight"]


def _infer_head_dim(meta: dict[str, Any], tensors: Mapping[str, QTensor], arch: str, where: str) -> None:
    """APR files from aprender and realizar may lack `head_dim`; realizar then takes it from the
    q-projection, rows / num_heads (GH-479), and so do we, rather than assume hidden / heads
    (wrong for qwen3 and gemma3). A bad head count is left to config_from_metadata to report."""
    key, heads = f"{arch}.attention.key_length", meta.get(f"{arch}.attention.head_count")
    q = tensors.get("blk.0.attn_q.weight")
    if key in meta or q is None or len(q.shape) != 2 or not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        return
    if q.shape[0] % heads:
        raise FormatError(
            f"{where}: metadata has no head_dim, and the {q.shape[0]} rows of tensor blk.0.attn_q.weight "
            f"are not a multiple of {heads} heads"
        )
    meta[key] = q.shape[0] // heads


def _open_apr(path: Path) -> ModelFile:
    f = read_apr(path)
    where = str(path)
    meta = canonical_metadata(f.metadata)
    if meta.get("format") == "entrenar-checkpoint":
        raise UnsupportedError(f"{where}: entrenar checkpoints store weights transposed ([in, out]); not supported")
    arch = meta.get("architecture")
    d = arch_defaults(arch, where)
    tensors: dict[str, QTensor] = {}
    for name, t in f.tensors.items():
        internal = internal_name(name, d.sandwich_norm)
        if internal in tensors:
            raise FormatError(f"{where}: tensors {shown(name)} and {tensors[internal].name} both map to {internal}")
        tensors[internal] = dataclasses.replace(t, name=internal)
    _fold_tied_head(meta, tensors)
    gguf_meta = _apr_to_gguf_metadata(meta, arch, where)
    _infer_head_dim(gguf_meta, tensors, arch, where)
    config = config_from_metadata(gguf_meta, tensors, where, rope_neox=_apr_rope_neox(meta, where))
    tokenizer = tokenizer_from_metadata(f.metadata, APR_TOKENIZER_KEYS, where, APR_TOKENIZER_FALLBACKS)
    return ModelFile(path, "apr", config, tensors, tokenizer, f.metadata, f.buffer)


def _open_gguf(path: Path) -> ModelFile:
    f = read_gguf(path)
    where = str(path)
    config = config_from_metadata(f.metadata, f.tensors, where)
    tokenizer = tokenizer_from_metadata(f.metadata, GGUF_TOKENIZER_KEYS, where)
    return ModelFile(path, "gguf", config, dict(f.tensors), tokenizer, f.metadata, f.buffer)


def open_model(path: Path | str) -> ModelFile:
    """Open a .gguf or .apr file (detected by magic), validated completely; tensors are views."""
    path = Path(path)
    fmt = _sniff(path)
    try:
        model = (_open_gguf if fmt == "gguf" else _open_apr)(path)
        check_tensors(model.config, model.tensors, str(path))
    except Q4KError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, RecursionError, struct.error) as e:
        # Safety net: every check above should have caught a corrupt file first. The marker
        # "internal" lets the fuzz test tell this net apart from a deliberate check.
        raise FormatError(f"{path}: corrupt {fmt.upper()} file (internal {type(e).__name__}: {e})") from e
    if model.tokenizer is not None and len(model.tokenizer.tokens) > model.config.vocab_size:
        raise FormatError(
            f"{path}: tokenizer has {len(model.tokenizer.tokens)} tokens but token_embd.weight only "
            f"{model.config.vocab_size} rows"
        )
    return model


def model_name(model: ModelFile) -> str | None:
    name = model.metadata.get("general.name", model.metadata.get("name"))
    return name if isinstance(name, str) else None
