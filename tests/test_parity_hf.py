"""Parity of the reference forward with Hugging Face transformers (float32, CPU) loading the same GGUF.

Real models (slow): Gemma 3 270M Q4_K_M and SmolLM2-135M, all-position logits of 3 prompts of
12+ tokens: mean KL(reference || ours) <= 1e-4 and 100% top-1 agreement. Synthetic models of every
architecture (written fresh, seed printed): the same statistics, plus the same model as GGUF and as
APR giving identical logits. tests/hf_reference.py says how transformers loads each architecture
(mistral: its GGUF loader cannot, so the model is assembled from gguf-py-dequantized weights).
bench/parity_hf.py prints the table.
"""
from __future__ import annotations

import numpy as np
import pytest

import q4k_engine
from q4k_engine.convert import save_model
from q4k_engine.loader import open_model
from q4k_engine.synthetic import synthetic_model

from hf_reference import TABLE_HEADER, hf_logits, hf_model, parity, table_row
from realmodels import gemma_path, smollm_path

pytest.importorskip("transformers")
pytest.importorskip("torch")

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched. Ünïcödé: 日本語, emoji 🚀!",
)


@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory, module_seed) -> dict[str, tuple]:
    rng = np.random.default_rng(module_seed)
    folder = tmp_path_factory.mktemp("synthetic")
    out = {}
    for arch in ARCHS:
        model = synthetic_model(arch, seed=int(rng.integers(2**31)))
        out[arch] = (save_model(folder / f"{arch}.gguf", model, "gguf"), save_model(folder / f"{arch}.apr", model, "apr", keep_ggml_codes=True))
    return out


def ours_all_positions(teacher, seqs) -> list[np.ndarray]:
    logits, lengths = teacher.logits_per_position(seqs)
    return [logits[i, :n] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("arch", ARCHS)
def test_synthetic_matches_transformers(arch, synthetic_files, rng):
    gguf_path, apr_path = synthetic_files[arch]
    teacher = q4k_engine.load(gguf_path, device="cpu")
    # longer than the sliding windows of the synthetic mistral (16) and gemma3 (8)
    seqs = [rng.integers(0, teacher.vocab_size, n).tolist() for n in (45, 12, 29)]
    ours = ours_all_positions(teacher, seqs)
    p = parity(hf_logits(hf_model(gguf_path), seqs), ours)
    print(TABLE_HEADER, table_row(f"synthetic-{arch}", p), sep="\n")
    assert p.max_abs_dlogit <= 1e-4 * max(1.0, p.max_abs_logit)
    assert p.kld.mean <= 1e-8 and p.same_top_p == 1.0
    # the same tensors in APR give the same logits, bit for bit
    apr = ours_all_positions(q4k_engine.load(apr_path, device="cpu"), seqs)
    assert all(np.array_equal(a, b) for a, b in zip(apr, ours))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2-135m", "gemma3-270m"])
def test_real_model_matches_transformers(which, tmp_path):
    path = smollm_path() if which == "smollm2-135m" else gemma_path()
    teacher = q4k_engine.load(path, device="cpu")
    seqs = [teacher.encode(p) for p in PROMPTS]
    assert min(len(s) for s in seqs) >= 12
    ours = ours_all_positions(teacher, seqs)
    p = parity(hf_logits(hf_model(path), seqs), ours)
    print(TABLE_HEADER, table_row(which, p), sep="\n")
    assert p.kld.mean <= 1e-4, p
    assert p.same_top_p == 1.0, p
    assert p.max_abs_dlogit <= 1e-3 * p.max_abs_logit, p
    if which == "smollm2-135m":  # converted to APR: the very same logits
        apr = save_model(tmp_path / "smollm.apr", open_model(path), "apr", keep_ggml_codes=True)
        assert all(np.array_equal(a, b) for a, b in zip(ours_all_positions(q4k_engine.load(apr, device="cpu"), seqs), ours))
