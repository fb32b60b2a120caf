"""Small random models of every architecture, written by the project's own writers.

They are the test data of the whole project (design.md: generated, never downloaded): the tensor
set of each architecture comes from config.expected_shapes, weights are N(0, 0.02) matrices and
norms near 1 quantized like a Q4_K_M file (Q4_K matrices, Q6_K head and some ffn_down/attn_v, F32
norms, see convert.q4_k_m_type), plus a few tensors in the other types of real Q4_K_M files so
that every kernel has something to chew on (a layer's in layer 0 only: the other layers' q, k and
v share types, so the forward stacks them, as in real files):

  llama  attn_q Q4_1 (as SmolLM2)       qwen2  attn_k Q8_0 + QKV biases
  mistral attn_k F16, window 16         qwen3  attn_k BF16, head_dim 128 != hidden/heads
  gemma3 token_embd Q8_0, attn_k Q5_0 (as Gemma 3 270M), 6 layers so that layer 5 is global,
         sliding window 8, head_dim 128

The tokenizer is a byte-level BPE (GGUF `gpt2`): the 256 byte tokens in GPT-2's
bytes_to_unicode spelling, merges learned from a short built-in English text, BOS/EOS last, and a
small chat template ("role: content<EOS>\\n" per turn).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import expected_shapes
from .convert import q4_k_m_type, save_model, to_portable
from .dtypes import TYPE_INFO, GGMLType
from .errors import FormatError, InputError
from .loader import ARCH_DEFAULTS, arch_config, config_from_metadata, config_to_gguf_metadata
from .tensors import ModelFile, QTensor, TokenizerSpec
from .tokenizer import bytes_to_unicode

DEMO_REVISION = 3  # bump when the demo model's contents change, so caches regenerate
DEMO_ARCH = "llama"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# A plain chat format over the two control tokens (a turn ends with EOS), so that chat datasets run
# on every synthetic model and the demo; it refuses an unknown role the way real templates do.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ' (use system, user or assistant)') }}{% endif %}"
    "{{ message['role'] + ': ' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

_CORPUS = """\
The ferry leaves the north bank at seven in the morning, and on most days it is full before the
bell rings. People carry bread, tools, letters and small animals in baskets. The river is wide
here, and the water moves slowly, so the crossing takes about twenty minutes when the weather is
calm. In the winter the wind comes down from the hills and the boat rolls from side to side; then
the children hold the rail and count the gulls that follow the stern.
On the south bank there is a market with a long row of stalls. A woman sells honey in clear jars,
a man repairs watches at a table under a green umbrella, and two brothers sell apples, pears and
plums from the farm their family has worked for a hundred years. Prices are written in chalk on
slates: 3 apples for 2 coins, a jar of honey for 5 coins, a new watch strap for 4 coins.
In the afternoon the market is quiet. The traders talk about the price of grain, the height of
the river, and the new bridge that the town council has been planning for as long as anyone can
remember. Some of them think the bridge will bring more buyers; others think it will end the
ferry, and with it the morning crossing that everyone in the town knows so well.
When the sun goes down, the ferry makes its last trip of the day. The lamps on the deck are lit,
the captain rings the bell twice, and the boat turns slowly into the current, carrying the
traders, their empty baskets and their stories back across the water to the north bank.
"""
# GPT-2's pre-tokenizer, restricted to ASCII classes: enough to learn merges from English text,
# and it never joins what the real ByteLevel pre-tokenizer would split.
_PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


@dataclass(frozen=True)
class SyntheticDims:
    hidden: int = 256
    ffn: int = 512
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    n_merges: int = 200  # vocab = 256 bytes + learned merges + 2 specials
    sliding_window: int = 0
    context_length: int = 2048


_ARCH_DIMS: dict[str, dict[str, int]] = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {},
    "qwen3": {"head_dim": 128},
    "gemma3": {"n_layers": 6, "head_dim": 128, "sliding_window": 8},
}
_TIED = {"llama": False, "mistral": False, "qwen2": True, "qwen3": False, "gemma3": True}
# Tensor (suffix after blk.N.) -> type, where the row length allows it; in layer 0 only, so that
# the later layers' q/k/v share types as in real files and the forward stacks them (forward.py).
_EXTRA_TYPES: dict[str, dict[str, GGMLType]] = {
    "llama": {"attn_q.weight": GGMLType.Q4_1},
    "mistral": {"attn_k.weight": GGMLType.F16},
    "qwen2": {"attn_k.weight": GGMLType.Q8_0},
    "qwen3": {"attn_k.weight": GGMLType.BF16},
    "gemma3": {"token_embd.weight": GGMLType.Q8_0, "attn_k.weight": GGMLType.Q5_0},
}


# --------------------------------------------------------------------------------------------
# tokenizer


def train_byte_bpe(text: str, n_merges: int) -> tuple[list[str], list[str]]:
    """Byte-level BPE: (tokens, merges "a b"). Ties between equally frequent pairs go to the
    smallest pair, so the result is the same on every machine; stops early when no pair occurs
    twice."""
    table = bytes_to_unicode()
    spell = [table[b] for b in range(256)]
    words = Counter(tuple(spell[b] for b in w.encode("utf-8")) for w in _PRETOKENIZE.findall(text))
    tokens, merges, known = list(spell), [], set(spell)
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if merged not in known:  # two merges may spell the same token; the vocabulary holds it once
            known.add(merged)
            tokens.append(merged)
        new_words: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return tokens, merges


def byte_level_tokenizer(n_merges: int = 200) -> TokenizerSpec:
    tokens, merges = train_byte_bpe(_CORPUS, n_merges)
    tokens = [*tokens, BOS, EOS]
    return TokenizerSpec(
        model="gpt2",
        tokens=tokens,
        merges=merges,
        token_types=[1] * (len(tokens) - 2) + [3, 3],  # 1 normal, 3 control (llama.cpp's codes)
        bos_id=len(tokens) - 2,
        eos_id=len(tokens) - 1,
        add_bos=True,
        pre="gpt-2",
        chat_template=CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------
# weights


def _tensor_type(arch: str, name: str, shape: tuple[int, ...], n_layers: int, tied: bool) -> GGMLType:
    if len(shape) == 1:
        return GGMLType.F32
    if name.startswith("blk.") and not name.startswith("blk.0."):
        return q4_k_m_type(name, shape[-1], n_layers, tied)
    suffix = name.split(".", 2)[2] if name.startswith("blk.") else name
    extra = _EXTRA_TYPES[arch].get(suffix)
    if extra is not None and shape[-1] % TYPE_INFO[extra].block_size == 0:
        return extra
    return q4_k_m_type(name, shape[-1], n_layers, tied)


def _encode(values: np.ndarray, dtype: GGMLType) -> np.ndarray:
    from .quants import QUANTIZABLE, quantize

    if dtype in QUANTIZABLE:
        return quantize(values, dtype)
    # Q4_1 / Q5_0: our quantizer does not write them; llama.cpp's gguf-py reference does.
    import gguf

    return np.ascontiguousarray(gguf.quants.quantize(values, gguf.GGMLQuantizationType(int(dtype)))).reshape(-1)


def _random_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if len(shape) == 2:
        return rng.normal(0.0, 0.02, shape).astype(np.float32)
    if name.endswith(".bias"):
        return rng.normal(0.0, 0.02, shape).astype(np.float32)
    return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)  # norms: gains near 1


def synthetic_model(arch: str, seed: int = 0, **dims: int) -> ModelFile:
    """A random model of `arch` in memory (see the module docstring); dims override SyntheticDims."""
    if arch not in ARCH_DEFAULTS:
        raise InputError(f"unknown architecture {arch!r} (one of {', '.join(ARCH_DEFAULTS)})")
    try:
        d = SyntheticDims(**{**_ARCH_DIMS[arch], **dims})
    except TypeError:
        raise InputError(f"unknown synthetic dims {sorted(set(dims) - {f.name for f in dataclasses.fields(SyntheticDims)})}") from None
    tokenizer = byte_level_tokenizer(d.n_merges)
    config = arch_config(
        arch, n_layers=d.n_layers, hidden=d.hidden, ffn=d.ffn, n_heads=d.n_heads, n_kv_heads=d.n_kv_heads,
        head_dim=d.head_dim, vocab_size=len(tokenizer.tokens), context_length=d.context_length,
        sliding_window=d.sliding_window, tied_head=_TIED[arch],
        # GGUF stores reals as float32: round them now so both formats give back this config exactly
        rms_eps=float(np.float32(ARCH_DEFAULTS[arch].rms_eps)),
    )
    rng = np.random.default_rng(seed)
    tensors: dict[str, QTensor] = {}
    for name, (shape, required) in expected_shapes(config).items():
        if not required:  # the tied head, rope_freqs
            continue
        dtype = _tensor_type(arch, name, shape, d.n_layers, config.tied_head)
        tensors[name] = QTensor(name, dtype, shape, _encode(_random_values(name, shape, rng), dtype))
    # The metadata round trip validates the dims the way a reader will (bounds, head sharing).
    try:
        config_from_metadata(config_to_gguf_metadata(config), tensors, f"synthetic {arch}")
    except FormatError as e:
        raise InputError(f"invalid synthetic dims: {e}") from None
    return ModelFile(Path(f"synthetic-{arch}"), "synthetic", config, tensors, tokenizer, {"general.name": f"synthetic-{arch}"})


def write_synthetic(
    path: Path | str, arch: str, fmt: str = "apr", seed: int = 0, *, names: str = "hf",
    keep_ggml_codes: bool = False, **dims: int,
) -> Path:
    """Write a random `arch` model as APR (`names` "hf" or "gguf") or GGUF; returns the path.

    An APR file holds portable types only: the extra types of the module docstring become F16
    (convert.portable_type) unless `keep_ggml_codes`, which keeps them for tests of the engine's
    own kernels (a file only q4k-engine reads correctly).
    """
    model = synthetic_model(arch, seed, **dims)
    if fmt == "apr" and not keep_ggml_codes:
        model = to_portable(model)[0]  # random weights: what changed is of no interest
    return save_model(path, model, fmt, names=names, keep_ggml_codes=keep_ggml_codes)


# --------------------------------------------------------------------------------------------
# demo model


def cache_dir() -> Path:
    d = Path(os.environ.get("Q4K_CACHE") or Path.home() / ".cache" / "q4k-engine")
    d.mkdir(parents=True, exist_ok=True)
    return d


def demo_model_path() -> Path:
    """The demo model (`--model demo`), generated once into the cache; the write is atomic, so
    concurrent first runs both end with the same complete file."""
    try:
        version = importlib.metadata.version("q4k-engine")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    path = cache_dir() / f"demo-{version}-r{DEMO_REVISION}.apr"
    if not path.exists():
        write_synthetic(path, DEMO_ARCH, "apr", seed=0)
    return path


def resolve_model(spec: str | Path) -> Path:
    """A CLI model argument -> path: `demo` is the cached synthetic demo model."""
    if str(spec) == "demo":
        return demo_model_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"{spec}: no such model file (pass a .gguf/.apr path or 'demo')")
    return path

