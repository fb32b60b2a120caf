"""Write a Qwen2-7B-shaped synthetic Q4_K_M model (APR) for the whole-model benchmarks, fast.

No float weights are quantized: valid Q4_K / Q6_K super-blocks are drawn directly (random quant
bytes and 6-bit scales, f16 super-scales chosen so that dequantized weights have std ~0.02 and
mean ~0, like a trained 7B). Tensor types follow llama.cpp's Q4_K_M recipe for Qwen2-7B: Q4_K
everywhere, Q6_K for the LM head and for attn_v / ffn_down on the "more bits" layers, F32 norms
and QKV biases. About 4.4 GiB; a few tens of seconds.

    python bench/make_7b.py /tmp/qwen2-7b-q4km.apr [--layers 28]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from q4k_engine.config import ModelConfig, expected_shapes
from q4k_engine.convert import q4_k_m_type
from q4k_engine.dtypes import GGMLType, TYPE_INFO, tensor_bytes
from q4k_engine.loader import arch_config, config_to_apr_metadata
from q4k_engine.tensors import QTensor

QWEN2_7B = dict(n_layers=28, hidden=3584, ffn=18944, n_heads=28, n_kv_heads=4, vocab=152064,
                rope_theta=1e6, rms_eps=1e-6, context=32768)
WEIGHT_STD = 0.02

# E[sc * q] and std(sc * q) for uniform 6-bit sc and 4-bit q: d = target std / that std, and dmin
# cancels the mean so the dequantized weights centre on zero.
_SC = np.arange(64.0)
_Q4 = np.arange(16.0)
_Q4K_MEAN = _SC.mean() * _Q4.mean()
_Q4K_STD = np.sqrt((_SC ** 2).mean() * (_Q4 ** 2).mean() - _Q4K_MEAN ** 2)
_Q6K_STD = np.sqrt((np.arange(-128.0, 128.0) ** 2).mean() * ((np.arange(64.0) - 32) ** 2).mean())


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def kquant_blocks(rng: np.random.Generator, dtype: GGMLType, n_blocks: int) -> np.ndarray:
    """n_blocks random valid super-blocks of Q4_K or Q6_K as [n_blocks, type_size] uint8."""
    size = TYPE_INFO[dtype].type_size
    b = np.frombuffer(rng.bytes(n_blocks * size), np.uint8).reshape(n_blocks, size).copy()
    jitter = rng.uniform(0.5, 1.5, n_blocks)
    if dtype == GGMLType.Q4_K:  # d, dmin (f16) then 12 scale bytes (any bits are valid) and qs
        d = WEIGHT_STD / _Q4K_STD * jitter
        b[:, 0:2] = _f16_bytes(d)
        b[:, 2:4] = _f16_bytes(d * _Q4K_MEAN / _SC.mean())
    elif dtype == GGMLType.Q6_K:  # ql, qh, int8 scales (any bits valid), d (f16) last
        b[:, 208:210] = _f16_bytes(WEIGHT_STD / _Q6K_STD * jitter)
    else:
        raise ValueError(f"no block generator for {dtype.name}")
    return b


def qwen2_config(n_layers: int, hidden: int, ffn: int, n_heads: int, n_kv_heads: int, vocab: int, rope_theta: float,
                 rms_eps: float, context: int) -> ModelConfig:
    return arch_config("qwen2", n_layers=n_layers, hidden=hidden, ffn=ffn, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       head_dim=hidden // n_heads, vocab_size=vocab, rope_theta=rope_theta, rms_eps=rms_eps,
                       context_length=context, tied_head=False)


def qwen2_tensors(rng: np.random.Generator, config: ModelConfig) -> list[QTensor]:
    """Every tensor of the model's inventory (config.expected_shapes), typed after q4_k_m_type."""
    out: list[QTensor] = []
    for name, (shape, required) in expected_shapes(config).items():
        if not required:  # rope_freqs
            continue
        if len(shape) == 2:
            dtype = q4_k_m_type(name, shape[1], config.n_layers, config.tied_head)
            n_blocks = tensor_bytes(dtype, shape) // TYPE_INFO[dtype].type_size
            data = kquant_blocks(rng, dtype, n_blocks).reshape(-1)
        else:  # norms near 1, small biases
            values = rng.standard_normal(shape) * 0.1 if name.endswith(".bias") else rng.uniform(0.8, 1.2, shape)
            dtype, data = GGMLType.F32, values.astype(np.float32).view(np.uint8).reshape(-1)
        out.append(QTensor(name, dtype, shape, data))
    return out


def write_7b(path: Path, n_layers: int = QWEN2_7B["n_layers"], seed: int | None = None) -> Path:
    """Write the model to `path` (APR v2) and return it."""
    from q4k_engine import apr

    config = qwen2_config(**dict(QWEN2_7B, n_layers=n_layers))
    tensors = qwen2_tensors(np.random.default_rng(seed), config)
    meta = config_to_apr_metadata(config) | {"name": "synthetic-qwen2-7b-q4_k_m"}
    apr.write_apr(path, meta, tensors)
    return path


DEFAULT_PATH = Path(tempfile.gettempdir()) / "qwen2-7b-q4km-synthetic.apr"


def ensure_7b(path: str | Path | None = None) -> Path:
    """`path`, or the default file in the temp dir, written first (with its timing printed) if missing:
    the benchmarks' shared model."""
    path = Path(path) if path else DEFAULT_PATH
    if not path.exists():
        t0 = time.perf_counter()
        write_7b(path)
        print(f"make_7b: wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--layers", type=int, default=QWEN2_7B["n_layers"])
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    write_7b(a.path, a.layers, a.seed)
    print(f"wrote {a.path} ({a.path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
