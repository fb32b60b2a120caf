"""Synthetic models: every architecture loads, weights look like a model's, the tokenizer is a real
byte-level BPE, generation is deterministic, the demo model is cached."""
from __future__ import annotations

import os
import string

import numpy as np
import pytest

from q4k_engine.apr import DTYPE_CODES_KEY, read_apr
from q4k_engine.dtypes import GGMLType
from q4k_engine.errors import InputError
from q4k_engine.loader import open_model
from q4k_engine.quants import dequantize
from q4k_engine.tokenizer import bytes_to_unicode
from q4k_engine.synthetic import (
    BOS,
    EOS,
    byte_level_tokenizer,
    demo_model_path,
    synthetic_model,
    write_synthetic,
)

from conftest import fresh_seed

EXTRA = {
    "llama": {GGMLType.Q4_1},
    "mistral": {GGMLType.F16},
    "qwen2": {GGMLType.Q8_0},
    "qwen3": {GGMLType.BF16},
    "gemma3": {GGMLType.Q8_0, GGMLType.Q5_0},
}


@pytest.fixture
def seed(request) -> int:
    return fresh_seed(request.node.name)


@pytest.mark.parametrize("arch", sorted(EXTRA))
def test_each_arch_loads_with_its_types(tmp_path, arch, seed):
    m = open_model(write_synthetic(tmp_path / f"{arch}.apr", arch, "apr", seed=seed, keep_ggml_codes=True))
    types = {t.dtype for t in m.tensors.values()}
    assert {GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F32} | EXTRA[arch] == types
    assert all(t.dtype == GGMLType.F32 for t in m.tensors.values() if len(t.shape) == 1)
    assert m.tokenizer is not None and m.config.vocab_size == len(m.tokenizer.tokens)
    # realistic statistics: N(0, 0.02) matrices, gains near 1, small biases
    for name, t in m.tensors.items():
        x = dequantize(t.data, t.dtype, t.shape)
        if len(t.shape) == 2:
            assert abs(x.std() - 0.02) < 0.003 and abs(x.mean()) < 0.002, name
        elif name.endswith(".bias"):
            assert abs(x.std() - 0.02) < 0.01, name
        else:
            assert abs(x.mean() - 1.0) < 0.05 and 0.05 < x.std() < 0.15, name


def test_deterministic_by_seed(tmp_path, seed):
    a = write_synthetic(tmp_path / "a.gguf", "qwen2", "gguf", seed=seed).read_bytes()
    b = write_synthetic(tmp_path / "b.gguf", "qwen2", "gguf", seed=seed).read_bytes()
    c = write_synthetic(tmp_path / "c.gguf", "qwen2", "gguf", seed=seed + 1).read_bytes()
    assert a == b and a != c and len(a) == len(c)


def test_small_dims_fall_back_from_k_quants(tmp_path, seed):
    dims = dict(hidden=64, ffn=96, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, n_merges=5)
    m = open_model(write_synthetic(tmp_path / "s.gguf", "llama", "gguf", seed=seed, **dims))
    assert (m.config.hidden, m.config.ffn, m.config.n_layers, m.config.vocab_size) == (64, 96, 1, 256 + 5 + 2)
    assert m.tensors["blk.0.ffn_gate.weight"].dtype == GGMLType.F16  # 64 columns: not whole 256-blocks
    assert m.tensors["blk.0.attn_q.weight"].dtype == GGMLType.Q4_1  # llama's extra type fits 32-blocks


def test_bad_dims(tmp_path):
    with pytest.raises(InputError, match="cannot be shared"):
        synthetic_model("llama", n_heads=4, n_kv_heads=3)
    with pytest.raises(InputError, match="wings"):
        synthetic_model("llama", wings=2)
    with pytest.raises(InputError, match="unknown architecture"):
        synthetic_model("gpt2")


# ------------------------------------------------------------------------------------------------
# tokenizer


def test_bytes_to_unicode_matches_tokenizers_alphabet():
    from tokenizers import pre_tokenizers

    spell = bytes_to_unicode()
    assert len(set(spell.values())) == 256
    assert set(spell.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert spell[ord(" ")] == "Ġ" and spell[ord("\n")] == "Ċ" and spell[ord("a")] == "a"


def _hf_tokenizer(spec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spec.tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in spec.merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_tokenizer_is_a_byte_level_bpe(rng):
    spec = byte_level_tokenizer()
    assert spec.model == "gpt2" and spec.tokens[-2:] == [BOS, EOS]
    assert (spec.bos_id, spec.eos_id) == (len(spec.tokens) - 2, len(spec.tokens) - 1)
    assert len(set(spec.tokens)) == len(spec.tokens) and 300 <= len(spec.tokens) <= 512
    assert spec.token_types == [1] * (len(spec.tokens) - 2) + [3, 3]
    tok = _hf_tokenizer(spec)
    english = "The ferry crosses the river, and the market sells apples for 3 coins."
    enc = tok.encode(english)
    assert len(enc.ids) < len(english.encode()) / 2  # the merges do their work
    assert tok.decode(enc.ids) == english
    alphabet = string.printable + "éü€中😀"
    for _ in range(20):
        text = "".join(rng.choice(list(alphabet), size=int(rng.integers(1, 60))))
        ids = tok.encode(text).ids
        assert max(ids) < len(spec.tokens) - 2  # specials never come from plain text
        assert tok.decode(ids) == text


def test_synthetic_gguf_loads_in_transformers(tmp_path, seed):
    """An independent consumer (Hugging Face transformers' GGUF loader) reads our writer's file:
    config, tokenizer and weights agree with what we wrote."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    path = write_synthetic(tmp_path / "llama.gguf", "llama", "gguf", seed=seed)
    ours = open_model(path)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    c = ours.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        c.hidden, c.n_layers, c.n_heads, c.n_kv_heads)
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]  # transformers 4 / 5
    assert (cfg.intermediate_size, cfg.vocab_size, theta, cfg.rms_norm_eps) == (c.ffn, c.vocab_size, c.rope_theta, c.rms_eps)
    assert cfg.tie_word_embeddings == c.tied_head
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "the river and the market"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    emb = model.get_input_embeddings().weight.detach().numpy()
    t = ours.tensors["token_embd.weight"]
    np.testing.assert_allclose(emb, dequantize(t.data, t.dtype, t.shape), rtol=0, atol=1e-6)
    down = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    t = ours.tensors["blk.1.ffn_down.weight"]
    np.testing.assert_allclose(down, dequantize(t.data, t.dtype, t.shape), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# demo


def test_demo_model_cached_once(tmp_path, monkeypatch):
    monkeypatch.setenv("Q4K_CACHE", str(tmp_path / "c"))
    p = demo_model_path()
    assert p.parent == tmp_path / "c" and p.name.startswith("demo-") and p.name.endswith(".apr")
    stat = p.stat()
    assert demo_model_path() == p and p.stat().st_mtime_ns == stat.st_mtime_ns  # not rewritten
    m = open_model(p)
    assert m.format == "apr" and m.config.arch == "llama" and m.tokenizer.model == "gpt2"
    assert sorted(os.listdir(p.parent)) == [p.name]  # no temporary left
    # every APR we write reads alike upstream: its Q4_1 attn_q is stored as F16
    assert {t.dtype for t in m.tensors.values()} == {GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F16, GGMLType.F32}
    assert DTYPE_CODES_KEY not in read_apr(p).metadata
