"""CudaBackend: the Backend interface (backend.py) on CuPy, weights kept quantized on the GPU.

Matrices are uploaded once in their stored dtype through kernels/matmul.py (Q4_K stays Q4_K);
the small fused operations are kernels/ops.cu. Activations are float32 CuPy arrays in the packed
varlen layout of backend.Batch.

A decode step can be captured into a CUDA graph (`decode_inputs`, `use_decode_inputs`,
`capture`): its per-step inputs live in static device buffers that the host rewrites in place
before each replay, its intermediates in a memory pool owned by the graph.

Memory is measured, not believed: every CuPy allocation of the process goes through a
high-water-mark wrapper around the default memory pool (CuPy's allocator is process-wide, so the
wrapper is installed once and shared by every CudaBackend), and `memory_report()` adds the
device's own used-memory figure (which includes the CUDA context and cuBLAS workspaces).
"""
from __future__ import annotations

import contextlib
import ctypes
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from . import fp8, gpu
from .backend import Batch
from .binio import UNITS, human_bytes
from .dtypes import SUPPORTED, GGMLType
from .errors import DeviceError, FallbackWarning, InputError, UnsupportedError
from .tensors import ModelFile, QTensor

# Headroom kept free beyond the weights when checking that a model fits: activations of a few
# thousand tokens, the f16 scratch of the matmuls, cuBLAS workspace. Bench figures show what is really used.
DEFAULT_WORKSPACE_BYTES = 1 << 30


