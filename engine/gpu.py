"""Can this process use a CUDA GPU, and if not, why: the one probe that every GPU path asks.

The backend, the kernels, the provider's device choice, the test suite's `gpu` marker and the
benchmarks all call `probe()`, so they agree on the answer and a fallback can name its reason.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

from .errors import DeviceError

CUPY_HINT = "pip install 'q4k-engine[cuda13]' or 'q4k-engine[cuda12]'"


@dataclass(frozen=True)
class CudaProbe:
    cupy: ModuleType | None  # the module when a device can be used
    reason: str  # why not ("" when it can)

    @property
    def usable(self) -> bool:
        return self.cupy is not None


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


@functools.lru_cache(maxsize=None)
def probe() -> CudaProbe:
    """CuPy imported and at least one CUDA device seen, or the reason (no CuPy, CuPy broken, no
    driver, no device). Asked once per process: the kernels call it on every launch."""
    try:
        import cupy
    except ImportError:
        return CudaProbe(None, f"CuPy is not installed: {CUPY_HINT}")
    except Exception as e:  # a CuPy wheel for another CUDA version fails here, with its own types
        return CudaProbe(None, f"CuPy failed to import ({_one_line(e)})")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # the CUDA runtime's own error types: no driver, or none of its devices visible
        what = "no CUDA device found" if "NoDevice" in type(e).__name__ + str(e) else "no usable CUDA driver"
        return CudaProbe(None, f"{what} ({_one_line(e)})")
    if n == 0:
        return CudaProbe(None, "no CUDA device found")
    return CudaProbe(cupy, "")


def cupy() -> ModuleType:
    """The CuPy module, or DeviceError naming why CUDA cannot be used."""
    p = probe()
    if p.cupy is None:
        raise DeviceError(p.reason)
    return p.cupy
