"""The FP8 mode's GEMM: float8 e4m3 operands, fp32 sums and output, through cuBLASLt.

CuPy binds cuBLAS but not cuBLASLt, which alone multiplies FP8 (compute capability 8.9 and later),
so this calls the library's C API through ctypes: the cuBLASLt that the process's cuBLAS already
loaded (by soname), else the one cuda-pathfinder finds in the environment's NVIDIA wheels. Enum
values and the heuristic result's layout are those of cublasLt.h (CUDA 12 and 13 alike).

One product: column-major D[n, m] = W8[n, k]^T-view . X8[k, m], i.e. row-major y[m, n] = x8 . W8^T,
the "TN" layout FP8 requires (both operands K-major); unit scales, the caller applies the row
scales (kernels/ops.cu fp8_rescale, glu_pair_fp8).
"""
from __future__ import annotations

import ctypes
import functools
import threading

from q4k_engine.errors import DeviceError

from .build import _cupy

_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
_R_32F, _R_8F_E4M3 = 0, 28  # cudaDataType
_DESC_TRANSA, _DESC_TRANSB = 3, 4  # cublasLtMatmulDescAttributes_t
_OP_N, _OP_T = 0, 1
_PREF_MAX_WORKSPACE_BYTES = 1  # cublasLtMatmulPreferenceAttributes_t
WORKSPACE_BYTES = 32 << 20  # what cuBLASLt may use beside a product (Hopper's FP8 kernels ask for up to 32 MiB)
_MAX_PLANS = 512  # products' shapes kept (a prefill's token counts vary); past it, all are freed


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def padded(n: int) -> int:
    """n rounded up to whole 16s: cuBLASLt's FP8 products (CUDA 13, H200) refuse a W of other row
    counts and an output of other leading dimensions ("not supported"), so callers multiply
    padded(n) rows of W (the rows past n are whatever their scratch holds) into an output whose row
    stride is at least that, and keep the first n columns."""
    return -(-n // 16) * 16


def gemm_library() -> None:
    """Load cuBLASLt now (DeviceError naming why it cannot be)."""
    _lib()


@functools.lru_cache(maxsize=None)
def _lib():
    errors = []
    _cupy().cuda.device.get_cublas_handle()  # loads cuBLAS, and with it its cuBLASLt, into the process

    for name in ("libcublasLt.so.13", "libcublasLt.so.12"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        try:
            from cuda.pathfinder import load_nvidia_dynamic_lib

            lib = ctypes.CDLL(load_nvidia_dynamic_lib("cublasLt").abs_path)
        except Exception as e:  # not installed, or no library where it looked
            raise DeviceError(f"precision fp8 needs cuBLASLt, which could not be loaded "
                              f"({'; '.join(errors)}; cuda-pathfinder: {e})") from None
    vp, u64, i64 = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64
    sig = {
        "cublasLtCreate": [vp],
        "cublasLtMatmulDescCreate": [vp, ctypes.c_int, ctypes.c_int],
        "cublasLtMatmulDescSetAttribute": [vp, ctypes.c_int, vp, ctypes.c_size_t],
        "cublasLtMatmulDescDestroy": [vp],
        "cublasLtMatrixLayoutCreate": [vp, ctypes.c_int, u64, u64, i64],
        "cublasLtMatrixLayoutDestroy": [vp],
        "cublasLtMatmulPreferenceCreate": [vp],
        "cublasLtMatmulPreferenceSetAttribute": [vp, ctypes.c_int, vp, ctypes.c_size_t],
        "cublasLtMatmulPreferenceDestroy": [vp],
        "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int, vp, vp],
        "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.c_size_t, vp],
    }
    for name, args in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.cublasLtGetStatusString.argtypes, lib.cublasLtGetStatusString.restype = [ctypes.c_int], ctypes.c_char_p
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise DeviceError(f"cuBLASLt {what}: {_lib().cublasLtGetStatusString(status).decode()} ({status})")


class _Device:
    """A device's cuBLASLt handle, workspace and the plans of the shapes multiplied so far."""

    def __init__(self):
        handle = ctypes.c_void_p()
        _check(_lib().cublasLtCreate(ctypes.byref(handle)), "create")
        self.handle = handle
        self.workspace = _cupy().empty(WORKSPACE_BYTES, dtype=_cupy().uint8)
        self.plans: dict[tuple[int, int, int, int], tuple] = {}

    def plan(self, n: int, m: int, k: int, ldd: int) -> tuple:
        key = (n, m, k, ldd)
        if key not in self.plans:
            if len(self.plans) >= _MAX_PLANS:
                for p in self.plans.values():
                    _free(p)
                self.plans.clear()
            self.plans[key] = _make_plan(self.handle, n, m, k, ldd)
        return self.plans[key]


def _layout(dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
    h = ctypes.c_void_p()
    _check(_lib().cublasLtMatrixLayoutCreate(ctypes.byref(h), dtype, rows, cols, ld), "layout")
    return h


def _make_plan(handle, n: int, m: int, k: int, ldd: int) -> tuple:
    lib = _lib()
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "matmul descriptor")
    for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
        v = ctypes.c_int32(op)
        _check(lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(v), 4), "transpose attribute")
    a, b, d = _layout(_R_8F_E4M3, k, n, k), _layout(_R_8F_E4M3, k, m, k), _layout(_R_32F, n, m, ldd)
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
    ws = ctypes.c_uint64(WORKSPACE_BYTES)
    _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
           "workspace preference")
    heur, count = _Heuristic(), ctypes.c_int(0)
    try:
        _check(lib.cublasLtMatmulAlgoGetHeuristic(handle, desc, a, b, d, d, pref, 1, ctypes.byref(heur),
                                                  ctypes.byref(count)), f"FP8 algorithm for {n}x{m}x{k}")
        if count.value < 1:
            raise DeviceError(f"cuBLASLt has no FP8 (e4m3, fp32 output) algorithm for a {n}x{m}x{k} product")
    except DeviceError:
        _free((desc, a, b, d, None))
        raise
    finally:
        lib.cublasLtMatmulPreferenceDestroy(pref)
    return desc, a, b, d, heur


