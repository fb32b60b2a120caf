"""The teacher a distillation loop talks to: `q4k_engine.load(path)` -> TeacherModel.

Inputs are batches of token-id sequences of any lengths (a list of lists, or a 2-D integer array
whose rows are sequences). Row t of a sequence's output predicts token t + 1. Outputs:

- `logits_for_batch(batch)` -> [B, vocab]: the logits at each sequence's last position
  (aprender's TeacherLogitsProvider contract); the LM head runs on those B rows only.
- `logits_per_position(batch)` -> PerPosition(values [B, T_max, vocab], lengths [B]): rows
  t >= lengths[b] are padding and hold **0.0** (finite on purpose: a trainer that computes a loss
  over the padded block and multiplies by a mask built from `lengths` gets exact zeros).
- `log_softmax(batch, temperature, positions)` -> PerPosition and `topk_logprobs(batch, k,
  temperature, positions, tail=...)` -> TopK: log-probs normalised over the FULL vocabulary of
  logits / temperature (or over the first `vocab_size` tokens when a student's smaller vocabulary
  crops it), computed by the backend on the device. positions="all" pads: padded log-probs are
  -inf and padded top-k ids -1 (never a real token or probability 1); positions="last" gives one
  row per sequence.
- `logits_chunks(batch)`: all-position logits delivered chunk by chunk (LogitsChunk), for callers
  that consume them that way; [T, vocab] is never held whole.

Every all-position output is reduced in chunks of positions: the forward returns the final hidden
states and the LM head plus the reduction run on `chunk_tokens` rows at a time, so a float32
[T, vocab] never exists whole on the device (for a 7B teacher at 2048 tokens it would be 1.2 GB,
and its log-softmax as much again).

`output` picks the array type: "numpy" (host), "cupy" (device), "torch" (a torch.Tensor through
DLPack, on the GPU without a copy for the cuda device), "dlpack" (the backend's own array,
numpy.ndarray or cupy.ndarray, which any DLPack consumer such as `torch.from_dlpack` or
`jax.dlpack.from_dlpack` takes without a copy). `dtype` is "float32" or "float16" (values; top-k
indices are always int64, lengths int64).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from . import fp8, gpu
from .backend import Backend
from .backend_cpu import NumpyBackend
from .errors import DeviceError, FallbackWarning, FormatError, InputError, UnsupportedError
from .forward import GRAPH_KEEP, ForwardGraphs, upload
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
# alone). Bounds the activations of one call: a 7B teacher's device memory stays within 6 GB at 2048
# (5.90 GB at its peak over 2,000 rows on an H200, 25.0k tokens/s); 4096 took 6.31 GB and ran ~15%
# faster (bench/RESULTS.md). Callers with memory to spare pass a larger max_batch_tokens.
DEFAULT_MAX_BATCH_TOKENS = 2048
# float32 logits per LM-head chunk: the head and every reduction run on this many bytes of
# positions at a time (a 7B teacher's 152k vocabulary: 330 positions). Larger chunks amortise the
# head's dequantization over more rows; smaller ones bound device memory.
HEAD_CHUNK_BYTES = 192 << 20


class PerPosition(NamedTuple):
    """values [B, T_max, ...] (positions="all"; rows t >= lengths[b] are padding) or [B, ...]
    (positions="last"); lengths [B] int64, the number of real positions of each sequence."""

    values: Any
    lengths: Any


class TopK(NamedTuple):
    """The k most likely next tokens per position, descending (ties to the lower id).

    values: log-probs [B, T_max, k] or [B, k] (padding -inf); indices: token ids, int64 (padding
    -1); lengths [B]; tail: log(1 - sum(exp(values))), the log-mass of every other token, computed
    on the device as the logsumexp of the non-top-k log-probs (stable where 1 - sum underflows;
    -inf when k covers the vocabulary; padding -inf), or None unless tail=True; dropped: the
    probability mass of the tokens a `vocab_size` crop removed, at the same temperature (padding
    0.0), or None unless the call crops.
    """

    values: Any
    indices: Any
    lengths: Any
    tail: Any = None
    dropped: Any = None


@dataclass(frozen=True)
class LogitsChunk:
    """Positions start .. start + n - 1 of sequence `sequence` of the batch: logits [n, vocab]
    (row t predicts token t + 1), and with a `vocab_size` crop the probability mass it dropped
    per position ([n], at temperature 1), else None."""

    sequence: int
    start: int
    logits: Any
    dropped: Any = None


@dataclass(frozen=True)
class _Span:
    """Rows row0 .. row0 + n - 1 of a head chunk are positions start .. start + n - 1 of
    sequence `seq` (positions="last": one row per sequence, at its last position)."""

    seq: int
    start: int
    row0: int
    n: int


class LogitsProvider(Protocol):
    """What a distillation trainer needs from a teacher (aprender's TeacherLogitsProvider)."""

    @property
    def vocab_size(self) -> int: ...

    def logits_for_batch(self, batch: Sequence[Sequence[int]]) -> Any: ...


def _check_choice(what: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InputError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _cuda_backend(precision: str = "fp16") -> Backend:
    """A CudaBackend, or DeviceError naming why none can be had (no CuPy, no driver, no device,
    the backend failing to import or to start)."""
    gpu.cupy()
    try:
        from .backend_cuda import CudaBackend
    except ImportError as e:
        raise DeviceError(f"the CUDA backend cannot be imported ({e})") from None
    try:
        return CudaBackend(precision=precision)
    except (DeviceError, UnsupportedError):
        raise
    except Exception as e:  # the CUDA runtime's own errors (context creation, out of memory)
        raise DeviceError(f"the CUDA backend failed to start ({type(e).__name__}: {' '.join(str(e).split())})") from e


def make_backend(device: str, precision: str = "fp16") -> Backend:
    """"cpu", "cuda" (DeviceError naming why, without CuPy and a GPU), or "auto": cuda when it
    works, else cpu with a FallbackWarning that names the reason. precision: "fp16" (default) or
    "fp8" (engine/fp8.py; on the CPU the NumPy backend emulates it)."""
    _check_choice("device", device, DEVICES)
    if device == "cpu":
        return NumpyBackend(precision)
    if device == "cuda":
        return _cuda_backend(precision)
    try:
        return _cuda_backend(precision)
    except DeviceError as e:
        warnings.warn(f"device 'auto' runs on the CPU (NumPy backend, much slower): {e}", FallbackWarning,
                      stacklevel=3)
        return NumpyBackend(precision)


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
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, chunk_tokens: int | None = None,
                 graphs: bool = True):
        self.model = model
        self.config = model.config
        self.backend = backend
        self.output = _check_choice("output", output, OUTPUTS)
        self.dtype = _check_choice("dtype", dtype, tuple(DTYPES))
        if max_batch_tokens < 1:
            raise InputError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        if chunk_tokens is not None and chunk_tokens < 1:
            raise InputError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        # positions per LM-head chunk (see HEAD_CHUNK_BYTES)
        self.chunk_tokens = chunk_tokens or max(1, HEAD_CHUNK_BYTES // (4 * model.config.vocab_size))
        backend.check_model(model)  # before any upload: one clear error, nothing half-loaded
        self.weights = upload(model, backend)
        backend.release_cached()  # the upload's staging (a Q6_K matrix is repacked on the device)
        # Forwards of recurring shapes up to GRAPH_MAX_TOKENS tokens replay from CUDA graphs (forward.py)
        self._graphs = ForwardGraphs(self.config, self.weights, backend, keep=GRAPH_KEEP if graphs else 0)

    def __repr__(self) -> str:
        c = self.config
        return (f"TeacherModel({self.model.path.name}, arch={c.arch}, layers={c.n_layers}, hidden={c.hidden}, "
                f"vocab={c.vocab_size}, device={self.device}, precision={self.precision})")

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> str:
        return self.backend.name

    @property
    def precision(self) -> str:
        """"fp16", or "fp8": prefill's products in e4m3 (engine/fp8.py)."""
        return getattr(self.backend, "precision", "fp16")

    @property
    def pad_id(self) -> int | None:
        """The padding token the model file declares (GGUF tokenizer.ggml.padding_token_id, APR
        tokenizer.padding_token_id), or None when it declares none. For padding inputs; the outputs
        here mark their padding themselves (lengths, -inf log-probs, -1 ids)."""
        spec = self.model.tokenizer
        return None if spec is None else spec.pad_id

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
        (x,) = self._compute(self.validate(batch), True, lambda z: (z,), (0.0,), dtype=self._dtype(dtype))
        return self._emit(x, output, dtype)

    def logits_per_position(self, batch: Sequence[Sequence[int]], *, output: str | None = None,
                            dtype: str | None = None) -> PerPosition:
        """PerPosition(logits [B, T_max, vocab], lengths [B]): row t of sequence b predicts token
        t + 1; rows t >= lengths[b] are 0.0. Holds [B, T_max, vocab] whole: for long sequences
        and large vocabularies, `logits_chunks` delivers the same values chunk by chunk."""
        seqs = self.validate(batch)
        (x,) = self._compute(seqs, False, lambda z: (z,), (0.0,), dtype=self._dtype(dtype))
        return PerPosition(self._emit(x, output, dtype), self._lengths(seqs, output))

    def logits_chunks(self, batch: Sequence[Sequence[int]], *, output: str | None = None,
                      dtype: str | None = None, vocab_size: int | None = None) -> Iterator[LogitsChunk]:
        """All-position logits, chunk by chunk (LogitsChunk: a run of positions of one sequence,
        in batch order, positions ascending). At most one LM-head chunk of positions is on the
        device at a time, so [T, vocab] never exists whole; a consumer that keeps a chunk past the
        next one holds it itself. vocab_size crops the logits to the first N tokens (the chunk
        reports the probability mass dropped) or pads them with -inf (zero probability)."""
        seqs = self.validate(batch)
        n_out = self._vocab(vocab_size)
        for spans, z in self._head_chunks(seqs, False, self._dtype(dtype)):
            dropped = self._dropped(z, n_out, 1.0)
            z = self._fit_vocab(z, n_out, float("-inf"))
            for sp in spans:
                rows = slice(sp.row0, sp.row0 + sp.n)
                yield LogitsChunk(sp.seq, sp.start, self._emit(z[rows], output, dtype),
                                  None if dropped is None else self._emit(dropped[rows], output, "float32"))
            del z, dropped  # before the next chunk is computed

    def log_softmax(self, batch: Sequence[Sequence[int]], temperature: float = 1.0, positions: str = "all", *,
                    output: str | None = None, dtype: str | None = None,
                    vocab_size: int | None = None) -> PerPosition:
        """PerPosition(log_softmax(logits / temperature) [B, T_max, vocab] (padding -inf) or
        [B, vocab], lengths), normalised over the full vocabulary; vocab_size crops (normalised
        over the first N tokens) or pads (-inf columns) to a student's vocabulary."""
        t = self._temperature(temperature)
        last = _check_choice("positions", positions, POSITIONS) == "last"
        n_out = self._vocab(vocab_size)
        be = self.backend
        seqs = self.validate(batch)

        def reduce(z: Any) -> tuple:  # z is this chunk's own logits: overwritten by its log-probs
            return (self._fit_vocab(be.log_softmax(self._crop(z, n_out), t, inplace=True), n_out, float("-inf")),)

        (x,) = self._compute(seqs, last, reduce, (float("-inf"),), checked=1)
        return PerPosition(self._emit(x, output, dtype), self._lengths(seqs, output))

    def topk_logprobs(self, batch: Sequence[Sequence[int]], k: int, temperature: float = 1.0, positions: str = "all",
                      *, output: str | None = None, dtype: str | None = None, tail: bool = False,
                      vocab_size: int | None = None) -> TopK:
        """TopK(values, indices, lengths, tail, dropped): the k most likely next tokens under
        log_softmax(logits / temperature), normalised over the full vocabulary (or over the first
        vocab_size tokens when that crops it; padding a larger vocab_size changes nothing, its
        extra tokens have probability 0), descending, ties to the lower id: [B, T_max, k]
        (padding: values -inf, indices -1) or [B, k]. tail=True adds the tail log-mass
        log(1 - sum(exp(values))) per position, computed on the device (see TopK)."""
        n_out = self._vocab(vocab_size)
        limit = min(self.vocab_size, n_out)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
            raise InputError(f"k must be an integer in [1, {limit}], got {k!r}")
        t = self._temperature(temperature)
        last = _check_choice("positions", positions, POSITIONS) == "last"
        be, xp = self.backend, self.backend.xp
        seqs = self.validate(batch)
        cropping = n_out < self.vocab_size

        def reduce(z: Any) -> tuple:  # z: this chunk's logits, read once more for each reduction
            dropped = self._dropped(z, n_out, t)
            vals, idx, rest = be.topk_logprobs(self._crop(z, n_out), int(k), t, tail)
            out = [vals, idx.astype(xp.int64)]
            if tail:
                out.append(rest)
            if cropping:
                out.append(dropped)
            return tuple(out)

        fills = (float("-inf"), -1) + ((float("-inf"),) if tail else ()) + ((0.0,) if cropping else ())
        ys = list(self._compute(seqs, last, reduce, fills, checked=1))
        vals, idx = ys.pop(0), ys.pop(0)
        tail_x = self._emit(ys.pop(0), output, "float32") if tail else None
        dropped_x = self._emit(ys.pop(0), output, "float32") if cropping else None
        return TopK(self._emit(vals, output, dtype), self._emit_ints(idx, output), self._lengths(seqs, output),
                    tail_x, dropped_x)

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

    def _head_chunks(self, seqs: list[np.ndarray], last_only: bool, dtype: Any) -> Iterator[tuple[list[_Span], Any]]:
        """(spans, logits [n, vocab]) for every LM-head chunk of every forward: the forward stops
        at the final hidden states and the head runs on `chunk_tokens` rows at a time."""
        be, w = self.backend, self.weights
        for g in self._groups(seqs):
            lens = np.array([len(seqs[i]) for i in g], np.int64)
            be.release_cached()  # the last head's chunks: this forward's activations are smaller blocks
            with np.errstate(over="ignore", invalid="ignore"):  # no NumPy warnings: NaN/Inf are refused in one line
                hidden = self._graphs.hidden(np.concatenate([seqs[i] for i in g]), lens, last_only)
            be.release_cached()  # the layers' activations: the head's chunk is a larger block
            # packed row range [cu[j], cu[j + 1]) of each sequence of the group, and its first position
            cu = np.arange(len(g) + 1) if last_only else np.concatenate([[0], np.cumsum(lens)])
            first_pos = lens - 1 if last_only else np.zeros(len(g), np.int64)
            for s in range(0, hidden.shape[0], self.chunk_tokens):
                e = min(s + self.chunk_tokens, hidden.shape[0])
                first, stop = np.searchsorted(cu, s, "right") - 1, np.searchsorted(cu, e, "left")
                spans = [_Span(g[j], int(first_pos[j] + max(s, cu[j]) - cu[j]), int(max(s, cu[j]) - s),
                               int(min(e, cu[j + 1]) - max(s, cu[j]))) for j in range(first, stop)]
                with np.errstate(over="ignore", invalid="ignore"):
                    logits = be.lm_head(hidden[s:e], w.output, dtype)
                self._refuse_nonfinite(logits, "logits", spans)  # every chunk, before any reduction or caller sees it
                yield spans, logits
                del logits  # before the next chunk's head: one chunk on the device at a time

    def _compute(self, seqs: list[np.ndarray], last_only: bool, reduce: Callable[[Any], tuple],
                 fills: tuple[float, ...], dtype: Any = np.float32, checked: int = 0) -> tuple[Any, ...]:
        """reduce(logits chunk) of every sequence: reduce maps a chunk's rows to a tuple of arrays
        with the same rows, gathered into [B, ...] (last_only) or [B, T_max, ...] arrays whose
        padding holds `fills` (one value per array). The first `checked` of them must be finite
        (log-probs; a top-k tail may be -inf)."""
        xp = self.backend.xp
        t_out = 1 if last_only else max(len(s) for s in seqs)
        outs: list[Any] | None = None
        for spans, logits in self._head_chunks(seqs, last_only, dtype):
            with np.errstate(over="ignore", invalid="ignore"):  # a too small temperature is refused below
                ys = reduce(logits)
            for y in ys[:checked]:  # the model's vocabulary only: a student's padding is -inf on purpose
                self._refuse_nonfinite(y[:, :self.vocab_size], "log-probs", spans)
            del logits
            if outs is None:
                outs = [xp.full((len(seqs), t_out) + y.shape[1:], fill, y.dtype) for y, fill in zip(ys, fills)]
            for sp in spans:
                col = 0 if last_only else sp.start
                for out, y in zip(outs, ys):
                    out[sp.seq, col:col + sp.n] = y[sp.row0:sp.row0 + sp.n]
        return tuple(o[:, 0] if last_only else o for o in outs)

    # --- vocabulary of a student -------------------------------------------------------------------
    def _vocab(self, vocab_size: int | None) -> int:
        """The output vocabulary: the model's, or a student's (crop or pad)."""
        if vocab_size is None:
            return self.vocab_size
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise InputError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        return int(vocab_size)

    def _crop(self, z: Any, n_out: int) -> Any:
        return z[:, :n_out] if n_out < z.shape[1] else z

    def _fit_vocab(self, z: Any, n_out: int, fill: float) -> Any:
        """z cropped to n_out columns, or padded with `fill` (zero probability) up to n_out."""
        if n_out <= z.shape[1]:
            return self._crop(z, n_out)
        xp = self.backend.xp
        return xp.concatenate([z, xp.full((z.shape[0], n_out - z.shape[1]), fill, z.dtype)], axis=1)

    def _dropped(self, z: Any, n_out: int, temperature: float) -> Any | None:
        """Probability mass (at `temperature`) of the tokens >= n_out a crop removes, per row."""
        if n_out >= z.shape[1]:
            return None
        be, xp = self.backend, self.backend.xp
        return xp.exp(be.logsumexp(z[:, n_out:], temperature) - be.logsumexp(z, temperature))

    def _refuse_nonfinite(self, y: Any, what: str, spans: list[_Span]) -> None:
        """NaN/Inf never reach a caller (a trainer would learn from them). `y` holds one head
        chunk's rows (`spans` say whose); it is checked on the device, and the sequence and
        position are looked for only when a value is bad."""
        xp = self.backend.xp
        if y.dtype.kind != "f" or self.backend.all_finite(y):
            return
        bad = self.backend.to_numpy(xp.flatnonzero(~xp.isfinite(y.reshape(y.shape[0], -1)).all(axis=1)))
        first = int(bad[0])
        sp = next(sp for sp in spans if sp.row0 <= first < sp.row0 + sp.n)
        at = (f"sequence {sp.seq}, position {sp.start + first - sp.row0}"
              + (f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""))
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

    def _lengths(self, seqs: list[np.ndarray], output: str | None) -> Any:
        return self._emit_ints(np.array([len(s) for s in seqs], np.int64), output)

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
         max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, chunk_tokens: int | None = None,
         verify: bool = False, precision: str = "fp16", graphs: bool = True) -> TeacherModel:
    """Open a .gguf/.apr file (or "demo", the synthetic demo model) as a teacher on `device`.

    device: "cpu" (NumPy reference), "cuda" (CuPy; DeviceError without CuPy and a GPU), or "auto"
    (cuda when CuPy, a GPU and the CUDA backend all work, else cpu with a FallbackWarning naming
    why). `output` and `dtype` are the defaults of every call; each call may override them.
    max_batch_tokens: tokens per forward; chunk_tokens: positions per LM-head chunk (default:
    HEAD_CHUNK_BYTES of float32 logits). verify=True first reads the whole file (engine/verify.py:
    the APR footer CRC, every tensor decodes to finite values) and raises a FormatError naming the
    first failure; it costs a full read and decode on the CPU.
    precision: "fp16" (default: the f16/fp32 kernels, logits within mean KL 1e-4 of the reference)
    or "fp8", opt-in: products of at least fp8.FP8_MIN_ROWS tokens (prefill) multiply float8 e4m3
    operands with one scale per row of x and of W, fp32 sums (engine/fp8.py); decode's small
    products and the LM head keep the fp16 kernels. Needs compute capability 8.9 or later
    (UnsupportedError otherwise, before anything loads); the CPU backend emulates it. Its drift
    from fp16 is measured in bench/RESULTS.md: check it against your distillation's tolerance.
    graphs: on the GPU, forwards of at most forward.GRAPH_MAX_TOKENS tokens whose sequence lengths
    recur replay from CUDA graphs (a shape's first forward runs eagerly, the second is captured);
    False runs every forward eagerly.
    """
    fp8.check_precision(precision)
    model = open_model(resolve_model(path))
    if verify:
        verify_model(model).raise_if_failed()
    return TeacherModel(model, make_backend(device, precision), output=output, dtype=dtype, max_batch_tokens=max_batch_tokens,
                        chunk_tokens=chunk_tokens, graphs=graphs)