def _nvml_free(bus_id: str) -> int | None:
    """Free bytes of the device at PCI `bus_id` as the driver's NVML library reports them, without
    a CUDA context (which cudaMemGetInfo would create, hiding its own cost); None without NVML."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None

    class Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        handle, mem = ctypes.c_void_p(), Memory()
        if nvml.nvmlDeviceGetHandleByPciBusId_v2(bus_id.encode(), ctypes.byref(handle)) != 0:
            return None
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
            return None
        return int(mem.free)
    finally:
        nvml.nvmlShutdown()


class PeakPool:
    """Wraps a CuPy MemoryPool's malloc and records the high-water marks of bytes in use (live
    arrays) and bytes held (in use + cached free blocks: what the device actually gives up).

    It also keeps the device's free memory from before the process's first CudaBackend started
    (`free_at_start`), the baseline of the process's own device memory: CUDA context, cuBLAS
    workspace and pool. NVML measures it before the context exists; without NVML, cudaMemGetInfo
    after the context (`context_counted` False, and the report says so)."""

    def __init__(self, pool, free_at_start: int, nvml_bus_id: str | None):
        self.pool = pool
        self.peak_used = pool.used_bytes()
        self.peak_held = pool.total_bytes()
        self.free_at_start = free_at_start
        self.nvml_bus_id = nvml_bus_id  # the device to ask NVML about; None: ask cudaMemGetInfo

    @property
    def context_counted(self) -> bool:
        return self.nvml_bus_id is not None

    def malloc(self, size: int):
        mem = self.pool.malloc(size)
        used, held = self.pool.used_bytes(), self.pool.total_bytes()
        if used > self.peak_used:
            self.peak_used = used
        if held > self.peak_held:
            self.peak_held = held
        return mem

    def reset(self) -> None:
        self.peak_used = self.pool.used_bytes()
        self.peak_held = self.pool.total_bytes()

    def device_free(self, cp) -> int:
        """Free device memory now, from the same source as `free_at_start`."""
        free = _nvml_free(self.nvml_bus_id) if self.nvml_bus_id is not None else None
        return int(cp.cuda.runtime.memGetInfo()[0]) if free is None else free

    @staticmethod
    def installed(cp) -> "PeakPool | None":
        owner = getattr(cp.cuda.get_allocator(), "__self__", None)
        return owner if isinstance(owner, PeakPool) else None

    @staticmethod
    def install(cp, device: int) -> "PeakPool":
        """The process's tracker: reuse the one already installed, else measure the baseline, make
        `device` current and wrap the default pool. Call before anything else touches the device."""
        current = PeakPool.installed(cp)
        if current is not None:
            cp.cuda.Device(device).use()
            return current
        bus_id = cp.cuda.Device(device).pci_bus_id
        free = _nvml_free(bus_id)  # before use(): that creates the context
        cp.cuda.Device(device).use()
        if free is None:
            bus_id, free = None, int(cp.cuda.runtime.memGetInfo()[0])
        tracker = PeakPool(cp.get_default_memory_pool(), free, bus_id)
        cp.cuda.set_allocator(tracker.malloc)
        return tracker


def check_kernel_limits(model: ModelFile, smem_per_block: int | None = None, device_name: str = "the GPU") -> None:
    """What the GPU kernels cannot run, as one UnsupportedError naming the limit, before anything
    is uploaded (not a launch error at the first forward); and a FallbackWarning for layers whose
    gated MLP cannot take the fused f16 path. Reads the file's shapes and types, and the device's
    opt-in shared memory per block when given (the GPU's own limit)."""
    from q4k_engine.kernels.matmul import FUSED_MAX_M, padded_cols
    from q4k_engine.kernels.ops import MAX_HEAD_DIM, flash_smem_bytes

    c = model.config
    if c.head_dim > MAX_HEAD_DIM:
        raise UnsupportedError(f"{model.path}: head_dim {c.head_dim} is above the GPU attention kernels' limit of "
                               f"{MAX_HEAD_DIM}; device 'cpu' runs it")
    if smem_per_block is not None and flash_smem_bytes(c.head_dim) > smem_per_block:
        raise UnsupportedError(f"{model.path}: head_dim {c.head_dim} needs {flash_smem_bytes(c.head_dim)} bytes of "
                               f"shared memory per block for prefill attention, {device_name} allows "
                               f"{smem_per_block}; device 'cpu' runs it")
    if c.head_dim % 2:
        raise UnsupportedError(f"{model.path}: head_dim {c.head_dim} is odd; the GPU RoPE kernel rotates pairs")
    for t in model.tensors.values():
        if len(t.shape) == 2 and t.dtype not in SUPPORTED:
            raise UnsupportedError(f"{t.name}: GGML type {GGMLType(t.dtype).name} has no GPU kernel")
    unfused, mixed = [], []
    for i in range(c.n_layers):
        gate, up = model.tensors.get(f"blk.{i}.ffn_gate.weight"), model.tensors.get(f"blk.{i}.ffn_up.weight")
        if gate is None or up is None or not len(gate.shape) == len(up.shape) == 2:
            continue
        if padded_cols(gate.dtype, gate.shape[1]) != padded_cols(up.dtype, up.shape[1]):
            unfused.append((i, gate, up))
        elif gate.dtype != up.dtype:
            mixed.append((i, gate, up))
    if unfused:
        i, gate, up = unfused[0]
        warnings.warn(f"{model.path}: in {len(unfused)} of {c.n_layers} layers (first blk.{i}) ffn_gate "
                      f"({GGMLType(gate.dtype).name}) and ffn_up ({GGMLType(up.dtype).name}) rows pad to "
                      f"{padded_cols(gate.dtype, gate.shape[1])} and {padded_cols(up.dtype, up.shape[1])} values: "
                      "their gated MLP runs as two float32 matmuls on the GPU, not the fused f16 path "
                      "(slower, more memory)", FallbackWarning, stacklevel=5)
    if mixed:
        i, gate, up = mixed[0]
        warnings.warn(f"{model.path}: in {len(mixed)} of {c.n_layers} layers (first blk.{i}) ffn_gate "
                      f"({GGMLType(gate.dtype).name}) and ffn_up ({GGMLType(up.dtype).name}) differ in type: "
                      f"up to {FUSED_MAX_M} tokens a forward their gated MLP runs as two fused GEMMs with "
                      "float32 products and a separate activation, not as one launch (slower, more memory)",
                      FallbackWarning, stacklevel=5)


@dataclass(frozen=True)
class Uploaded:
    dtype: str  # the stored GGML type
    stored_bytes: int  # in the file
    device_bytes: int  # what the memory pool grew by while this tensor was uploaded


@dataclass
class UploadReport:
    """What the weights' upload moved, tensor by tensor: measured on the device (the pool's growth
    in bytes in use), beside what the file stores. A quantized weight costs its stored bytes (plus
    the pool's rounding to 512); a vector is held as float32."""

    tensors: dict[str, Uploaded] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_tensors(self) -> int:
        return len(self.tensors)

    @property
    def device_bytes(self) -> int:
        return sum(u.device_bytes for u in self.tensors.values())

    @property
    def stored_bytes(self) -> int:
        return sum(u.stored_bytes for u in self.tensors.values())

    def by_dtype(self) -> dict[str, tuple[int, int]]:
        """Stored type -> (stored bytes, device bytes), largest first."""
        out: dict[str, tuple[int, int]] = {}
        for u in self.tensors.values():
            stored, device = out.get(u.dtype, (0, 0))
            out[u.dtype] = (stored + u.stored_bytes, device + u.device_bytes)
        return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))

    def add(self, t: QTensor, device_bytes: int, seconds: float) -> None:
        self.tensors[t.name] = Uploaded(GGMLType(t.dtype).name, t.nbytes, device_bytes)
        self.seconds += seconds

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {human_bytes(d)}" for k, (_, d) in self.by_dtype().items())
        rate = self.stored_bytes / self.seconds / 1e9 if self.seconds else 0.0
        return (f"uploaded {self.n_tensors} tensors: {human_bytes(self.device_bytes)} on the device ({parts}) "
                f"for {human_bytes(self.stored_bytes)} stored, in {self.seconds:.2f} s ({rate:.1f} GB/s; "
                f"{UNITS})")