def _free(plan: tuple) -> None:
    lib = _lib()
    desc, a, b, d, _ = plan
    lib.cublasLtMatmulDescDestroy(desc)
    for h in (a, b, d):
        lib.cublasLtMatrixLayoutDestroy(h)


_devices: dict[int, _Device] = {}
_lock = threading.Lock()


def _device() -> _Device:
    cp = _cupy()
    dev = cp.cuda.runtime.getDevice()
    with _lock:
        if dev not in _devices:
            _devices[dev] = _Device()
        return _devices[dev]


def gemm_e4m3(w8, n: int, x8, m: int, k: int, d_ptr: int, ldd: int) -> None:
    """y[m, n] (fp32, row stride ldd, at device address d_ptr, 16-byte aligned) = x8[m, k] . w8[n, k]^T:
    w8 and x8 C-contiguous uint8 arrays holding e4m3 bytes; n, ldd and k multiples of 16 (padded);
    on the current stream."""
    if n % 16 or ldd % 16 or ldd < n or d_ptr % 16 or k % 16:
        raise ValueError(f"gemm_e4m3: ldd {ldd} for {n} columns, output address {d_ptr:#x}, k {k}")
    cp = _cupy()
    dev = _device()
    desc, a, b, d, heur = dev.plan(n, m, k, ldd)
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
    _check(_lib().cublasLtMatmul(dev.handle, desc, ctypes.byref(alpha), w8.data.ptr, a, x8.data.ptr, b,
                                 ctypes.byref(beta), d_ptr, d, d_ptr, d, ctypes.byref(heur.algo),
                                 dev.workspace.data.ptr, WORKSPACE_BYTES, cp.cuda.get_current_stream().ptr),
           f"FP8 matmul {n}x{m}x{k}")
