"""Nothing falls back silently: device "auto" on the CPU names its reason (a warning from the API,
one line from the CLI before the work), an unknown tokenizer.ggml.pre is refused (Q4K_PRETOKENIZER
chooses a split explicitly), and the GPU kernels' limits are checked when a model is loaded."""
from __future__ import annotations

import dataclasses
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import q4k_engine
from q4k_engine import FallbackWarning, InputError, UnsupportedError, gpu
from q4k_engine.backend_cuda import check_kernel_limits
from q4k_engine.cli.main import main
from q4k_engine.dtypes import GGMLType, row_bytes
from q4k_engine.convert import save_model
from q4k_engine.loader import open_model
from q4k_engine.synthetic import synthetic_model, write_synthetic
from q4k_engine.tensors import QTensor
from q4k_engine.tokenizer import PRETOKENIZER_ENV, build_tokenizer

REASONS = {
    "no CuPy": gpu.CudaProbe(None, "CuPy is not installed: pip install 'q4k-engine[cuda13]'"),
    "no driver": gpu.CudaProbe(None, "no usable CUDA driver (CUDARuntimeError: cudaErrorInsufficientDriver)"),
    "no device": gpu.CudaProbe(None, "no CUDA device found"),
}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, module_seed):
    return write_synthetic(tmp_path_factory.mktemp("m") / "llama.gguf", "llama", "gguf", seed=module_seed)


@pytest.mark.parametrize("why", sorted(REASONS))
def test_auto_device_on_cpu_warns_with_the_reason(model_path, monkeypatch, why):
    monkeypatch.setattr(gpu, "probe", lambda: REASONS[why])
    with pytest.warns(FallbackWarning, match="device 'auto' runs on the CPU") as caught:
        teacher = q4k_engine.load(model_path, device="auto")
    assert teacher.device == "cpu" and len(caught) == 1
    assert REASONS[why].reason in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's load(), not into the engine


def test_auto_device_names_a_backend_that_fails_to_import(model_path, monkeypatch):
    monkeypatch.setattr(gpu, "probe", lambda: gpu.CudaProbe(np, ""))  # "CuPy works"
    monkeypatch.setitem(sys.modules, "q4k_engine.backend_cuda", None)  # but the backend cannot import
    with pytest.warns(FallbackWarning, match="the CUDA backend cannot be imported"):
        assert q4k_engine.load(model_path, device="auto").device == "cpu"
    with pytest.raises(q4k_engine.DeviceError, match="the CUDA backend cannot be imported"):
        q4k_engine.load(model_path, device="cuda")