@dataclass(frozen=True)
class MemoryReport:
    process_used: int  # drop in the device's free memory since the process's first CudaBackend started
    context_counted: bool  # whether that drop includes the CUDA context (NVML available)
    pool_peak_used: int  # high-water mark of bytes in live CuPy arrays
    pool_peak_held: int  # high-water mark of bytes the pool held (live + cached blocks)
    pool_used: int
    pool_held: int
    device_used: int  # total - free as the driver sees it now (every process on the device)
    device_total: int

    @property
    def process_peak(self) -> int:
        """The process's device memory at the pool's high-water mark: what it holds now besides the
        pool (context, cuBLAS workspace, modules) plus the pool's peak. The pool's cached blocks are
        handed back between phases (release_cached), so `process_used` alone can miss the peak."""
        return self.process_used - self.pool_held + self.pool_peak_held

    def __str__(self) -> str:
        what = "CUDA context, cuBLAS workspace and pool" if self.context_counted else \
            "cuBLAS workspace and pool; the CUDA context is not counted: no NVML to measure before it"
        return (f"process peak {human_bytes(self.process_peak)} of device memory, now "
                f"{human_bytes(self.process_used)} ({what}); pool peak "
                f"{human_bytes(self.pool_peak_held)} held / {human_bytes(self.pool_peak_used)} in arrays, now "
                f"{human_bytes(self.pool_held)} held; device {human_bytes(self.device_used)} used of "
                f"{human_bytes(self.device_total)} ({UNITS})")


@dataclass
class CudaKVCache:
    """Per-layer K and V, float32 [n_seqs * max_len, n_kv_heads, head_dim]; slot b holds rows
    b * max_len ... (b + 1) * max_len - 1."""

    k: list[Any]
    v: list[Any]
    n_seqs: int
    max_len: int


@dataclass
class _DeviceBatch:
    """The device-side copies of one Batch, built once and shared by every layer of a forward."""

    batch: Batch  # held so that the identity check in CudaBackend._device_batch stays sound
    positions: Any
    packed: Any  # ops.SeqLayout over the packed new k/v (None for DecodeInputs: a decode step has a cache)
    cache: CudaKVCache | None = None  # the cache `cached` and `cache_rows` were built for
    cached: Any | None = None  # ops.SeqLayout over the KV cache
    cache_rows: Any | None = None  # [N] destination rows of the new tokens in the cache


@dataclass
class DecodeInputs:
    """The inputs of one decode step (one new token in every slot of a KV cache) at fixed device
    addresses, as a CUDA graph of the step needs them.

    `write` rewrites them in place before each step: one copy from pinned host memory, queued on
    the current stream. `batch` is the host Batch to pass to forward(); it is kept equal to the
    device values.
    """

    batch: Batch
    rows: Any  # device int32 [4, B]: token ids, positions (= the layout's q_pos0), kv_len, cache rows
    staging: np.ndarray  # pinned int32 [4, B], the source of the copy
    slot0: np.ndarray  # [B] first cache row of each slot
    device_batch: _DeviceBatch

    @property
    def ids(self) -> Any:
        return self.rows[0]

    def write(self, ids: np.ndarray, past: np.ndarray) -> None:
        """Token ids [B] at positions `past` [B] (= tokens already in each slot)."""
        s = self.staging
        s[0], s[1], s[2], s[3] = ids, past, past + 1, self.slot0 + past
        self.rows.set(s)
        self.batch.positions[:] = past
        self.batch.past_lens[:] = past


