"""Run-time compilation of the `.cu` files beside this module with NVRTC through CuPy.

Modules are compiled lazily, once per process and device architecture; CuPy caches the binaries
on disk (~/.cupy/kernel_cache), so a second process pays only the load.
"""
from __future__ import annotations

import functools
from pathlib import Path

from q4k_engine.gpu import cupy as _cupy  # DeviceError naming why, when CUDA cannot be used

SRC_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _arch(device_id: int) -> str:
    return f"sm_{_cupy().cuda.Device(device_id).compute_capability}"


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    return int(_cupy().cuda.Device(device_id).attributes["MultiProcessorCount"])


@functools.lru_cache(maxsize=None)
def _module(name: str, device_id: int, defines: tuple[tuple[str, str], ...]):
    cp = _cupy()
    code = (SRC_DIR / name).read_text()
    opts = ["-std=c++17", f"--gpu-architecture={_arch(device_id)}", f"-I{SRC_DIR}"]
    opts += [f"-D{k}={v}" for k, v in defines]
    return cp.RawModule(code=code, options=tuple(opts), backend="nvrtc")


def module(name: str, **defines: object):
    """The compiled RawModule of kernels/<name> for the current device."""
    cp = _cupy()
    return _module(name, cp.cuda.Device().id, tuple(sorted((k, str(v)) for k, v in defines.items())))


def kernel(module_name: str, func: str, **defines: object):
    return module(module_name, **defines).get_function(func)
