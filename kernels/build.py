"""Run-time compilation of the `.cu` files beside this module with NVRTC through CuPy.

Modules are compiled lazily, once per process and device architecture; CuPy caches the binaries
on disk (~/.cupy/kernel_cache), so a second process pays only the load. `compile_options` is the
one list of NVRTC options: the engine's RawModule and the GPU-less check (kernels/check.py) both
use it. `launch` is the one place that launches a kernel as a programmatic dependent (PDL).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from q4k_engine.errors import DeviceError, FallbackWarning
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
    """The device's own target; on Hopper (sm_90) its arch-specific one, sm_90a, which has wgmma (the
    fused GEMM's Hopper kernels). Its cubin runs only on sm_90 devices: the device it is built for."""
    cc = _cupy().cuda.Device(device_id).compute_capability
    return "sm_90a" if cc == "90" else f"sm_{cc}"


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    return int(_cupy().cuda.Device(device_id).attributes["MultiProcessorCount"])


@functools.lru_cache(maxsize=None)
def headers_digest() -> str:
    """sha256 (16 hex digits) of the headers beside the .cu files (kernels/*.cuh)."""
    h = hashlib.sha256()
    for p in sorted(SRC_DIR.glob("*.cuh")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _module(name: str, device_id: int, defines: Defines):
    cp = _cupy()
    # CuPy's disk cache keys a binary on the code and options, not on the files the code includes:
    # the headers' digest in a trailing comment keeps a header change from loading a stale binary.
    code = (SRC_DIR / name).read_text() + f"\n// kernels/*.cuh sha256 {headers_digest()}\n"
    return cp.RawModule(code=code, options=compile_options(_arch(device_id), dict(defines)), backend="nvrtc")


def module(name: str, **defines: object):
    """The compiled RawModule of kernels/<name> for the current device."""
    cp = _cupy()
    return _module(name, cp.cuda.Device().id, define_key(defines))


def kernel(module_name: str, func: str, **defines: object):
    return module(module_name, **defines).get_function(func)


# ---- programmatic dependent launch (PDL) ----------------------------------------------------------
# A kernel launched as a programmatic dependent may start while the kernel before it on the stream
# still runs: its blocks are resident and issue what does not depend on that kernel (the matmuls'
# first weight loads) during the other's tail, and `griddepcontrol.wait` (kernels/pdl.cuh
# pdl_wait) holds them until it has completed and its writes are visible. sm_90 and later; the
# launch goes through the driver's cuLaunchKernelEx (cuda-bindings), which CuPy does not expose.
_PARAM_TYPES = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.float32: ctypes.c_float}
DEPENDENT_LAUNCH = True  # False: every launch plain (bench/bench_decode.py --no-pdl compares the two)


@functools.lru_cache(maxsize=None)
def _pdl_driver(device_id: int):
    """cuda.bindings.driver where kernels on the device can launch as programmatic dependents, else
    None: below sm_90 (no such launch; kernels run one after another as everywhere), or, with a
    warning once, where cuda-bindings is missing."""
    cc = int(_cupy().cuda.Device(device_id).compute_capability)
    if cc < 90:
        return None
    try:
        from cuda.bindings import driver
    except ImportError as e:
        warnings.warn(f"GPU {device_id} (sm_{cc}): CUDA graphs launch the matmul kernels without programmatic "
                      f"dependent launch, each after the previous kernel ends, because cuda-bindings cannot be "
                      f"imported ({e}): pip install 'q4k-engine[cuda13]' (or [cuda12])", FallbackWarning, stacklevel=4)
        return None
    return driver


def dependent_launch_available(device_id: int) -> bool:
    """Whether kernels on the device can launch as programmatic dependents (sm_90+, cuda-bindings)."""
    return _pdl_driver(device_id) is not None


def _param(a):
    cp = _cupy()
    if isinstance(a, cp.ndarray):
        return a.data.ptr, ctypes.c_void_p
    if isinstance(a, np.generic) and type(a) in _PARAM_TYPES:
        return a.item(), _PARAM_TYPES[type(a)]
    raise TypeError(f"kernel argument of type {type(a).__name__}: pass a cupy array, np.int32, np.int64 or np.float32")


def launch(func, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0,
           dependent: bool = False) -> None:
    """func (a CuPy RawKernel) over grid x block on the current stream.

    dependent=True launches it as a programmatic dependent of the kernel before it, where that is
    possible (sm_90 and later, cuda-bindings importable) and worth it: while a CUDA graph is being
    captured (decode replays its step from one). Eager launches stay plain: their gaps are the
    host's, and cuLaunchKernelEx from Python costs more host time than CuPy's launch. Such a kernel
    must call pdl_wait() in every thread before it reads anything an earlier kernel writes (or
    writes anything a later one reads), and before any thread exits."""
    cp = _cupy()
    stream = cp.cuda.get_current_stream()
    drv = None
    if dependent and DEPENDENT_LAUNCH and stream.is_capturing():
        drv = _pdl_driver(cp.cuda.runtime.getDevice())
    if drv is None:
        func(grid, block, args, shared_mem=shared_mem)
        return
    grid, block = (*grid, 1, 1)[:3], (*block, 1, 1)[:3]
    cfg = drv.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = (int(v) for v in grid)
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = (int(v) for v in block)
    cfg.sharedMemBytes = int(shared_mem)
    cfg.hStream = drv.CUstream(stream.ptr)
    attr = drv.CUlaunchAttribute()
    attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    cfg.attrs = [attr]
    cfg.numAttrs = 1
    values, types = zip(*(_param(a) for a in args)) if args else ((), ())
    (err,) = drv.cuLaunchKernelEx(cfg, drv.CUfunction(func.kernel.ptr), (values, types), 0)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise DeviceError(f"cuLaunchKernelEx of {getattr(func, 'name', 'a kernel')} as a programmatic dependent: {err.name}")