@dataclass
class CapturedGraph:
    """A CUDA graph and the private memory pool of its intermediates: a block freed into the shared
    pool after capture could be handed to other code while replays still write it, so the pool
    lives exactly as long as the graph."""

    graph: Any
    pool: Any

    def launch(self) -> None:
        self.graph.launch()  # on the current stream, after whatever was queued there

    @property
    def nbytes(self) -> int:
        """Device bytes the graph's pool holds (its intermediates)."""
        return int(self.pool.total_bytes())


class CudaBackend:
    """Backend on one CUDA device (CuPy)."""

    name = "cuda"

    def __init__(self, device: int = 0, precision: str = "fp16"):
        # precision "fp8": products of at least fp8.FP8_MIN_ROWS rows (prefill) in e4m3 through
        # cuBLASLt (engine/fp8.py); decode's small products and the LM head stay on the fp16 kernels.
        self.precision = fp8.check_precision(precision)
        cp = gpu.cupy()
        self.tracker = PeakPool.install(cp, device)  # first: its baseline precedes the context
        from q4k_engine.kernels import matmul, ops  # deferred: both use CuPy

        self._cp, self._mm, self._ops = cp, matmul, ops
        self.xp = cp
        self.device = cp.cuda.Device(device)
        self.device_name = cp.cuda.runtime.getDeviceProperties(device)["name"].decode()
        self.upload = UploadReport()
        self._batch_dev: _DeviceBatch | None = None  # the last Batch seen (one forward's worth)
        # (x, its Q4_K mmv operand): written beside x by the kernel that made x (a norm, decode
        # attention) when x has at most 8 rows, and read by the products of x (matmul.MmvOperand).
        self._xq: tuple[Any, Any] | None = None
        if self.precision == "fp8":
            cc = self.device.compute_capability  # "90", "121"
            if int(cc) < 89:
                raise UnsupportedError(f"precision fp8 needs e4m3 tensor cores (compute capability 8.9 or later); "
                                       f"{self.device_name} is {cc[:-1]}.{cc[-1]}")
            from q4k_engine.kernels import cublaslt

            cublaslt.gemm_library()  # DeviceError now, not at the first prefill, when cuBLASLt is missing

    # --- memory -----------------------------------------------------------------------------
    def free_bytes(self) -> int:
        """Bytes a new allocation can get: the driver's free memory plus the pool's cached blocks."""
        free, _ = self._cp.cuda.runtime.memGetInfo()
        return int(free) + int(self.tracker.pool.free_bytes())

    def check_model(self, model: ModelFile) -> None:
        """Before any upload: the model within the kernels' limits (check_kernel_limits), then its
        weights plus a workspace within free memory (check_fits)."""
        check_kernel_limits(model, self._mm.smem_optin(self.device.id), self.device_name)
        self.check_fits(list(model.tensors.values()))

    def check_fits(self, tensors: list[QTensor] | tuple[QTensor, ...], workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> None:
        """Raise DeviceError before any upload when the weights plus a workspace cannot fit."""
        need = sum(t.nbytes for t in tensors) + workspace_bytes
        free = self.free_bytes()
        if need > free:
            raise DeviceError(f"model needs {human_bytes(need)} on {self.device_name} (weights "
                              f"{human_bytes(need - workspace_bytes)} + workspace {human_bytes(workspace_bytes)}) "
                              f"but only {human_bytes(free)} is free")

    def memory_report(self) -> MemoryReport:
        free, total = self._cp.cuda.runtime.memGetInfo()
        tr = self.tracker
        return MemoryReport(tr.free_at_start - tr.device_free(self._cp), tr.context_counted, tr.peak_used,
                            tr.peak_held, tr.pool.used_bytes(), tr.pool.total_bytes(), int(total - free), int(total))

    def reset_peak(self) -> None:
        self.tracker.reset()

    # --- weights ----------------------------------------------------------------------------
    def weight(self, t: QTensor) -> Any:
        free = self.free_bytes()
        if t.nbytes > free:
            raise DeviceError(f"{t.name}: needs {human_bytes(t.nbytes)} on {self.device_name}, "
                              f"only {human_bytes(free)} free")
        if self.precision == "fp8":  # the row scales of its e4m3 form, once (counted with the upload)
            return self._measured_upload(t, lambda: self._mm.with_fp8_scales(self._mm.upload_weight(t)))
        return self._measured_upload(t, lambda: self._mm.upload_weight(t))

    def vector(self, t: QTensor) -> Any:
        from .quants import dequantize

        host = dequantize(t.data, t.dtype, t.shape).astype(np.float32, copy=False).reshape(-1)
        return self._measured_upload(t, lambda: self._cp.asarray(host))

    def _measured_upload(self, t: QTensor, put: Callable[[], Any]) -> Any:
        """put() (which copies t to the device), recorded with the pool's growth in bytes in use."""
        pool = self.tracker.pool
        before, t0 = pool.used_bytes(), time.perf_counter()
        w = put()
        self._cp.cuda.get_current_stream().synchronize()
        self.upload.add(t, pool.used_bytes() - before, time.perf_counter() - t0)
        return w

    # --- data movement ----------------------------------------------------------------------
    def asarray(self, x: np.ndarray) -> Any:
        return self._cp.asarray(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self._cp.asnumpy(x)

    # --- operations -------------------------------------------------------------------------
    def embed(self, w: Any, ids: Any) -> Any:
        return self._mm.gather_rows(w, self._cp.ascontiguousarray(ids, dtype=self._cp.int32))

    def matmul(self, x: Any, w: Any) -> Any:
        # float16 x is glu_matmul's output, taken as is by the fused and cuBLAS paths
        if x.dtype != self._cp.float16:
            x = self._cp.ascontiguousarray(x, dtype=self._cp.float32)
        if fp8.uses_fp8(self.precision, x.shape[0]):
            return self._mm.matmul_fp8(x, w)
        return self._mm.matmul(x, w, xq=self._operand_of(x))

    def _with_operand(self, x: Any, rows: int, cols: int) -> Any:
        """A fresh operand for x [rows, cols] that its producer is about to write, or None (too many
        rows, or rows no Q4_K product could read); remembered with x until the next producer."""
        xq = self._mm.mmv_operand(rows, cols)
        self._xq = None if xq is None else (x, xq)
        return xq

    def _operand_of(self, x: Any) -> Any:
        """The operand written beside x, if x is (a view of all of) the last producer's output. The
        producer's array is held, so its memory cannot have gone to another array meanwhile."""
        s = self._xq
        if s is not None and x.data.ptr == s[0].data.ptr and x.size == s[0].size and x.dtype == s[0].dtype:
            return s[1]
        return None

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def scale(self, x: Any, s: float) -> Any:
        return x * np.float32(s)

    def rmsnorm(self, x: Any, w: Any, eps: float) -> Any:
        if x.ndim != 2:
            return self._ops.rmsnorm(x, w, eps)
        y = self._cp.empty(x.shape, self._cp.float32)
        return self._ops.rmsnorm(x, w, eps, out=y, xq=self._with_operand(y, *x.shape))

    def add_rmsnorm(self, h: Any, d: Any, w: Any, eps: float) -> tuple[Any, Any]:
        if h.ndim != 2:
            return self._ops.add_rmsnorm(h, d, w, eps)
        y = self._cp.empty(h.shape, self._cp.float32)
        return self._ops.add_rmsnorm(h, d, w, eps, out_y=y, xq=self._with_operand(y, *h.shape))

    def qkv_rope(self, q: Any, k: Any, v: Any, batch: Batch, theta: float, neox: bool, pos_scale: float,
                 freq_factors: Any | None, bias: tuple = (None, None, None), norm: tuple | None = None,
                 eps: float = 0.0, cache: CudaKVCache | None = None, layer: int = 0) -> tuple[Any, Any, Any]:
        db = self._device_batch(batch, cache)
        into = cache is not None  # k and v straight into their cache rows
        q, k, v = self._ops.qkv_rope(q, k, v, db.positions, theta, neox, pos_scale, freq_factors, bias=bias,
                                     norm=norm, eps=eps, out=(None, cache.k[layer], cache.v[layer]) if into else None,
                                     kv_rows=db.cache_rows if into else None)
        return (q, None, None) if into else (q, k, v)

    def glu_matmul(self, x: Any, gate: Any, up: Any, act: str) -> Any:
        x = self._cp.ascontiguousarray(x, dtype=self._cp.float32)
        if fp8.uses_fp8(self.precision, x.shape[0]):
            return self._mm.glu_matmul_fp8(x, gate, up, act)
        return self._mm.glu_matmul(x, gate, up, act, xq=self._operand_of(x))

    def attention(self, q: Any, k: Any, v: Any, batch: Batch, scale: float, window: int,
                  cache: CudaKVCache | None, layer: int) -> Any:
        db = self._device_batch(batch, cache)
        if cache is None:
            return self._ops.attention(q, k, v, db.packed, scale, window)
        ck, cv = cache.k[layer], cache.v[layer]
        if k is not None:  # else qkv_rope stored them
            self._ops.kv_write(k, v, ck, cv, db.cache_rows)
        if not db.cached.decode:
            return self._ops.attention(q, ck, cv, db.cached, scale, window)
        # decode: the output projection's operand from split-K's combine kernel
        n, hq, hd = q.shape
        y = self._cp.empty(q.shape, self._cp.float32)
        return self._ops.attention(q, ck, cv, db.cached, scale, window, out=y, xq=self._with_operand(y, n, hq * hd))

    def new_cache(self, n_layers: int, n_seqs: int, max_len: int, n_kv_heads: int, head_dim: int) -> CudaKVCache:
        cp = self._cp
        shape = (n_seqs * max_len, n_kv_heads, head_dim)
        if shape[0] >= 1 << 31:  # the attention kernels index cache rows with int32
            raise InputError(f"KV cache of {n_seqs} x {max_len} tokens has more than 2^31 rows: fewer or shorter sequences")
        need = 2 * n_layers * int(np.prod(shape)) * 4
        free = self.free_bytes()
        if need > free:
            raise DeviceError(f"KV cache of {n_seqs} x {max_len} tokens needs {human_bytes(need)}, "
                              f"only {human_bytes(free)} free")
        return CudaKVCache([cp.zeros(shape, cp.float32) for _ in range(n_layers)],
                           [cp.zeros(shape, cp.float32) for _ in range(n_layers)], n_seqs, max_len)

    # --- logits -----------------------------------------------------------------------------
    def lm_head(self, x: Any, w: Any, dtype=np.float32) -> Any:
        """x [N, hidden] (already normed) -> logits [N, vocab] in `dtype` (float32 or float16).

        One matmul straight into the output: cuBLAS writes float16 logits itself (fp32 sums), so
        no float32 copy of [N, vocab] ever exists for float16 output (the GEMV path of N <= 8
        writes float32 first; at that size it does not matter).
        """
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float16):
            raise InputError(f"logits dtype must be float32 or float16, got {dtype}")
        x = self._cp.ascontiguousarray(x, dtype=self._cp.float32)
        return self._mm.matmul(x, w, out=self._cp.empty((x.shape[0], w.rows), dtype), xq=self._operand_of(x))

    def log_softmax(self, x: Any, temperature: float = 1.0, inplace: bool = False) -> Any:
        # in place: the provider's chunk of logits becomes its log-probs, no second [rows, vocab] buffer
        own = inplace and x.dtype == self._cp.float32 and x.flags.c_contiguous
        return self._ops.log_softmax(x, temperature, out=x if own else None)

    def logsumexp(self, x: Any, temperature: float = 1.0) -> Any:
        return self._ops.logsumexp(x, temperature)

    def release_cached(self) -> None:
        # The pool keeps freed blocks for reuse, but a block serves only requests it can hold: the
        # upload's staging and the layers' activations would otherwise stay held beside the LM
        # head's larger chunk (cudaFree synchronizes the device: once per forward, not per op).
        self.tracker.pool.free_all_blocks()

    def topk_logprobs(self, x: Any, k: int, temperature: float = 1.0, tail: bool = False) -> tuple[Any, Any, Any]:
        return self._ops.topk_logprobs(x, k, temperature, tail)

    def all_finite(self, x: Any) -> bool:
        return self._ops.all_finite(x)

    def argmax(self, x: Any, out: Any | None = None) -> Any:
        return self._ops.argmax(x, out=out)

    # --- CUDA graphs of a decode step -----------------------------------------------------------
    def decode_inputs(self, cache: CudaKVCache) -> DecodeInputs:
        """Static inputs of a decode step over every slot of `cache` (placeholder values until
        `write`), already the current device batch."""
        import cupyx

        cp, b = self._cp, cache.n_seqs
        slot0 = np.arange(b, dtype=np.int64) * cache.max_len
        batch = Batch.from_lengths(np.ones(b, np.int64), past_lens=np.zeros(b, np.int64))
        rows = cp.zeros((4, b), cp.int32)
        # Built with kv_len = the cache length: anything sized from the layout's maximum on the host
        # then covers every step; the per-step q_pos0 and kv_len are rows of the static buffer.
        layout = self._ops.SeqLayout.build(np.arange(b), np.ones(b), np.zeros(b), slot0, np.full(b, cache.max_len))
        layout = replace(layout, q_pos0=rows[1], kv_len=rows[2])
        inputs = DecodeInputs(batch, rows, cupyx.empty_pinned((4, b), np.int32), slot0,
                              _DeviceBatch(batch, rows[1], None, cache, layout, rows[3]))
        self.use_decode_inputs(inputs)
        return inputs

    def use_decode_inputs(self, inputs: DecodeInputs) -> None:
        """Make `inputs` the device copies of `inputs.batch` again (a forward over another batch
        replaces the current one)."""
        self._batch_dev = inputs.device_batch

    def batch_buffers(self, batch: Batch) -> Any:
        """The device copies of `batch` that a forward's kernels read (uploaded if `batch` is not the
        current one): a captured forward holds them for as long as its graph lives."""
        return self._device_batch(batch, None)

    def capture(self, fn: Callable[[], None]) -> CapturedGraph:
        """Record fn() into a CUDA graph without running it. fn must have run once eagerly (kernels
        compiled, handles created) and may read and write only device buffers that outlive the
        graph; host-to-device copies cannot be captured. DeviceError when the capture fails."""
        cp = self._cp
        pool = cp.cuda.MemoryPool()
        stream = cp.cuda.Stream(non_blocking=True)  # capture cannot run on the legacy default stream
        # The operand remembered with x (_xq) never crosses the capture's edges: one from before is
        # not the graph's to read, and one from the graph's pool must not outlive the graph.
        self._xq = None
        try:
            with cp.cuda.using_allocator(pool.malloc), stream:
                stream.begin_capture()
                try:
                    fn()
                except BaseException:
                    with contextlib.suppress(Exception):  # the capture is void; report fn's error
                        stream.end_capture()
                    raise
                graph = stream.end_capture()
        except Exception as e:  # CuPy and the CUDA runtime raise their own types
            raise DeviceError(f"CUDA graph capture failed: {type(e).__name__}: {' '.join(str(e).split())}") from e
        finally:
            self._xq = None
        return CapturedGraph(graph, pool)

    # --- helpers ----------------------------------------------------------------------------
    def _device_batch(self, batch: Batch, cache: CudaKVCache | None) -> _DeviceBatch:
        """Upload a Batch's index arrays once per forward (every layer reuses them)."""
        cp, ops = self._cp, self._ops
        db = self._batch_dev
        cu = np.asarray(batch.cu_seqlens, np.int64)
        lengths = np.diff(cu)
        n_seqs = len(lengths)
        if db is None or db.batch is not batch:
            packed = ops.SeqLayout.build(cu[:-1], lengths, np.zeros(n_seqs), cu[:-1], lengths)
            db = _DeviceBatch(batch, cp.asarray(np.asarray(batch.positions, np.int32)), packed)
            self._batch_dev = db
        if cache is not None and db.cache is not cache:
            past = np.asarray(batch.past_lens, np.int64)
            if n_seqs > cache.n_seqs:
                raise InputError(f"batch has {n_seqs} sequences, the KV cache {cache.n_seqs}")
            total = past + lengths
            if n_seqs and int(total.max()) > cache.max_len:
                raise InputError(f"sequence of {int(total.max())} tokens exceeds the KV cache length {cache.max_len}")
            slot0 = np.arange(n_seqs, dtype=np.int64) * cache.max_len
            dest = np.concatenate([s + p + np.arange(n) for s, p, n in zip(slot0, past, lengths)])
            db.cache, db.cached = cache, ops.SeqLayout.build(cu[:-1], lengths, past, slot0, total)
            db.cache_rows = cp.asarray(dest.astype(np.int32))
        return db
