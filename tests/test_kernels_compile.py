"""Every CUDA module the engine compiles, compiled with NVRTC here (no GPU) for each target GPU, with
the engine's own options (kernels/build.compile_options) and define sets (kernels/check.engine_variants).

The compiling tests are skipped, with the reason, only when NVRTC cannot be loaded (the `nvrtc`
extra, part of `test`)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from q4k_engine.dtypes import SUPPORTED
from q4k_engine.kernels import build, check

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = sorted((ROOT / "kernels").glob("*.cu")) + sorted((ROOT / "kernels").glob("*.cuh"))

try:
    NVRTC_VERSION, NO_NVRTC = check.nvrtc_version(), ""
except check.NvrtcUnavailable as e:
    NVRTC_VERSION, NO_NVRTC = None, f"NVRTC cannot be loaded: {e}"
needs_nvrtc = pytest.mark.skipif(bool(NO_NVRTC), reason=NO_NVRTC)


@needs_nvrtc
@pytest.mark.parametrize("arch", check.CHECK_ARCHS)
def test_every_engine_module_compiles(arch):
    results = check.check(check.engine_variants(), [arch])
    failed = [r for r in results if not r.ok]
    logs = "\n\n".join(f"{r.label}\n{r.log}" for r in failed)
    print(f"NVRTC {NVRTC_VERSION}: {len(results)} modules for {arch}")
    assert not failed, f"{len(failed)} of {len(results)} modules failed to compile:\n{logs}"
    assert all(r.size > 0 for r in results)


def test_variants_are_what_the_engine_compiles():
    variants = check.engine_variants()
    # Every .cu file beside the kernels is compiled by the engine, and so checked.
    assert {v.source.name for v in variants} == {p.name for p in KERNEL_SOURCES if p.suffix == ".cu"}
    # matmul.cu once per GGML type the GPU matmul takes.
    qtypes = {dict(v.defines)["QTYPE"] for v in variants if v.source.name == "matmul.cu"}
    assert qtypes == {str(int(t)) for t in SUPPORTED}
    # ops.cu plain, and both attention define sets (decode, prefill tiling) for every checked head dim.
    ops_sets = [dict(v.defines) for v in variants if v.source.name == "ops.cu"]
    assert {} in ops_sets
    for d in check.CHECK_HEAD_DIMS:
        with_d = [s for s in ops_sets if s.get("HEAD_DIM") == str(d)]
        assert len(with_d) == 2 and sum("FA_WARPS" in s for s in with_d) == 1, with_d
    # Every module name the launchers ask build for is one of the checked files.
    launched = set()
    for p in sorted((ROOT / "kernels").glob("*.py")):
        launched |= set(re.findall(r'(?:kernel|module)\("(\w+\.cu)"', p.read_text()))
    assert launched and launched <= {v.source.name for v in variants}, launched


def test_wgmma_is_checked_for_sm90a():
    # wgmma exists only on sm_90a: a kernel that uses it must be compiled for that target too.
    uses_wgmma = [p.name for p in KERNEL_SOURCES if "wgmma" in p.read_text()]
    assert not uses_wgmma or "sm_90a" in check.CHECK_ARCHS, uses_wgmma


def test_engine_and_check_share_the_options(monkeypatch):
    # The engine's RawModule gets exactly compile_options(device arch, defines), which the check uses.
    seen = {}

    class FakeDevice:
        id = 0
        compute_capability = "90"

        def __init__(self, *_):
            pass

    class FakeCupy:
        class cuda:
            Device = FakeDevice

        @staticmethod
        def RawModule(code, options, backend):
            seen.update(code=code, options=options, backend=backend)
            return "module"

    monkeypatch.setattr(build, "_cupy", lambda: FakeCupy)
    build._arch.cache_clear()
    build._module.cache_clear()
    try:
        assert build.module("ops.cu", HEAD_DIM=64, FA_BK=32) == "module"
    finally:
        build._arch.cache_clear()
        build._module.cache_clear()
    # the file's own text, then a comment with the headers' digest (CuPy's disk cache keys on the code)
    source = (ROOT / "kernels/ops.cu").read_text()
    assert seen["backend"] == "nvrtc" and seen["code"].startswith(source)
    assert seen["code"][len(source):] == f"\n// kernels/*.cuh sha256 {build.headers_digest()}\n"
    # Hopper (sm_90) compiles its arch-specific target, which has wgmma (the fused GEMM's kernels there).
    assert seen["options"] == build.compile_options("sm_90a", {"FA_BK": 32, "HEAD_DIM": 64})
    assert {"-std=c++17", "--gpu-architecture=sm_90a", "-ftz=true", "-DHEAD_DIM=64", "-DFA_BK=32"} <= set(seen["options"])


@needs_nvrtc
def test_a_compile_error_comes_with_nvrtc_log(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text('#include "quant_decode.cuh"\n\nextern "C" __global__ void k(float* y) { y[0] = not_declared; }\n')
    with pytest.raises(check.CompileFailed) as e:
        check.compile_source(bad, (), "sm_90")
    assert "bad.cu(3)" in e.value.log and "not_declared" in e.value.log
    # The defines matter: matmul.cu refuses to compile without a QTYPE.
    with pytest.raises(check.CompileFailed) as e:
        check.compile_source(build.SRC_DIR / "matmul.cu", (), "sm_90")
    assert "QTYPE" in e.value.log


@needs_nvrtc
def test_cli_one_file(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(check.main, ["kernels/ops.cu", "-D", "HEAD_DIM=64", "--arch", "compute_90"])
    assert ok.exit_code == 0, ok.output
    assert "ok   ops.cu -DHEAD_DIM=64 [compute_90]" in ok.output and "1 compiled, 0 failed" in ok.output
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void k() { asm volatile("wgmma.fence.sync.aligned;"); }\n')
    failed = runner.invoke(check.main, [str(bad)])  # sm_90 by default: wgmma needs sm_90a
    assert failed.exit_code == 1 and "FAIL bad.cu [sm_90]" in failed.output and "wgmma" in failed.output
    assert runner.invoke(check.main, [str(bad), "--arch", "sm_90a"]).exit_code == 0
    for args, fragment in (([str(tmp_path / "nope.cu")], "no such file"), (["kernels/ops.cu", "-D", "1x=2"], "1x=2"),
                           (["-D", "A=1"], "-D needs FILES")):
        r = runner.invoke(check.main, args)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("kernels.check: error: "), r.stderr
        assert fragment in lines[0]


def test_header_digest_covers_every_header(tmp_path, monkeypatch):
    """CuPy's disk cache keys a binary on the code string: the digest build appends to it must change
    with any kernels/*.cuh (a header edit would otherwise load a stale binary)."""
    for p in KERNEL_SOURCES:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(build, "SRC_DIR", tmp_path)
    build.headers_digest.cache_clear()
    try:
        before = build.headers_digest()
        headers = sorted(tmp_path.glob("*.cuh"))
        assert len(headers) >= 4
        for h in headers:
            h.write_text(h.read_text() + "\n")
            build.headers_digest.cache_clear()
            after = build.headers_digest()
            assert after != before, h.name
            before = after
    finally:
        build.headers_digest.cache_clear()
