"""Compile the kernels with NVRTC without a GPU: what CI and a developer without the lent machine
can check before GPU time (tests/test_kernels_compile.py; `python -m q4k_engine.kernels.check`).

The options are build.compile_options, the ones the engine's RawModule uses; the define sets are
those the engine compiles (`engine_variants`). NVRTC comes from the `nvrtc` extra: cuda-bindings
(its Python API), nvidia-cuda-nvrtc (the library, 13.0 like the GPU machine's CuPy) and
nvidia-cuda-runtime (cuda_fp16.h and cuda_bf16.h, which CuPy takes from the toolkit's include
directory). A cubin target (sm_XX) runs ptxas too, so inline PTX (mma.sync, wgmma) and register
limits are checked, not only the C++.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click

from q4k_engine.dtypes import SUPPORTED
from q4k_engine.errors import InputError, Q4KError

from . import matmul, ops
from .build import SRC_DIR, Defines, compile_options, define_key

# A100, H100/H200, GB10 (Grace Blackwell): the targets the engine is run on. Hopper compiles sm_90a
# (kernels/build.py), the only target of the wgmma kernels. sm_90a compiles all that plain sm_90
# would (__CUDA_ARCH__ 900) and the wgmma kernels besides, so sm_90 is not checked apart: it took
# ~100 s of CI's ~15 min.
CHECK_ARCHS = ("sm_80", "sm_90a", "sm_121")
# Attention head dims: each prefill tiling ops._flash_tiles picks, Q fragments in registers (64) or
# not, and 90 for the HEAD_DIM % 4 != 0 branches of ops.cu (64, 128, 256: SmolLM2, Llama/Qwen2, Gemma 3).
CHECK_HEAD_DIMS = (64, 90, 128, 256)
NVRTC_HINT = "pip install 'q4k-engine[nvrtc]'"


class NvrtcUnavailable(Q4KError):
    """NVRTC or the CUDA headers cannot be loaded here (the message says which and how to install)."""


class CompileFailed(Q4KError):
    """NVRTC refused a module; `log` is its full output."""

    def __init__(self, what: str, log: str):
        super().__init__(f"{what}: NVRTC failed")
        self.log = log


@dataclass(frozen=True)
class Variant:
    """One module the engine compiles: a .cu file and its -D defines."""

    source: Path
    defines: Defines = ()

    def label(self, arch: str) -> str:
        return " ".join([self.source.name, *(f"-D{k}={v}" for k, v in self.defines), f"[{arch}]"])


def engine_variants() -> list[Variant]:
    """Every (module, defines) the engine compiles: matmul.cu once per supported GGML type, ops.cu
    plain (norms, rope, glu, top-k) and with each attention define set for CHECK_HEAD_DIMS."""
    out = [Variant(SRC_DIR / "matmul.cu", define_key(matmul.module_defines(t))) for t in sorted(SUPPORTED)]
    out.append(Variant(SRC_DIR / "ops.cu"))
    out += [Variant(SRC_DIR / "ops.cu", define_key(d)) for h in CHECK_HEAD_DIMS for d in ops.attention_defines(h)]
    return out


@functools.lru_cache(maxsize=1)  # a failure raises, and is not cached
def _nvrtc():
    """cuda.bindings.nvrtc and the directory of the CUDA headers, or NvrtcUnavailable saying why."""
    try:
        from cuda.bindings import nvrtc
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError as e:
        raise NvrtcUnavailable(f"cuda-bindings is not installed ({e}): {NVRTC_HINT}") from None
    try:
        err, *_ = nvrtc.nvrtcVersion()
    except Exception as e:  # the binding raises its own types when libnvrtc cannot be found or loaded
        raise NvrtcUnavailable(f"libnvrtc cannot be loaded ({type(e).__name__}: {e}): {NVRTC_HINT}") from None
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise NvrtcUnavailable(f"nvrtcVersion failed ({err.name}): {NVRTC_HINT}")
    include = find_nvidia_header_directory("cudart")
    if include is None:
        raise NvrtcUnavailable(f"the CUDA runtime headers (cuda_fp16.h) are not installed: {NVRTC_HINT}")
    return nvrtc, include


def nvrtc_version() -> tuple[int, int]:
    nvrtc, _ = _nvrtc()
    _, major, minor = nvrtc.nvrtcVersion()
    return major, minor


def compile_source(source: Path, defines: Defines, arch: str) -> tuple[bytes, str]:
    """(cubin for an sm_XX arch, PTX for compute_XX; NVRTC's log) of one .cu file, or CompileFailed
    carrying the log. Headers resolve against kernels/ (compile_options), the file's own directory
    and the CUDA headers."""
    nvrtc, include = _nvrtc()
    try:
        code = source.read_bytes()
    except OSError as e:
        raise InputError(f"{source}: cannot read ({e.strerror})") from None
    opts = [o.encode() for o in (*compile_options(arch, dict(defines)), f"-I{source.resolve().parent}", f"-I{include}")]
    err, prog = nvrtc.nvrtcCreateProgram(code, source.name.encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileFailed(str(source), f"nvrtcCreateProgram: {err.name}")
    try:
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        log_text = log.rstrip(b"\0").decode(errors="replace").strip()
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileFailed(Variant(source, defines).label(arch), f"{status.name}\n{log_text}")
        cubin = arch.startswith("sm_")
        _, size = (nvrtc.nvrtcGetCUBINSize if cubin else nvrtc.nvrtcGetPTXSize)(prog)
        out = b" " * size
        (nvrtc.nvrtcGetCUBIN if cubin else nvrtc.nvrtcGetPTX)(prog, out)
        return out, log_text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@dataclass(frozen=True)
class Result:
    label: str
    ok: bool
    size: int  # bytes of cubin/PTX (0 on failure)
    log: str


def check(variants: Iterable[Variant], archs: Iterable[str], workers: int = 0) -> list[Result]:
    """Compile every variant for every arch (in threads: NVRTC releases the GIL), failures included."""
    _nvrtc()  # NvrtcUnavailable once, before any work
    jobs = [(v, a) for a in archs for v in variants]

    def one(job: tuple[Variant, str]) -> Result:
        v, arch = job
        try:
            binary, log = compile_source(v.source, v.defines, arch)
        except CompileFailed as e:
            return Result(v.label(arch), False, 0, e.log)
        return Result(v.label(arch), True, len(binary), log)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(one, jobs))


def _parse_define(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not name.isidentifier():
        raise InputError(f"-D {text!r}: expected NAME=VALUE (or NAME)")
    return name, value if eq else "1"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("-D", "defines", multiple=True, metavar="NAME=VALUE", help="A define for FILES (repeatable).")
@click.option("--arch", "archs", multiple=True, metavar="ARCH",
              help="Target (repeatable): sm_90 (default), sm_90a, sm_121, compute_90 (PTX only) ...")
@click.option("--all-archs", is_flag=True, help=f"Every target the engine is checked for: {', '.join(CHECK_ARCHS)}.")
def main(files: tuple[Path, ...], defines: tuple[str, ...], archs: tuple[str, ...], all_archs: bool) -> None:
    """Compile .cu FILES with NVRTC, no GPU needed: the engine's options, plus each -D. Without
    FILES, every module and define set the engine compiles. Exit 0 if all compile, 1 if one fails
    (NVRTC's log printed), 2 on bad input or when NVRTC cannot be loaded."""
    try:
        if files:
            key = tuple(sorted(_parse_define(d) for d in defines))
            for f in files:
                if not f.is_file():
                    raise InputError(f"{f}: no such file")
            variants = [Variant(f, key) for f in files]
        elif defines:
            raise InputError("-D needs FILES (the engine's own define sets are used without them)")
        else:
            variants = engine_variants()
        targets = CHECK_ARCHS if all_archs else (archs or ("sm_90",))
        major, minor = nvrtc_version()
        results = check(variants, targets)
    except Q4KError as e:
        click.echo(f"kernels.check: error: {e}", err=True)
        sys.exit(2)
    click.echo(f"NVRTC {major}.{minor}")
    for r in results:
        click.echo(f"{'ok  ' if r.ok else 'FAIL'} {r.label}" + (f"  ({r.size} bytes)" if r.ok else ""))
        if r.log:
            click.echo("\n".join("    " + line for line in r.log.splitlines()))
    failed = sum(not r.ok for r in results)
    click.echo(f"{len(results) - failed} compiled, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
