"""cuBLAS and cuBLASLt through their C APIs (ctypes): the products a CUDA graph may capture.

- `gemm_f16`: the cuBLAS path's f16 product (kernels/matmul.py, M > FUSED_MAX_M), cublasGemmEx on a
  handle of our own with a workspace of our own. CuPy binds GemmEx but refuses any cuBLAS call while
  a stream is captured (NotImplementedError), so a prefill forward through it could not replay from
  a CUDA graph (engine/forward.py ForwardGraphs); with the workspace set, cuBLAS allocates nothing
  inside a capture either.
- `gemm_e4m3`: the FP8 mode's product. CuPy binds cuBLAS but not cuBLASLt, which alone multiplies
  FP8 (compute capability 8.9 and later). Column-major D[n, m] = W8[n, k]^T-view . X8[k, m], i.e.
  row-major y[m, n] = x8 . W8^T, the "TN" layout FP8 requires (both operands K-major); unit
  scales, the caller applies the row scales (kernels/ops.cu fp8_rescale, glu_pair_fp8).

The libraries are the ones the process's CuPy already loaded (by soname), else those cuda-pathfinder
finds in the environment's NVIDIA wheels. Enum values and the heuristic result's layout are those of
cublas_api.h / cublasLt.h (CUDA 12 and 13 alike).
"""
from __future__ import annotations

import ctypes
import functools
import threading

from q4k_engine.errors import DeviceError

from .build import _cupy

_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
_R_32F, _R_16F, _R_8F_E4M3 = 0, 2, 28  # cudaDataType
_GEMM_DEFAULT_TENSOR_OP = 99  # cublasGemmAlgo_t
_DESC_TRANSA, _DESC_TRANSB = 3, 4  # cublasLtMatmulDescAttributes_t
_OP_N, _OP_T = 0, 1
_PREF_MAX_WORKSPACE_BYTES = 1  # cublasLtMatmulPreferenceAttributes_t
# What cuBLAS and cuBLASLt may use beside a product (Hopper's FP8 kernels ask for up to 32 MiB, and
# NVIDIA advises 32 MiB for cuBLAS on Hopper): one buffer a device, for both libraries' products,
# which run in stream order.
WORKSPACE_BYTES = 32 << 20
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


def _load(stem: str, why: str) -> ctypes.CDLL:
    """lib<stem> (cublas, cublasLt): the copy CuPy's cuBLAS loaded into the process, else the wheel's."""
    errors = []
    _cupy().cuda.device.get_cublas_handle()  # loads cuBLAS, and with it its cuBLASLt, into the process
    for name in (f"lib{stem}.so.13", f"lib{stem}.so.12"):
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return ctypes.CDLL(load_nvidia_dynamic_lib(stem).abs_path)
    except Exception as e:  # not installed, or no library where it looked
        raise DeviceError(f"{why} needs {stem}, which could not be loaded "
                          f"({'; '.join(errors)}; cuda-pathfinder: {e})") from None


@functools.lru_cache(maxsize=None)
def _lib():
    lib = _load("cublasLt", "precision fp8")
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


@functools.lru_cache(maxsize=None)
def _blas():
    lib = _load("cublas", "the cuBLAS path's f16 product")
    vp, i = ctypes.c_void_p, ctypes.c_int
    sig = {
        "cublasCreate_v2": [vp],
        "cublasSetStream_v2": [vp, vp],
        "cublasSetWorkspace_v2": [vp, vp, ctypes.c_size_t],
        "cublasGemmEx": [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i],
    }
    for name, args in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.cublasGetStatusString.argtypes, lib.cublasGetStatusString.restype = [ctypes.c_int], ctypes.c_char_p
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise DeviceError(f"cuBLASLt {what}: {_lib().cublasLtGetStatusString(status).decode()} ({status})")


def _check_blas(status: int, what: str) -> None:
    if status != 0:
        raise DeviceError(f"cuBLAS {what}: {_blas().cublasGetStatusString(status).decode()} ({status})")


class _Device:
    """A device's workspace, its cuBLAS and cuBLASLt handles (each made at its first product) and the
    FP8 plans of the shapes multiplied so far."""

    def __init__(self):
        self.workspace = _cupy().empty(WORKSPACE_BYTES, dtype=_cupy().uint8)
        self._lt: ctypes.c_void_p | None = None
        self._blas: ctypes.c_void_p | None = None
        self.blas_stream: int | None = None  # the stream the cuBLAS handle was last set to
        self.plans: dict[tuple[int, int, int, int], tuple] = {}

    @property
    def handle(self) -> ctypes.c_void_p:
        """The cuBLASLt handle."""
        if self._lt is None:
            h = ctypes.c_void_p()
            _check(_lib().cublasLtCreate(ctypes.byref(h)), "create")
            self._lt = h
        return self._lt

    def blas_on(self, stream: int) -> ctypes.c_void_p:
        """The cuBLAS handle (host pointer mode, its default) set to `stream` and to this device's
        workspace: cublasSetStream puts a handle back on cuBLAS's own workspace, which cuBLAS would
        allocate inside a capture."""
        lib = _blas()
        if self._blas is None:
            h = ctypes.c_void_p()
            _check_blas(lib.cublasCreate_v2(ctypes.byref(h)), "create")
            self._blas = h
        if self.blas_stream != stream:
            _check_blas(lib.cublasSetStream_v2(self._blas, stream), "set stream")
            _check_blas(lib.cublasSetWorkspace_v2(self._blas, self.workspace.data.ptr, WORKSPACE_BYTES),
                        "set workspace")
            self.blas_stream = stream
        return self._blas

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


_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def gemm_f16(w16_ptr: int, n: int, x16_ptr: int, m: int, k: int, c_ptr: int, c_f16: bool, ldc: int) -> None:
    """Column-major y^T[n, m] = W16[n, k] . x16^T[k, m]: f16 operands at device addresses w16_ptr
    (row stride k) and x16_ptr (row stride k), fp32 sums, written as f16 (c_f16) or fp32 at c_ptr with
    leading dimension ldc, i.e. row-major y[m, ldc]; on the current stream (capturable)."""
    dev = _device()
    handle = dev.blas_on(_cupy().cuda.get_current_stream().ptr)
    _check_blas(_blas().cublasGemmEx(handle, _OP_T, _OP_N, n, m, k, ctypes.byref(_ONE), w16_ptr, _R_16F, k,
                                     x16_ptr, _R_16F, k, ctypes.byref(_ZERO), c_ptr, _R_16F if c_f16 else _R_32F,
                                     ldc, _COMPUTE_32F, _GEMM_DEFAULT_TENSOR_OP), f"f16 GemmEx {n}x{m}x{k}")
