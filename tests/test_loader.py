"""loader: format detection, names, ModelConfig per architecture, and complete validation."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from q4k_engine.apr import read_apr, write_apr
from q4k_engine.dtypes import GGMLType, tensor_bytes
from q4k_engine.errors import FormatError, InputError, Q4KError, UnsupportedError
from q4k_engine.gguf_file import read_gguf, write_gguf
from q4k_engine.config import expected_shapes
from q4k_engine.convert import save_model
from q4k_engine.loader import (
    config_from_metadata,
    config_to_apr_metadata,
    config_to_gguf_metadata,
    hf_name,
    internal_name,
    open_model,
)
from q4k_engine.synthetic import resolve_model, synthetic_model
from q4k_engine.tensors import ModelFile, QTensor

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="module")
def models(module_seed) -> dict[str, ModelFile]:
    return {arch: synthetic_model(arch, seed=module_seed) for arch in ARCHS}


@pytest.fixture(scope="module")
def files(models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("models")
    out = {}
    for arch, m in models.items():
        # GGML's codes kept: the three files must hold the very same bytes (tests/test_convert.py
        # covers the portable files)
        out[arch, "apr"] = save_model(d / f"{arch}.apr", m, "apr", keep_ggml_codes=True)
        out[arch, "apr-gguf-names"] = save_model(d / f"{arch}.gguf-names.apr", m, "apr", names="gguf", keep_ggml_codes=True)
        out[arch, "gguf"] = save_model(d / f"{arch}.gguf", m, "gguf")
    return out


def expect(error: type[Q4KError], path: Path, *parts: str) -> None:
    with pytest.raises(error) as e:
        open_model(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


def rewrite_apr(src: Path, dst: Path, edit: Callable[[dict, dict[str, QTensor]], None]) -> Path:
    f = read_apr(src)
    meta, tensors = dict(f.metadata), dict(f.tensors)
    edit(meta, tensors)
    return write_apr(dst, meta, tensors.values())


def rewrite_gguf(src: Path, dst: Path, edit: Callable[[dict, dict[str, QTensor]], None]) -> Path:
    f = read_gguf(src)
    meta, tensors = dict(f.metadata), dict(f.tensors)
    edit(meta, tensors)
    return write_gguf(dst, meta, tensors.values())


# ------------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("arch", ARCHS)
def test_names_roundtrip(models, arch):
    config = models[arch].config
    sandwich = config.sandwich_norm
    for name in [*expected_shapes(dataclasses.replace(config, tied_head=False)), "some.other.tensor"]:
        hf = hf_name(name, sandwich)
        assert internal_name(hf, sandwich) == name
        if name.startswith("blk."):
            assert hf.startswith("model.layers.")
        assert internal_name(hf.removeprefix("model."), sandwich) == name  # realizar's bare `layers.N.*`


def test_known_names():
    assert hf_name("blk.3.ffn_norm.weight", False) == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("blk.3.ffn_norm.weight", True) == "model.layers.3.pre_feedforward_layernorm.weight"
    assert internal_name("model.layers.3.post_attention_layernorm.weight", True) == "blk.3.post_attention_norm.weight"
    assert internal_name("model.layers.0.self_attn.q_proj.bias", False) == "blk.0.attn_q.bias"
    assert internal_name("lm_head.weight", False) == "output.weight"
    assert internal_name("embed_tokens.weight", False) == "token_embd.weight"
    assert internal_name("model.norm.weight", True) == "output_norm.weight"


# ------------------------------------------------------------------------------------------------
# one model, three files


@pytest.mark.parametrize("arch", ARCHS)
def test_formats_agree(models, files, arch):
    m = models[arch]
    opened = [open_model(files[arch, kind]) for kind in ("apr", "apr-gguf-names", "gguf")]
    for o in opened:
        assert o.config == m.config
        assert o.tokenizer == m.tokenizer
        assert set(o.tensors) == set(m.tensors)
        for name, t in m.tensors.items():
            got = o.tensors[name]
            assert (got.name, got.dtype, got.shape) == (name, t.dtype, t.shape)
            assert np.array_equal(got.data, t.data)
    assert [o.format for o in opened] == ["apr", "apr", "gguf"]


def test_arch_switches(models):
    g = models["gemma3"].config
    assert (g.rope_neox, g.act, g.embed_scale, g.sandwich_norm, g.qk_norm, g.tied_head) == (True, "gelu_tanh", True, True, True, True)
    assert (g.sliding_window, g.sliding_pattern, g.rope_theta, g.rope_theta_local) == (8, 6, 1e6, 1e4)
    assert [g.is_sliding(i) for i in range(6)] == [True] * 5 + [False]
    assert g.head_dim * g.n_heads != g.hidden
    q2, q3 = models["qwen2"].config, models["qwen3"].config
    assert (q2.qkv_bias, q2.qk_norm, q2.tied_head, q2.rope_neox, q2.rms_eps) == (True, False, True, True, pytest.approx(1e-6))
    assert (q3.qk_norm, q3.qkv_bias, q3.head_dim, q3.rope_theta) == (True, False, 128, 1e6)
    ll, mi = models["llama"].config, models["mistral"].config
    assert (ll.rope_neox, ll.rope_theta, ll.rms_eps, ll.tied_head, ll.sliding_window) == (False, 1e4, pytest.approx(1e-5), False, 0)
    assert (mi.sliding_window, mi.sliding_pattern, mi.is_sliding(0), mi.is_sliding(1)) == (16, 0, True, True)


@pytest.mark.parametrize("arch", ARCHS)
def test_metadata_roundtrip(models, arch):
    c = models[arch].config
    for changed in (c, dataclasses.replace(c, rope_scale=0.125, attn_scale=0.1, context_length=0, rope_theta=5e5)):
        meta = config_to_gguf_metadata(changed)
        assert config_from_metadata(meta, models[arch].tensors, "x") == changed
    apr = config_to_apr_metadata(c)
    assert apr["rope_type"] == (2 if c.rope_neox else 0) and apr["model_type"] == arch
    assert "num_hidden_layers" not in apr and apr["num_layers"] == c.n_layers


def test_sliding_pattern_as_bools(models):
    g = models["gemma3"]
    meta = config_to_gguf_metadata(g.config)
    key = "gemma3.attention.sliding_window_pattern"
    for bools, pattern in (([True] * 5 + [False], 6), ([True, False] * 3, 2), ([True] * 6, 0), ([False] * 6, 1)):
        assert config_from_metadata({**meta, key: bools}, g.tensors, "x").sliding_pattern == pattern
    with pytest.raises(UnsupportedError, match="no period"):
        config_from_metadata({**meta, key: [True, False, False, True, True, True]}, g.tensors, "x")
    with pytest.raises(FormatError, match="one bool per layer"):
        config_from_metadata({**meta, key: [True, False]}, g.tensors, "x")


def test_apr_rope_type_and_aliases(files, models, tmp_path):
    def hf_spellings(meta, tensors):
        meta["rope_type"] = 2
        meta["num_hidden_layers"] = meta.pop("num_layers")
        meta["num_attention_heads"] = meta.pop("num_heads")
        meta["num_key_value_heads"] = meta.pop("num_kv_heads")

    m = open_model(rewrite_apr(files["llama", "apr"], tmp_path / "a.apr", hf_spellings))
    assert m.config == dataclasses.replace(models["llama"].config, rope_neox=True)
    p = rewrite_apr(files["llama", "apr"], tmp_path / "b.apr", lambda meta, t: meta.update(rope_type=1))
    expect(UnsupportedError, p, "rope_type")


def test_tied_head_folding(files, models, tmp_path):
    src = files["qwen2", "apr"]
    raw = read_apr(src)
    assert "lm_head.weight" in raw.tensors and raw.metadata["tied_embeddings"] is True  # realizar needs it (§6.3)
    assert open_model(src).config.tied_head
    untied = open_model(rewrite_apr(src, tmp_path / "u.apr", lambda meta, t: meta.pop("tied_embeddings")))
    assert not untied.config.tied_head and "output.weight" in untied.tensors

    def different_head(meta, tensors):
        head = tensors["lm_head.weight"]
        data = head.data.copy()
        data[0] ^= 1
        tensors["lm_head.weight"] = dataclasses.replace(head, data=data)

    assert not open_model(rewrite_apr(src, tmp_path / "d.apr", different_head)).config.tied_head
    compact = save_model(tmp_path / "c.apr", models["qwen2"], "apr", materialize_head=False, keep_ggml_codes=True)
    assert "lm_head.weight" not in read_apr(compact).tensors and open_model(compact).config.tied_head


# ------------------------------------------------------------------------------------------------
# validation


def _drop(name):
    return lambda meta, tensors: tensors.pop(name)


def _set(key, value):
    return lambda meta, tensors: meta.__setitem__(key, value)


def _retype(name, dtype):
    def edit(meta, tensors):
        t = tensors[name]
        tensors[name] = QTensor(name, dtype, t.shape, np.zeros(tensor_bytes(dtype, t.shape), np.uint8))
    return edit


def _swap(a, b):
    def edit(meta, tensors):
        tensors[a], tensors[b] = dataclasses.replace(tensors[b], name=a), dataclasses.replace(tensors[a], name=b)
    return edit


def _extra_layer(meta, tensors):
    t = tensors["blk.0.attn_norm.weight"]
    tensors["blk.7.attn_norm.weight"] = dataclasses.replace(t, name="blk.7.attn_norm.weight")


GGUF_CASES = [
    (_drop("blk.1.ffn_up.weight"), FormatError, "missing tensor blk.1.ffn_up.weight"),
    (_drop("token_embd.weight"), FormatError, "missing tensor token_embd.weight"),
    (_drop("blk.0.attn_k_norm.weight"), FormatError, "missing tensor blk.0.attn_k_norm.weight"),
    (lambda m, t: m.pop("qwen3.embedding_length"), FormatError, "missing metadata qwen3.embedding_length"),
    (_set("general.architecture", "gpt2"), UnsupportedError, "'gpt2'"),
    (_set("qwen3.block_count", "2"), FormatError, "qwen3.block_count is '2', expected an integer"),
    (_set("qwen3.block_count", 100000), FormatError, "outside"),
    (_set("qwen3.block_count", 1), FormatError, "beyond block_count 1"),
    (_set("qwen3.embedding_length", 1 << 40), FormatError, "outside"),
    (_set("qwen3.attention.head_count_kv", 3), FormatError, "cannot be shared"),
    (lambda m, t: m.update({f"qwen3.{k}": 64 for k in ("attention.key_length", "attention.value_length", "rope.dimension_count")}),
     FormatError, "has shape [512, 256], the config needs [256, 256]"),
    (_set("qwen3.attention.layer_norm_rms_epsilon", 0.5), FormatError, "outside"),
    (_set("qwen3.rope.freq_base", 1e12), FormatError, "outside"),
    (_set("qwen3.vocab_size", 999), FormatError, "vocab_size = 999"),
    (_set("qwen3.rope.dimension_count", 32), UnsupportedError, "rope.dimension_count"),
    (_set("qwen3.rope.scaling.type", "yarn"), UnsupportedError, "yarn"),
    (lambda m, t: m.update({"tokenizer.ggml.tokens": ["x"] * 1000, "tokenizer.ggml.token_type": [1] * 1000}),
     FormatError, "tokenizer has 1000 tokens"),
    (_set("tokenizer.ggml.eos_token_id", 10**6), FormatError, "tokenizer.ggml.eos_token_id"),
    (_swap("blk.0.attn_q.weight", "blk.0.attn_k.weight"), FormatError, "has shape"),
    (_extra_layer, FormatError, "blk.7.attn_norm.weight"),
    (_retype("blk.0.attn_q.weight", GGMLType.Q5_1), UnsupportedError, "blk.0.attn_q.weight has dtype Q5_1"),
    (_retype("blk.0.attn_norm.weight", GGMLType.Q8_0), UnsupportedError, "blk.0.attn_norm.weight has dtype Q8_0"),
]


@pytest.mark.parametrize("edit,error,text", GGUF_CASES, ids=[c[2] for c in GGUF_CASES])
def test_invalid_gguf_models(files, tmp_path, edit, error, text):
    expect(error, rewrite_gguf(files["qwen3", "gguf"], tmp_path / "bad.gguf", edit), text)


APR_CASES = [
    (_drop("model.layers.0.self_attn.q_proj.bias"), FormatError, "missing tensor blk.0.attn_q.bias"),
    (lambda m, t: m.pop("hidden_size"), FormatError, "missing metadata qwen2.embedding_length"),
    (lambda m, t: [m.pop("architecture"), m.pop("model_type")], FormatError, "no architecture"),
    (_set("num_heads", 5), FormatError, "cannot be shared"),
    (_set("vocab_size", 7.0), FormatError, "expected an integer"),
    (_set("format", "entrenar-checkpoint"), UnsupportedError, "entrenar"),
    (lambda m, t: t.__setitem__("token_embd.weight", dataclasses.replace(t["model.embed_tokens.weight"], name="token_embd.weight")),
     FormatError, "both map to token_embd.weight"),
    (_set("tokenizer.vocabulary", "abc"), FormatError, "tokenizer.vocabulary is not a list of strings"),
    (_set("tokenizer.token_type", [1, 2]), FormatError, "tokenizer.token_type has 2 entries"),
]


@pytest.mark.parametrize("edit,error,text", APR_CASES, ids=[c[2] for c in APR_CASES])
def test_invalid_apr_models(files, tmp_path, edit, error, text):
    expect(error, rewrite_apr(files["qwen2", "apr"], tmp_path / "bad.apr", edit), text)


def test_detection_by_magic(files, tmp_path):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(files["llama", "gguf"].read_bytes())
    assert open_model(renamed).format == "gguf"
    swapped = tmp_path / "really-apr.gguf"
    swapped.write_bytes(files["llama", "apr"].read_bytes())
    assert open_model(swapped).format == "apr"
    (tmp_path / "empty.apr").write_bytes(b"")
    expect(FormatError, tmp_path / "empty.apr", "empty")
    (tmp_path / "text.gguf").write_text("hello world")
    expect(FormatError, tmp_path / "text.gguf", "not a GGUF or APR")
    expect(InputError, tmp_path / "missing.apr", "no such file")
    expect(InputError, tmp_path, "directory")


# ------------------------------------------------------------------------------------------------
# resolve, head_dim, module layout


def test_resolve_model(tmp_path, monkeypatch, files):
    monkeypatch.setenv("Q4K_CACHE", str(tmp_path / "cache"))
    demo = resolve_model("demo")
    assert demo.parent == tmp_path / "cache" and demo.name.startswith("demo-") and demo.suffix == ".apr"
    assert open_model(demo).config.arch == "llama"
    assert resolve_model(str(files["llama", "gguf"])) == files["llama", "gguf"]
    with pytest.raises(InputError) as e:
        resolve_model(str(tmp_path / "nope.gguf"))
    assert "nope.gguf" in str(e.value)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_apr_without_head_dim(models, files, tmp_path, arch):
    # aprender/realizar files may lack head_dim: it comes from the q-projection (realizar GH-479),
    # not from hidden / heads (64 here, the real head_dim is 128)
    c = models[arch].config
    assert c.head_dim * c.n_heads != c.hidden
    bare = rewrite_apr(files[arch, "apr"], tmp_path / "bare.apr", lambda meta, t: meta.pop("head_dim"))
    assert "head_dim" not in read_apr(bare).metadata
    assert open_model(bare).config == c

    def odd_q(meta, tensors):
        meta.pop("head_dim")
        meta["num_heads"], meta["num_kv_heads"] = 3, 1  # 512 or 512 q rows: not a multiple of 3

    expect(FormatError, rewrite_apr(files[arch, "apr"], tmp_path / "odd.apr", odd_q), "no head_dim", "not a multiple of 3 heads")


def _imports(path: Path, package: str) -> set[str]:
    """The q4k_engine modules `path` imports, at module level or inside functions."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y, from . import x
                base = package if node.level == 1 else package.rsplit(".", node.level - 1)[0]
                mod = f"{base}.{node.module}" if node.module else base
                out |= {mod} if node.module else {f"{base}.{a.name}" for a in node.names}
            elif node.module and node.module.startswith("q4k_engine"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("q4k_engine")}
    return out


