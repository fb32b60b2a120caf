"""Run-time compilation of the `.cu` files beside this module with NVRTC through CuPy.

Modules are compiled lazily, once per process and device architecture; CuPy caches the binaries
on disk (~/.cupy/kernel_cache), so a second process pays only the load. `compile_options` is the
one list of NVRTC options: the engine's RawModule and the GPU-less check (kernels/check.py) both
use it.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from q4k_engine.gpu import cupy as _cupy  # DeviceError naming why, when CUDA cannot be used

SRC_DIR = Path(__file__).resolve().parent

Defines = tuple[tuple[str, str], ...]


def define_key(defines: Mapping[str, object]) -> Defines:
    """-D defines as a sorted, hashable tuple of (name, value text): one compiled module per key."""
    return tuple(sorted((k, str(v)) for k, v in defines.items()))


def compile_options(arch: str, defines: Mapping[str, object]) -> tuple[str, ...]:
    """The NVRTC options of one module for `arch` (sm_90, sm_90a, compute_90, ...).

    CuPy's RawModule adds its own on top: -ftz=true (listed here too, so that the GPU-less check
    compiles the numerics that run; NVRTC takes it twice), -arch=sm_<device cc> after ours (NVRTC
    keeps the first: a wgmma kernel built for sm_90a still compiles), --device-as-default-execution-space
    (not here: without it the check is stricter, every device function must say __device__), and
    -I of its own headers and of the CUDA toolkit's include directory (cuda_fp16.h, cuda_bf16.h:
    NVRTC 13 has no built-in copies; the check takes them from the nvidia-cuda-runtime wheel).
    """
    return ("-std=c++17", f"--gpu-architecture={arch}", "-ftz=true", f"-I{SRC_DIR}",
            *(f"-D{k}={v}" for k, v in define_key(defines)))


@functools.lru_cache(maxsize=None)
def _arch(device_id: int) -> str:
    return f"sm_{_cupy().cuda.Device(device_id).compute_capability}"


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    return int(_cupy().cuda.Device(device_id).attributes["MultiProcessorCount"])


@functools.lru_cache(maxsize=None)
def _module(name: str, device_id: int, defines: Defines):
    cp = _cupy()
    code = (SRC_DIR / name).read_text()
    return cp.RawModule(code=code, options=compile_options(_arch(device_id), dict(defines)), backend="nvrtc")


def module(name: str, **defines: object):
    """The compiled RawModule of kernels/<name> for the current device."""
    cp = _cupy()
    return _module(name, cp.cuda.Device().id, define_key(defines))


def kernel(module_name: str, func: str, **defines: object):
    return module(module_name, **defines).get_function(func)
