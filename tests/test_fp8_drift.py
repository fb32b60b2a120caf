"""bench/fp8_drift.py (the FP8 mode's accuracy emulated on the NumPy oracle) without a GPU: its e4m3
rounding against known values of the format, the per-row and per-block scales, and a run on the
demo model."""
from __future__ import annotations

import numpy as np
import pytest
from bench_scripts import bench_module

fd = bench_module("fp8_drift")


def test_e4m3_grid():
    # every integer 0..16 is exact (so are 4-bit quants), 17 is a tie between 16 and 18 and goes to
    # the even mantissa, 448 is the largest finite value, 2^-9 the smallest subnormal
    assert np.array_equal(fd.e4m3(np.arange(17.0)), np.arange(17.0))
    got = fd.e4m3(np.array([17.0, 19.0, 1.0625, 1.07, 448.0, -448.0, 2.0 ** -9, 2.0 ** -11]))
    assert got.tolist() == [16.0, 20.0, 1.0, 1.125, 448.0, -448.0, 2.0 ** -9, 0.0]


def test_scaled_e4m3_rows_and_blocks(rng):
    x = rng.standard_normal((5, 70)) * np.array([1e-3, 1.0, 50.0, 0.0, 7.0])[:, None]
    for block in (None, 32):
        q = fd.scaled_e4m3(x, block)
        assert q.shape == x.shape
        assert not q[3].any(), "a zero row stays zero"
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values in its normal range
        big = np.abs(x) > np.abs(x).max(axis=1, keepdims=True) * 2.0 ** -6
        assert (np.abs(q - x)[big] <= 2.0 ** -4 * np.abs(x)[big]).all()
        # the largest magnitude of each scale group maps to +-448 * scale, i.e. to itself
        groups = [slice(0, 70)] if block is None else [slice(0, 32), slice(32, 64), slice(64, 70)]
        for g in groups:
            i = np.abs(x[:, g]).argmax(axis=1)
            np.testing.assert_allclose(q[:, g][np.arange(5), i], x[:, g][np.arange(5), i], rtol=1e-6)


def test_drift_runs_on_the_demo_model():
    from q4k_engine.synthetic import demo_model_path

    lines = fd.drift(demo_model_path(), 12)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| activation")]
    assert len(rows) == len(fd.VARIANTS)
    for row in rows:
        kl, top1 = (float(v) for v in row.strip("| ").split(" | ")[3:5])
        assert 0.0 <= kl < 1.0 and 0.0 <= top1 <= 1.0, row


def test_scaled_e4m3_tiles(rng):
    w = rng.standard_normal((200, 300)) * np.linspace(0.01, 10, 300)
    q = fd.scaled_e4m3_tiles(w, 128)
    assert q.shape == w.shape
    # one scale per 128 x 128 block (edge blocks partial): each block's largest magnitude is kept,
    # and values within 2^-6 of it keep 3 mantissa bits
    for r0 in (0, 128):
        for c0 in (0, 128, 256):
            b, qb = w[r0:r0 + 128, c0:c0 + 128], q[r0:r0 + 128, c0:c0 + 128]
            i = np.unravel_index(np.abs(b).argmax(), b.shape)
            assert qb[i] == pytest.approx(b[i], rel=1e-6)
            big = np.abs(b) > np.abs(b).max() * 2.0 ** -6
            assert (np.abs(qb - b)[big] <= 2.0 ** -4 * np.abs(b)[big]).all()


def test_drift_by_product_rounds_only_that_product(rng):
    """--by-product: one kind of product at a time in FP8; the others and the LM head untouched."""
    from q4k_engine.backend_cpu import NumpyBackend
    from q4k_engine.forward import upload
    from q4k_engine.synthetic import demo_model_path, synthetic_model

    model = synthetic_model("qwen2", seed=1)
    plain = NumpyBackend()
    layer = upload(model, plain).layers[0]
    products = {"q+k+v": layer.qkv[0], "o": layer.wo, "gate": layer.gate, "up": layer.up, "down": layer.down}
    for only in fd.PRODUCTS:
        fb = fd.fp8_backend(None, None, True, only)
        for kind, t in products.items():
            x = rng.standard_normal((3, t.cols)).astype(np.float32)
            untouched = np.array_equal(fb.matmul(x, t), plain.matmul(x, t))
            assert untouched != (kind in only.split("/") or kind == only), (only, t.name)
        x = rng.standard_normal((2, model.config.hidden)).astype(np.float32)
        w = upload(model, plain).output
        assert np.array_equal(fb.lm_head(x, w), plain.lm_head(x, w))
    lines = fd.drift(demo_model_path(), 12, by_product=True)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| products")]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == list(fd.PRODUCTS)
    for row in rows:
        kl, top1 = (float(v) for v in row.strip("| ").split(" | ")[1:3])
        assert 0.0 < kl < 1.0 and 0.0 <= top1 <= 1.0, row
