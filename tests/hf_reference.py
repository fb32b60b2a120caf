"""Hugging Face transformers as the independent reference for whole-model logits, and the parity
statistics llama.cpp's `llama-perplexity --kl-divergence` prints (computed by q4k_engine.distill.stats).

Used by tests/test_parity_hf.py and bench/parity_hf.py (which puts tests/ on sys.path).

transformers loads a GGUF itself (`from_pretrained(dir, gguf_file=...)`, float32 on CPU, weights
dequantized by llama.cpp's gguf-py) for llama, qwen2, qwen3 and gemma3. What its GGUF loader does
not read from the file is passed as config overrides, taken from the file's own metadata:
  gemma3  query_pre_attn_scalar (it defaults to 256; the scale is 1/sqrt(head_dim) = key_length),
          sliding-layer theta when the file states one;
  qwen3   head_dim (its GGUF mapping ignores attention.key_length; Qwen3Config defaults to 128).
`mistral` GGUFs cannot be loaded by it (gguf-py knows no "mistral" architecture, llama.cpp writes
Mistral as "llama"); for those the model is MistralForCausalLM built from the metadata, with the
weights dequantized by gguf-py and Q/K un-permuted exactly as transformers does for llama GGUFs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from q4k_engine.distill.stats import KLReport, compare_logits

HF_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")  # transformers' own GGUF loader handles these


def _metadata(path: Path) -> dict:
    """The file's metadata through transformers' own GGUF header reader (it skips the big
    vocabulary arrays, which gguf-py's reader spends ~20 s parsing for Gemma)."""
    from transformers.integrations.gguf import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path))
    return meta


def _unpermute(w, n_head: int):
    """Inverse of llama.cpp's converter permutation of Q/K rows (NORM -> NEOX pairing)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LLAMA_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _mistral_from_gguf(path: Path):
    import gguf
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    meta = _metadata(path)
    reader = gguf.GGUFReader(str(path))
    a = meta["general.architecture"]
    heads, kv_heads = meta[f"{a}.attention.head_count"], meta[f"{a}.attention.head_count_kv"]
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    cfg = MistralConfig(
        vocab_size=int(embd.shape[-1]), hidden_size=meta[f"{a}.embedding_length"],
        intermediate_size=meta[f"{a}.feed_forward_length"], num_hidden_layers=meta[f"{a}.block_count"],
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=meta.get(f"{a}.attention.key_length", meta[f"{a}.embedding_length"] // heads),
        rms_norm_eps=meta[f"{a}.attention.layer_norm_rms_epsilon"], rope_theta=meta[f"{a}.rope.freq_base"],
        sliding_window=meta.get(f"{a}.attention.sliding_window"), tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=meta.get(f"{a}.context_length", 4096),
    )
    state = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
            [int(d) for d in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if kind == "attn_q":
                w = _unpermute(w, heads)
            elif kind == "attn_k":
                w = _unpermute(w, kv_heads)
            name = f"model.layers.{parts[1]}.{_LLAMA_NAMES[kind]}.weight"
        else:
            name = {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight",
                    "output": "lm_head.weight"}[parts[0]]
        state[name] = torch.from_numpy(np.array(w, copy=True))  # writable, owned
    model = MistralForCausalLM(cfg).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]:
        raise AssertionError(f"mistral reference: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def hf_model(path: Path | str):
    """transformers' float32 CPU model of a GGUF file (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = Path(path)
    meta = _metadata(path)
    a = meta["general.architecture"]
    if a == "mistral":
        return _mistral_from_gguf(path)
    if a not in HF_GGUF_ARCHS:
        raise NotImplementedError(f"no transformers reference for architecture {a!r}")
    overrides: dict = {}
    if a == "gemma3":
        overrides["attn_implementation"] = "eager"
        head_dim = meta.get(f"{a}.attention.key_length")
        if head_dim is not None:
            overrides["query_pre_attn_scalar"] = head_dim
        if f"{a}.rope.freq_base_swa" in meta:
            overrides["rope_local_base_freq"] = meta[f"{a}.rope.freq_base_swa"]
    if a == "qwen3" and f"{a}.attention.key_length" in meta:
        overrides["head_dim"] = meta[f"{a}.attention.key_length"]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 **overrides)
    return model.eval()


def hf_logits(model, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """All-position float32 logits of each sequence, one unpadded forward per sequence."""
    import torch

    out = []
    with torch.no_grad():
        for s in seqs:
            out.append(model(torch.tensor([list(s)], dtype=torch.long)).logits[0].float().numpy())
    return out


TABLE_HEADER = ("| model | positions | max abs dlogit | max abs logit | mean KLD | p99 KLD | max KLD | top-1 |\n"
                "|---|---|---|---|---|---|---|---|")


def parity(ref: Sequence[np.ndarray], ours: Sequence[np.ndarray]) -> KLReport:
    """KL(reference || ours) and the rest of llama.cpp's statistics over every position of every
    sequence (arrays [T, vocab] paired up), from the project's one statistics module."""
    return compare_logits(list(ref), list(ours))


def table_row(name: str, r: KLReport) -> str:
    return (f"| {name} | {r.positions} | {r.max_abs_dlogit:.3g} | {r.max_abs_logit:.3g} | {r.kld.mean:.3g} | "
            f"{r.kld.p99:.3g} | {r.kld.max:.3g} | {100 * r.same_top_p:.2f}% |")