def test_engine_modules_import_one_way():
    # Data flows one way (design.md): no module imports, even lazily, one that imports it back.
    import q4k_engine

    root = Path(q4k_engine.__file__).parent
    graph = {f"q4k_engine.{p.stem}": _imports(p, "q4k_engine") for p in root.glob("*.py") if p.stem != "__init__"}
    for mod in graph:
        seen, todo = set(), [d for d in graph[mod] if d in graph]
        while todo:
            dep = todo.pop()
            assert dep != mod, f"{mod} imports itself back through {sorted(seen)}"
            if dep not in seen:
                seen.add(dep)
                todo += [d for d in graph[dep] if d in graph]


def test_make_7b_follows_the_inventory(tmp_path):
    # bench/make_7b.py writes through q4k_engine.shapes, whose tensors are the one inventory
    # (config.expected_shapes), so the loader accepts what it writes, with llama.cpp's Q4_K_M mix of types
    from q4k_engine.shapes import Shape, write_shape

    shape = Shape("qwen2", 8, 512, 768, 4, 2, 640, 4096, "test")
    cfg = shape.config()
    m = open_model(write_shape(tmp_path / "7b.apr", shape))
    assert {n: t.shape for n, t in m.tensors.items()} == {n: s for n, (s, required) in expected_shapes(cfg).items() if required}
    assert m.config == cfg
    q6 = sorted(n for n, t in m.tensors.items() if t.dtype == GGMLType.Q6_K)
    # use_more_bits for 8 layers: 0 and 7 (first and last eighth), and 3 and 6 (every third between)
    assert q6 == sorted(["output.weight"] + [f"blk.{i}.{k}" for i in (0, 3, 6, 7) for k in ("attn_v.weight", "ffn_down.weight")])
