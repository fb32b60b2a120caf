"""Shared test plumbing: fresh seeds (printed), the `gpu` marker skipped when q4k_engine.gpu.probe() says no,
the demo teacher on the CPU."""
from __future__ import annotations

import os

import numpy as np
import pytest

import q4k_engine
from q4k_engine.gpu import probe


def pytest_collection_modifyitems(config, items):
    cuda = probe()
    if cuda.usable:
        return
    skip = pytest.mark.skip(reason=f"no CUDA GPU: {cuda.reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def fresh_seed(label: str) -> int:
    """A fresh random seed (or Q4K_SEED, to replay a run), printed with `label` so that a failure
    can be replayed."""
    seed = int(os.environ.get("Q4K_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"[{label}] seed={seed}")
    return seed


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded fresh for every test (seed printed; Q4K_SEED replays a run)."""
    return np.random.default_rng(fresh_seed(request.node.name))


@pytest.fixture(scope="module")
def module_seed(request) -> int:
    """One fresh seed for a test module's shared models (printed; Q4K_SEED replays a run)."""
    return fresh_seed(f"{request.module.__name__} models")


@pytest.fixture(scope="module")
def demo():
    """The demo teacher on the CPU, loaded once per test module (a module may define its own `demo`)."""
    return q4k_engine.load("demo", device="cpu")


def synthetic_kernel_model(tmp_path_factory, arch: str):
    """A small synthetic model of `arch` written as APR with every GGML type the kernels take
    (keep_ggml_codes), opened: the GPU tests' model-level fixture."""
    from q4k_engine import synthetic
    from q4k_engine.loader import open_model

    path = tmp_path_factory.mktemp("models") / f"{arch}.apr"
    synthetic.write_synthetic(path, arch, "apr", keep_ggml_codes=True)
    return open_model(path)
