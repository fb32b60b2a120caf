"""The teacher a distillation loop talks to: `q4k_engine.load(path)` -> TeacherModel.

Inputs are batches of token-id sequences of any lengths (a list of lists, or a 2-D integer array
whose rows are sequences). Outputs:

- `logits_for_batch(batch)` -> [B, vocab]: the logits at each sequence's last position
  (aprender's TeacherLogitsProvider contract); the LM head runs on those B rows only.
- `logits_per_position(batch)` -> (logits [B, T_max, vocab], lengths [B]): row t of sequence b
  predicts token t + 1; rows t >= lengths[b] are padding and hold **0.0** (finite on purpose: a
  trainer that computes a loss over the padded block and multiplies by a mask built from
  `lengths` gets exact zeros, where NaN padding would turn the whole loss into NaN).
- `log_softmax(batch, temperature, positions)` and `topk_logprobs(batch, k, temperature,
  positions)`: computed by the backend (on the GPU for the cuda device, never moving [T, vocab]
  to the host); positions="all" pads like `logits_per_position` (log-probs 0.0, indices 0),
  positions="last" gives one row per sequence.

`output` picks the array type: "numpy" (host), "cupy" (device), "torch" (a torch.Tensor through
DLPack, on the GPU without a copy for the cuda device), "dlpack" (the backend's own array,
numpy.ndarray or cupy.ndarray, which any DLPack consumer such as `torch.from_dlpack` or
`jax.dlpack.from_dlpack` takes without a copy). `dtype` is "float32" or "float16" (values; top-k
indices are always int64, lengths int64).
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from . import gpu
from .backend import Backend, Batch
from .backend_cpu import NumpyBackend
from .errors import DeviceError, FallbackWarning, FormatError, InputError, UnsupportedError
from .forward import forward, upload
from .generate import Generation, generate as greedy_generate
from .loader import open_model
from .synthetic import resolve_model
from .tensors import ModelFile
from .tokenizer import TextTokenizer, build_tokenizer
from .verify import verify_model

DEVICES = ("auto", "cpu", "cuda")
OUTPUTS = ("numpy", "cupy", "torch", "dlpack")
DTYPES = {"float32": np.float32, "float16": np.float16}
POSITIONS = ("all", "last")
# Tokens per forward call: sequences are grouped up to this many tokens (a longer sequence runs
# alone). Bounds the activations and the [tokens, vocab] logits of one call.
DEFAULT_MAX_BATCH_TOKENS = 4096


class LogitsProvider(Protocol):
    """What a distillation trainer needs from a teacher (aprender's TeacherLogitsProvider)."""

    @property
    def vocab_size(self) -> int: ...

    def logits_for_batch(self, batch: Sequence[Sequence[int]]) -> Any: ...


# Values per isfinite reduction: bounds its boolean temporary (16 MiB) whatever the size of the logits.
_FINITE_CHUNK_VALUES = 1 << 24


def all_finite(xp: Any, x: Any) -> bool:
    """Whether every value of x is finite: reductions on x's own device, one bool read back."""
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    step = max(1, _FINITE_CHUNK_VALUES // max(rows.shape[1], 1))
    ok = xp.isfinite(rows[:step]).all()
    for start in range(step, rows.shape[0], step):
        ok &= xp.isfinite(rows[start:start + step]).all()
    return bool(ok)


def _check_choice(what: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InputError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _cuda_backend() -> Backend:
    """A CudaBackend, or DeviceError naming why none can be had (no CuPy, no driver, no device,
    the backend failing to import or to start)."""
    gpu.cupy()
    try:
        from .backend_cuda import CudaBackend
    except ImportError as e:
        raise DeviceError(f"the CUDA backend cannot be imported ({e})") from None
    try:
        return CudaBackend()
    except DeviceError:
        raise
    except Exception as e:  # the CUDA runtime's own errors (context creation, out of memory)
        raise DeviceError(f"the CUDA backend failed to start ({type(e).__name__}: {' '.join(str(e).split())})") from e


def make_backend(device: str) -> Backend:
    """"cpu", "cuda" (DeviceError naming why, without CuPy and a GPU), or "auto": cuda when it
    works, else cpu with a FallbackWarning that names the reason."""
    _check_choice("device", device, DEVICES)
    if device == "cpu":
        return NumpyBackend()
    if device == "cuda":
        return _cuda_backend()
    try:
        return _cuda_backend()
    except DeviceError as e:
        warnings.warn(f"device 'auto' runs on the CPU (NumPy backend, much slower): {e}", FallbackWarning,
                      stacklevel=3)
        return NumpyBackend()


def _sequence_ids(i: int, seq: Any, vocab: int) -> np.ndarray:
    """One sequence as int32, or InputError naming sequence i and the offending position."""
    if isinstance(seq, (str, bytes)):
        raise InputError(f"sequence {i} is text, not token ids (encode it first)")
    if hasattr(seq, "__array__") and not isinstance(seq, (list, tuple)):  # numpy, cupy, torch
        try:
            arr = np.asarray(seq)
        except TypeError:  # device arrays refuse implicit copies: cupy's .get(), torch's .cpu()
            arr = np.asarray(seq.get() if hasattr(seq, "get") else seq.cpu())
        if arr.ndim != 1:
            raise InputError(f"sequence {i} must be a flat list of token ids, got shape {arr.shape}")
        values = arr.tolist()
        typed_ok = arr.dtype.kind in "iu"
    else:
        try:
            values = list(seq)
        except TypeError:
            raise InputError(f"sequence {i} must be a list of token ids, got {type(seq).__name__}") from None
        typed_ok = False
    if not values:
        raise InputError(f"sequence {i} is empty")
    if not typed_ok:  # every element must be an integer itself: 3.0 and True are not token ids
        for j, v in enumerate(values):
            if isinstance(v, (list, tuple, np.ndarray)):
                raise InputError(f"sequence {i} must be a flat list of token ids (position {j} is a sequence)")
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise InputError(f"sequence {i}, position {j}: {v!r} is not an integer token id")
    for j, v in enumerate(values):
        if not 0 <= v < vocab:
            raise InputError(f"sequence {i}, position {j}: token id {v} is outside [0, {vocab})")
    return np.array(values, dtype=np.int32)


class TeacherModel:
    """A frozen teacher: one model file, one backend, weights uploaded once in their stored dtype."""

    def __init__(self, model: ModelFile, backend: Backend, *, output: str = "numpy", dtype: str = "float32",
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        self.model = model
        self.config = model.config
        self.backend = backend
        self.output = _check_choice("output", output, OUTPUTS)
        self.dtype = _check_choice("dtype", dtype, tuple(DTYPES))
        if max_batch_tokens < 1:
            raise InputError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        backend.check_model(model)  # before any upload: one clear error, nothing half-loaded
        self.weights = upload(model, backend)

    def __repr__(self) -> str:
        c = self.config
        return (f"TeacherModel({self.model.path.name}, arch={c.arch}, layers={c.n_layers}, hidden={c.hidden}, "
                f"vocab={c.vocab_size}, device={self.device})")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> str:
        return self.backend.name

    # --- text ------------------------------------------------------------------------------------
    @functools.cached_property
    def tokenizer(self) -> TextTokenizer:
        if self.model.tokenizer is None:
            raise UnsupportedError(f"{self.model.path}: the model file carries no tokenizer; pass token ids")
        return build_tokenizer(self.model.tokenizer, self.config.arch)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS is prepended when the model file asks for it (add_bos=None)."""
        return self.tokenizer.encode(text, add_bos)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special)

    @functools.cached_property
    def chat_template(self) -> Any:
        """The model file's chat template, compiled (distill.chat.ChatTemplate); InputError without one."""
        from .distill.chat import model_chat_template

        return model_chat_template(self.model)

    def apply_chat_template(self, messages: Sequence[Any], add_generation_prompt: bool = False,
                            tokenize: bool = True, *, chat_template: str | None = None,
                            **kwargs: Any) -> list[int] | str:
        """One conversation ([{"role", "content"}, ...]) rendered with the model's own chat template
        (or `chat_template`, a template's source), as transformers'
        `tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=...)` renders it:
        token ids (no BOS is added; the template writes it) or, with tokenize=False, the text. Extra
        keywords are template variables. InputError when there is no template or it refuses the
        conversation."""
        from .distill.chat import check_messages, encode_chat, model_chat_template

        template = self.chat_template if chat_template is None else model_chat_template(self.model, chat_template)
        msgs = check_messages(messages)
        if not tokenize:
            return template.render(msgs, add_generation_prompt=add_generation_prompt, **kwargs).text
        ids, _ = encode_chat(template, self.tokenizer, msgs, add_generation_prompt=add_generation_prompt, **kwargs)
        return ids

    # --- logits ----------------------------------------------------------------------------------
    def logits_for_batch(self, batch: Sequence[Sequence[int]], *, output: str | None = None,
                         dtype: str | None = None) -> Any:
        """Last-position logits [B, vocab]."""
        (x,) = self._compute(self.validate(batch), True, dtype=self._dtype(dtype))
        return self._emit(x, output, dtype)

    def logits_per_position(self, batch: Sequence[Sequence[int]], *, output: str | None = None,
                            dtype: str | None = None) -> tuple[Any, Any]:
        """(logits [B, T_max, vocab], lengths [B]); padded rows are 0.0."""
        seqs = self.validate(batch)
        (x,) = self._compute(seqs, False, dtype=self._dtype(dtype))
        return self._emit(x, output, dtype), self._emit_ints(np.array([len(s) for s in seqs], np.int64), output)

    def log_softmax(self, batch: Sequence[Sequence[int]], temperature: float = 1.0, positions: str = "all", *,
                    output: str | None = None, dtype: str | None = None) -> Any:
        """log_softmax(logits / temperature): [B, T_max, vocab] (padded rows 0.0) or [B, vocab]."""
        t = self._temperature(temperature)
        last = _check_choice("positions", positions, POSITIONS) == "last"
        (x,) = self._compute(self.validate(batch), last, lambda z: (self.backend.log_softmax(z, t),))
        return self._emit(x, output, dtype)

    def topk_logprobs(self, batch: Sequence[Sequence[int]], k: int, temperature: float = 1.0, positions: str = "all",
                      *, output: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
        """(values, indices) of the k most likely next tokens under log_softmax(logits / temperature),
        descending (ties to the lower id): [B, T_max, k] (padded rows: values 0.0, indices 0) or [B, k]."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.vocab_size:
            raise InputError(f"k must be an integer in [1, {self.vocab_size}], got {k!r}")
        t = self._temperature(temperature)
        last = _check_choice("positions", positions, POSITIONS) == "last"
        be = self.backend
        vals, idx = self._compute(self.validate(batch), last, lambda z: be.topk(be.log_softmax(z, t), int(k)))
        return self._emit(vals, output, dtype), self._emit_ints(idx.astype(be.xp.int64), output)

    # --- generation ------------------------------------------------------------------------------
    def generate(self, batch: Sequence[Sequence[int]], max_new_tokens: int, *, ignore_eos: bool = False,
                 use_graph: bool = True) -> Generation:
        """Greedy continuation of each sequence with a KV cache (engine/generate.py): `.tokens` holds
        the new ids of each, which stops after max_new_tokens or at the model's EOS token (unless
        ignore_eos). On the cuda device decode steps replay a CUDA graph unless use_graph=False."""
        spec = self.model.tokenizer
        eos = None if ignore_eos or spec is None else spec.eos_id
        return greedy_generate(self.config, self.weights, self.backend, self.validate(batch), max_new_tokens,
                               eos_id=eos, use_graph=use_graph)

    # --- validation ------------------------------------------------------------------------------
    def validate(self, batch: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """The batch as int32 arrays; InputError names the sequence and position of a bad id."""
        if isinstance(batch, (str, bytes)):
            raise InputError("batch is text, not token ids (encode it first)")
        if isinstance(batch, np.ndarray) and batch.ndim == 1 and batch.dtype != object:
            raise InputError("batch must be a list of sequences (got one flat array: wrap it in a list)")
        try:
            seqs = list(batch)
        except TypeError:
            raise InputError(f"batch must be a list of token-id sequences, got {type(batch).__name__}") from None
        if not seqs:
            raise InputError("batch is empty: pass at least one sequence")
        return [_sequence_ids(i, s, self.vocab_size) for i, s in enumerate(seqs)]

    @staticmethod
    def _temperature(t: float) -> float:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise InputError(f"temperature must be a positive number, got {t!r}")
        return float(t)

    # --- running ---------------------------------------------------------------------------------
    def _groups(self, seqs: list[np.ndarray]) -> Iterator[list[int]]:
        """Consecutive sequences packed up to max_batch_tokens per forward."""
        group: list[int] = []
        tokens = 0
        for i, s in enumerate(seqs):
            if group and tokens + len(s) > self.max_batch_tokens:
                yield group
                group, tokens = [], 0
            group.append(i)
            tokens += len(s)
        if group:
            yield group

    def _compute(self, seqs: list[np.ndarray], last_only: bool, reduce: Callable[[Any], tuple] = lambda z: (z,),
                 dtype: Any = np.float32) -> tuple[Any, ...]:
        """reduce(logits) of every sequence, forward by forward; reduce maps logits rows to a tuple
        of arrays with the same rows. last_only: each array [B, ...]; else zero-padded [B, T_max, ...]."""
        xp = self.backend.xp
        t_max = max(len(s) for s in seqs)
        groups = list(self._groups(seqs))
        parts: list[tuple] = []
        padded: list[Any] | None = None
        for g in groups:
            chunk = [seqs[i] for i in g]
            lengths = [len(c) for c in chunk]
            with np.errstate(over="ignore", invalid="ignore"):  # no NumPy warnings: NaN/Inf are refused in one line
                logits = forward(self.config, self.weights, self.backend, np.concatenate(chunk),
                                 Batch.from_lengths(lengths), last_only=last_only, dtype=dtype)
                self._refuse_nonfinite(logits, "logits", g, lengths, last_only)  # before a reduction sees NaN
                ys = reduce(logits)
            for y in ys:
                if y is not logits:
                    self._refuse_nonfinite(y, "log-probs", g, lengths, last_only)
            del logits
            if last_only:
                parts.append(ys)
                continue
            if len(groups) == 1 and all(len(c) == t_max for c in chunk):
                # One forward of equal lengths: the packed rows already are [B, T, ...], no padded copy
                # (for a 7B teacher at 2048 tokens that copy would be another 600 MB of fp16 logits).
                return tuple(y.reshape((len(seqs), t_max) + y.shape[1:]) for y in ys)
            if padded is None:
                padded = [xp.zeros((len(seqs), t_max) + y.shape[1:], y.dtype) for y in ys]
            start = 0
            for i, c in zip(g, chunk):
                for out, y in zip(padded, ys):
                    out[i, :len(c)] = y[start:start + len(c)]
                start += len(c)
        if last_only:
            return tuple(xp.concatenate(col, axis=0) for col in zip(*parts))
        return tuple(padded)

    def _refuse_nonfinite(self, y: Any, what: str, seq_ids: list[int], lengths: list[int], last_only: bool) -> None:
        """NaN/Inf never reach a caller (a trainer would learn from them). `y` holds one forward's
        rows, one per sequence (last_only) or packed per token; it is checked on the device, and
        the sequence and position are looked for only when a value is bad."""
        xp = self.backend.xp
        if y.dtype.kind != "f" or all_finite(xp, y):
            return
        bad = self.backend.to_numpy(xp.flatnonzero(~xp.isfinite(y.reshape(y.shape[0], -1)).all(axis=1)))
        first = int(bad[0])
        if last_only:
            seq, pos = first, lengths[first] - 1
        else:
            ends = np.cumsum(lengths)
            seq = int(np.searchsorted(ends, first, side="right"))
            pos = first - int(ends[seq] - lengths[seq])
        at = f"sequence {seq_ids[seq]}, position {pos}" + (f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else "")
        path = self.model.path
        if what == "logits":
            raise FormatError(f"{path}: the model computed non-finite logits (NaN or Inf) at {at}: the file may be "
                              f"corrupt; check it with `q4k-engine verify {path}`")
        raise InputError(f"{path}: {what} at {at} are not finite although the logits are (is the temperature too small?)")

    # --- output ----------------------------------------------------------------------------------
    def _dtype(self, dtype: str | None) -> Any:
        return DTYPES[_check_choice("dtype", dtype or self.dtype, tuple(DTYPES))]

    def _emit(self, x: Any, output: str | None, dtype: str | None) -> Any:
        return self._convert(x.astype(self._dtype(dtype), copy=False), output)

    def _emit_ints(self, x: Any, output: str | None) -> Any:
        return self._convert(self.backend.xp.asarray(x), output)

    def _convert(self, x: Any, output: str | None) -> Any:
        kind = _check_choice("output", output or self.output, OUTPUTS)
        if kind == "numpy":
            return self.backend.to_numpy(x)
        if kind == "dlpack":
            return x
        if kind == "cupy":
            try:
                import cupy
            except ImportError:
                raise DeviceError("output='cupy' needs CuPy installed") from None
            return x if self.backend.xp is cupy else cupy.asarray(x)
        try:
            import torch
        except ImportError:
            raise UnsupportedError("output='torch' needs PyTorch installed") from None
        return torch.from_dlpack(x) if self.backend.xp is not np else torch.from_numpy(np.ascontiguousarray(x))


def load(path: str | Path, device: str = "auto", *, output: str = "numpy", dtype: str = "float32",
         max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, verify: bool = False) -> TeacherModel:
    """Open a .gguf/.apr file (or "demo", the synthetic demo model) as a teacher on `device`.

    device: "cpu" (NumPy reference), "cuda" (CuPy; DeviceError without CuPy and a GPU), or "auto"
    (cuda when CuPy, a GPU and the CUDA backend all work, else cpu with a FallbackWarning naming
    why). `output` and `dtype` are the defaults of every call; each call may override them.
    verify=True first reads the whole file (engine/verify.py: the APR footer CRC, every tensor
    decodes to finite values) and raises a FormatError naming the first failure; it costs a full
    read and decode on the CPU.
    """
    model = open_model(resolve_model(path))
    if verify:
        verify_model(model).raise_if_failed()
    return TeacherModel(model, make_backend(device), output=output, dtype=dtype, max_batch_tokens=max_batch_tokens)
