"""The FP8 mode's rules (engine/fp8.py) and the NumPy backend's emulation of them, on the CPU: the
e4m3 rounding against torch's float8_e4m3fn, the row scales, which products take FP8 (none below
FP8_MIN_ROWS rows, never the LM head), the option through load() and the CLI. The CUDA kernels are
checked against these rules in tests/test_fp8_gpu.py."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import q4k_engine
from q4k_engine import fp8
from q4k_engine.backend import Batch
from q4k_engine.backend_cpu import NumpyBackend
from q4k_engine.cli.main import main
from q4k_engine.distill.stats import compare_logits
from q4k_engine.errors import InputError
from q4k_engine.forward import forward, upload


def test_e4m3_is_torchs_float8_e4m3fn(rng):
    torch = pytest.importorskip("torch")
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    grid = np.unique(grid[np.isfinite(grid)])
    mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)  # ties: to even
    x = np.concatenate([grid, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                        (rng.standard_normal(20000) * rng.choice([1e-4, 1e-2, 1, 100], 20000)).astype(np.float32),
                        np.float32([1e-30, -1e-30, 2.0 ** -10, 2.0 ** -9, 3 * 2.0 ** -11])]).astype(np.float32)
    ref = torch.from_numpy(x).to(torch.float8_e4m3fn).to(torch.float32).numpy()
    np.testing.assert_array_equal(fp8.e4m3(x), ref)


def test_e4m3_saturates_and_keeps_nan():
    got = fp8.e4m3(np.float32([448, 449, 464, 500, 1e30, -1e30, np.inf, np.nan, -0.0]))
    np.testing.assert_array_equal(got[:7], np.float32([448, 448, 448, 448, 448, -448, 448]))
    assert np.isnan(got[7]) and np.signbit(got[8])


def test_quantize_rows(rng):
    x = rng.standard_normal((4, 300)).astype(np.float32) * np.float32([[1e-3], [1], [1e3], [0]])
    q, s = fp8.quantize_rows(x)
    assert s[3] == 0 and not q[3].any()  # an all-zero row
    np.testing.assert_array_equal(np.abs(q[:3]).max(axis=1), 448)  # each row's largest value maps to 448
    np.testing.assert_array_equal(s[:3], (np.abs(x[:3]).max(axis=1) / np.float32(448)).astype(np.float32))
    rel = np.abs(q[:3] * s[:3, None] - x[:3]) / np.abs(x[:3]).max(axis=1, keepdims=True)
    assert rel.max() <= 2.0 ** -4  # half an e4m3 step of the largest value at most
    x16 = x.astype(np.float16)
    np.testing.assert_array_equal(fp8.quantize_rows(x16)[0], fp8.quantize_rows(x16.astype(np.float32))[0])


def test_which_products_take_fp8():
    assert not fp8.uses_fp8("fp16", 10_000)
    assert not fp8.uses_fp8("fp8", fp8.FP8_MIN_ROWS - 1) and fp8.uses_fp8("fp8", fp8.FP8_MIN_ROWS)
    with pytest.raises(InputError, match="precision must be one of fp16, fp8"):
        fp8.check_precision("fp4")


@pytest.fixture(scope="module")
def model(demo):
    return demo.model


def test_numpy_fp8_forward(model, rng):
    """Below FP8_MIN_ROWS tokens the fp8 backend is the reference bit for bit; above, it drifts a
    little (the demo model is tiny and random); the LM head is never FP8."""
    cfg = model.config
    ref, emu = NumpyBackend(), NumpyBackend("fp8")
    wr, we = upload(model, ref), upload(model, emu)
    short = Batch.from_lengths([60, 68])
    ids = rng.integers(0, cfg.vocab_size, short.n_tokens).astype(np.int32)
    np.testing.assert_array_equal(forward(cfg, wr, ref, ids, short), forward(cfg, we, emu, ids, short))
    long = Batch.from_lengths([100, 100])
    ids = rng.integers(0, cfg.vocab_size, long.n_tokens).astype(np.int32)
    a, b = forward(cfg, wr, ref, ids, long), forward(cfg, we, emu, ids, long)
    assert not np.array_equal(a, b)
    r = compare_logits(a, b)
    print(f"demo, 200 tokens: fp8 emulation vs reference mean KL {r.kld.mean:.2e}, top-1 {r.same_top_p:.3f}")
    assert 0 < r.kld.mean < 1e-2
    x = rng.standard_normal((200, cfg.hidden)).astype(np.float32)
    np.testing.assert_array_equal(emu.lm_head(x, we.output), ref.lm_head(x, wr.output))


def test_load_and_cli_take_precision(rng):
    t = q4k_engine.load("demo", device="cpu", precision="fp8")
    assert t.precision == "fp8" and "precision=fp8" in repr(t)
    assert q4k_engine.load("demo", device="cpu").precision == "fp16"
    with pytest.raises(InputError, match="precision must be one of"):
        q4k_engine.load("demo", device="cpu", precision="int4")
    r = CliRunner().invoke(main, ["logits", "--device", "cpu", "--precision", "fp8", "--model", "demo",
                                  "--tokens", ",".join(map(str, rng.integers(1, 400, 140))), "--positions", "last"])
    assert r.exit_code == 0, r.output
    assert "precision=fp8" in r.output
    bad = CliRunner().invoke(main, ["logits", "--device", "cpu", "--precision", "fp4", "--model", "demo",
                                    "--tokens", "1,2"])
    assert bad.exit_code == 2 and "'fp4' is not one of 'fp16', 'fp8'" in bad.output  # click's usage error