def test_explicit_devices_do_not_warn(model_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert q4k_engine.load(model_path, device="cpu").device == "cpu"


@pytest.mark.parametrize("command", [["logits", "--tokens", "1,2,3"], ["generate", "--tokens", "1,2", "-n", "2"]])
def test_cli_says_auto_runs_on_the_cpu_before_the_work(model_path, monkeypatch, command):
    monkeypatch.setattr(gpu, "probe", lambda: REASONS["no device"])
    r = CliRunner().invoke(main, [command[0], "--model", str(model_path), *command[1:]])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    notes = [ln for ln in lines if "warning" in ln]
    assert notes == [lines[0]], r.stderr  # one line, and the first thing said
    assert lines[0] == ("q4k-engine: warning: device 'auto' runs on the CPU (NumPy backend, much slower): "
                        "no CUDA device found")


# --- tokenizer.ggml.pre ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spec(model_path):
    return open_model(model_path).tokenizer


def test_unknown_pre_tokenizer_is_refused(spec, monkeypatch):
    monkeypatch.delenv(PRETOKENIZER_ENV, raising=False)
    with pytest.raises(UnsupportedError, match=f"tokenizer.ggml.pre 'tekken'.*{PRETOKENIZER_ENV}") as e:
        build_tokenizer(dataclasses.replace(spec, pre="tekken"), "llama")
    assert "\n" not in str(e.value) and "gpt-2" in str(e.value)  # the choices are named


def test_pre_tokenizer_chosen_explicitly(spec, monkeypatch):
    text = "In 2024, 12345 ferries crossed."
    gpt2 = build_tokenizer(spec, "llama").encode(text)  # the file's own pre-type: gpt-2
    monkeypatch.setenv(PRETOKENIZER_ENV, "gpt-2")
    assert build_tokenizer(dataclasses.replace(spec, pre="tekken"), "llama").encode(text) == gpt2
    monkeypatch.setenv(PRETOKENIZER_ENV, "qwen2")  # the choice overrides the file's: digits split one by one
    pieces = build_tokenizer(spec, "llama").backend.pre_tokenizer.pre_tokenize_str("12345")
    assert [p for p, _ in pieces] == ["1", "2", "3", "4", "5"]
    monkeypatch.setenv(PRETOKENIZER_ENV, "bogus")
    with pytest.raises(InputError, match=f"{PRETOKENIZER_ENV}='bogus' is not a pre-tokenizer"):
        build_tokenizer(spec, "llama")


def test_missing_pre_tokenizer_warns(spec, monkeypatch):
    monkeypatch.delenv(PRETOKENIZER_ENV, raising=False)
    with pytest.warns(FallbackWarning, match="names no tokenizer.ggml.pre: splitting text as GPT-2 does"):
        tok = build_tokenizer(dataclasses.replace(spec, pre=None), "llama")
    assert tok.encode("the ferry") == build_tokenizer(spec, "llama").encode("the ferry")


def test_cli_refuses_unknown_pre_tokenizer(tmp_path, monkeypatch, module_seed):
    monkeypatch.delenv(PRETOKENIZER_ENV, raising=False)
    model = synthetic_model("llama", seed=module_seed)
    path = save_model(tmp_path / "m.gguf", dataclasses.replace(
        model, tokenizer=dataclasses.replace(model.tokenizer, pre="some-new-pre")), "gguf")
    r = CliRunner().invoke(main, ["logits", "--device", "cpu", "--model", str(path), "--text", "hello"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "tokenizer.ggml.pre 'some-new-pre'" in r.stderr and PRETOKENIZER_ENV in r.stderr
    monkeypatch.setenv(PRETOKENIZER_ENV, "gpt-2")
    assert CliRunner().invoke(main, ["logits", "--device", "cpu", "--model", str(path), "--text", "hello"]).exit_code == 0


# --- GPU kernel limits, checked without a GPU from the file's shapes ------------------------------

def test_head_dim_above_the_attention_kernels_limit_is_refused(module_seed):
    model = synthetic_model("llama", seed=module_seed, head_dim=288, n_heads=2, n_kv_heads=1)
    with pytest.raises(UnsupportedError, match="head_dim 288 is above the GPU attention kernels' limit of 256"):
        check_kernel_limits(model)
    check_kernel_limits(synthetic_model("llama", seed=module_seed, head_dim=256, n_heads=2, n_kv_heads=1))


def test_attention_shared_memory_beyond_the_device_is_refused(module_seed):
    model = synthetic_model("llama", seed=module_seed, head_dim=256, n_heads=2, n_kv_heads=1)
    check_kernel_limits(model, 227 << 10, "NVIDIA H200")
    check_kernel_limits(model, 99 << 10, "NVIDIA GeForce RTX 3090")  # exactly enough
    with pytest.raises(UnsupportedError, match=r"head_dim 256 needs 101376 bytes of shared memory per block for "
                                               r"prefill attention, Tesla T4 allows 65536"):
        check_kernel_limits(model, 64 << 10, "Tesla T4")


def _retyped(model, name: str, dtype: GGMLType):
    t = model.tensors[name]
    data = np.zeros(t.rows * row_bytes(dtype, t.cols), np.uint8)  # the check reads types and shapes only
    return dataclasses.replace(model, tensors={**model.tensors, name: QTensor(name, dtype, t.shape, data)})


def test_unsupported_matrix_type_is_refused(module_seed):
    model = _retyped(synthetic_model("llama", seed=module_seed), "blk.1.attn_v.weight", GGMLType.Q2_K)
    with pytest.raises(UnsupportedError, match="blk.1.attn_v.weight: GGML type Q2_K has no GPU kernel"):
        check_kernel_limits(model)


def test_unfused_gated_mlp_is_reported(module_seed):
    # hidden 288: a Q4_K row pads to 512 values, a Q8_0 row to 288, so glu_matmul cannot fuse them
    model = synthetic_model("llama", seed=module_seed, hidden=288, n_heads=4, n_kv_heads=2, head_dim=72)
    model = _retyped(_retyped(model, "blk.1.ffn_gate.weight", GGMLType.Q4_K), "blk.1.ffn_up.weight", GGMLType.Q8_0)
    with pytest.warns(FallbackWarning, match=r"in 1 of 2 layers \(first blk.1\) ffn_gate \(Q4_K\) and ffn_up "
                                             r"\(Q8_0\) rows pad to 512 and 288 values"):
        check_kernel_limits(model)


def test_gated_mlp_of_two_types_is_reported(module_seed):
    # same padded rows (Q4_K, Q6_K: 256-value blocks) but two types: no one-launch fused gate/up
    model = synthetic_model("llama", seed=module_seed)
    model = _retyped(_retyped(model, "blk.0.ffn_gate.weight", GGMLType.Q4_K), "blk.0.ffn_up.weight", GGMLType.Q6_K)
    with pytest.warns(FallbackWarning, match=r"in 1 of 2 layers \(first blk.0\) ffn_gate \(Q4_K\) and ffn_up "
                                             r"\(Q6_K\) differ in type: up to \d+ tokens a forward"):
        check_kernel_limits(model)


@pytest.mark.parametrize("error, reason", [
    (ImportError("No module named 'cupy'"), "CuPy is not installed"),
    (OSError("libcudart.so.12: cannot open shared object file"), "CuPy failed to import (OSError: libcudart.so.12"),
])
def test_probe_names_why_cupy_is_unusable(monkeypatch, error, reason):
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *a, **k):
        if name == "cupy":
            raise error
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    gpu.probe.cache_clear()
    try:
        p = gpu.probe()
    finally:
        gpu.probe.cache_clear()
    assert not p.usable and p.reason.startswith(reason)


@pytest.mark.parametrize("count, reason", [
    (0, "no CUDA device found"),
    (RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient"), "no usable CUDA driver ("),
    (RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"), "no CUDA device found ("),
])
def test_probe_names_why_no_device_is_usable(monkeypatch, count, reason):
    def get_device_count():
        if isinstance(count, Exception):
            raise count
        return count

    fake = type(sys)("cupy")
    fake.cuda = type(sys)("cupy.cuda")
    fake.cuda.runtime = type(sys)("cupy.cuda.runtime")
    fake.cuda.runtime.getDeviceCount = get_device_count
    monkeypatch.setitem(sys.modules, "cupy", fake)
    gpu.probe.cache_clear()
    try:
        p = gpu.probe()
    finally:
        gpu.probe.cache_clear()
    assert not p.usable and p.reason.startswith(reason)


def fake_device(monkeypatch, mm, device: int, smem: int) -> None:
    """kernels.matmul sees one GPU, `device`, with `smem` bytes of opt-in shared memory per block."""

    class FakeRuntime:
        @staticmethod
        def getDevice():
            return device

    class FakeCupy:
        class cuda:
            runtime = FakeRuntime

    monkeypatch.setattr(mm, "_cupy", lambda: FakeCupy)
    monkeypatch.setattr(mm, "smem_optin", lambda d: smem)


def test_wgmma_plan_and_dispatch(monkeypatch):
    """Hopper's wgmma GEMM: 64-token tiles up to 64 tokens, 128 above, 512 threads, shared memory
    (3 W stages + 4 x stages) within the H200's 227 KiB; the default takes it only on Hopper and only
    in the fused GEMM's range from WGMMA_MIN_M; elsewhere (or forced off Hopper: an error) mma."""
    from q4k_engine.errors import UnsupportedError
    from q4k_engine.kernels import matmul as mm

    plan = mm._wgmma_plan_for(100, 227 << 10)
    assert (plan.kernel, plan.glu_kernel, plan.bt, plan.threads, plan.per_sm) == (
        "wg_gemm_bt128", "wg_gate_up_bt128", 128, mm.WGMMA_THREADS, 1)
    assert plan.smem == (3 * 128 + 4 * 128) * 128 * 2 <= 227 << 10
    assert mm._wgmma_plan_for(40, 227 << 10).bt == mm._wgmma_plan_for(100, 163 << 10).bt == 64
    assert mm._wgmma_plan_for(100, 101376) is None
    for m in (1, 2, 8, 9, mm.WGMMA_MIN_M - 1, mm.WGMMA_MIN_M, mm.FUSED_MAX_M, mm.FUSED_MAX_M + 1, 4096):
        on_hopper = mm._default_path(m, GGMLType.Q4_K, 3584, wgmma=True)
        elsewhere = mm._default_path(m, GGMLType.Q4_K, 3584)
        assert on_hopper == ("wgmma" if mm.WGMMA_MIN_M <= m <= mm.FUSED_MAX_M else elsewhere), m
        assert elsewhere != "wgmma"

    fake_device(monkeypatch, mm, 3, 227 << 10)
    monkeypatch.setattr(mm, "has_wgmma", lambda device: False)
    assert mm._wgmma_plan(100, forced=False) is None
    with pytest.raises(UnsupportedError, match=r"GPU 3: path 'wgmma' needs a Hopper GPU \(sm_90\)"):
        mm._wgmma_plan(100, forced=True)


def test_fused_gemm_tile_fits_the_device_shared_memory(monkeypatch):
    """The fused GEMM's token tile is chosen within the device's shared memory per block (H200 227 KiB,
    A100 163 KiB, GB10 about 99 KiB: 32-token tiles there); with no tile that fits, the default
    dispatch says so once and takes the cuBLAS path, and a forced path="mma" is an error."""
    from q4k_engine.kernels import matmul as mm

    assert mm._fused_plan(100).bt == 128
    assert mm._fused_plan(100, 227 << 10).bt == mm._fused_plan(100, 163 << 10).bt == 128
    assert mm._fused_plan(100, 101376).bt == 32 and mm._fused_plan(10, 101376).bt == 16
    plan = mm._fused_plan(100, 101376)
    assert plan.smem <= 101376 and plan.kernel == "gemm_bt32" and plan.glu_kernel == "gate_up_bt32"
    assert mm._fused_plan(100, 64 << 10) is None

    fake_device(monkeypatch, mm, 7, 64 << 10)
    mm._no_fused_tile.cache_clear()
    with pytest.warns(FallbackWarning, match=r"GPU 7: 65536 bytes of shared memory per block hold no tile of the "
                                             r"fused quantized GEMM: matmuls of more than 8 tokens run as dequantize"):
        assert mm._mma_plan(100, forced=False) is None
    with pytest.raises(UnsupportedError, match="hold no tile of the fused quantized GEMM"):
        mm._mma_plan(100, forced=True)
    mm._no_fused_tile.cache_clear()
