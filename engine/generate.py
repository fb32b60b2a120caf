"""Greedy generation with a KV cache, over the one forward (forward.py).

The prompts of a batch (any lengths) are prefilled together, packed; then each step feeds every
sequence its last token at its own position and takes the argmax of the logits as its next token.
A sequence stops after `max_new_tokens` or right after it produces `eos_id`. The batch keeps its
shape until the last sequence stops: finished ones run along in their cache slots and their
tokens are dropped, so every step has one shape, as a CUDA graph needs.

On a backend that can capture (the cuda one), the decode step is run once eagerly (compiling its
kernels) and then captured into a CUDA graph that each later step replays: token ids, positions,
the attention layout and the cache rows to write live in static device buffers rewritten in place
before each launch, and only the [B] next ids come back to the host. When the capture fails,
generation goes on with eager steps and `Generation.note` says why.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .backend import Backend, Batch, KVCache
from .config import ModelConfig
from .errors import DeviceError, InputError
from .forward import Weights, forward


@dataclass
class Generation:
    tokens: list[list[int]]  # new ids of each sequence; the last is eos_id when it stopped there
    prompt_tokens: int
    prefill_seconds: float  # prefill forward and the first new token of each sequence on the host
    step_seconds: list[float]  # wall time of each decode step (the first includes warm-up and capture)
    mode: str  # "graph" (decode steps replay a CUDA graph) or "eager"
    note: str | None = None  # why a requested graph is not used

    @property
    def decode_tokens(self) -> int:
        """Tokens kept from decode steps (each sequence's first new token comes from the prefill)."""
        return sum(len(t) for t in self.tokens) - len(self.tokens)

    def step_ms(self) -> float:
        """Median wall time of a decode step after the first one, in ms (nan without steps)."""
        steady = self.step_seconds[1:] or self.step_seconds
        return float(np.median(steady)) * 1e3 if steady else float("nan")


def _argmax_host(be: Backend, logits: Any) -> np.ndarray:
    return be.to_numpy(be.argmax(logits))


class _EagerStep:
    """One decode step as a plain forward: host ids and a fresh Batch in, host next ids out."""

    mode, note = "eager", None

    def __init__(self, cfg: ModelConfig, w: Weights, be: Backend, cache: KVCache):
        self.cfg, self.w, self.be, self.cache = cfg, w, be, cache

    def __call__(self, ids: np.ndarray, past: np.ndarray) -> np.ndarray:
        batch = Batch.from_lengths(np.ones(len(ids), np.int64), past_lens=past)
        return _argmax_host(self.be, forward(self.cfg, self.w, self.be, ids, batch, cache=self.cache))


class _GraphStep:
    """The same step on static device buffers, captured after its first (eager) run and replayed."""

    def __init__(self, cfg: ModelConfig, w: Weights, be: Any, cache: KVCache):
        self.cfg, self.w, self.be, self.cache = cfg, w, be, cache
        self.inputs = be.decode_inputs(cache)
        self.next_ids = be.xp.empty(len(self.inputs.slot0), np.int32)
        self.graph = None
        self.mode, self.note = "graph", None

    def _run(self) -> None:
        self.be.use_decode_inputs(self.inputs)
        logits = forward(self.cfg, self.w, self.be, self.inputs.ids, self.inputs.batch, cache=self.cache)
        self.be.argmax(logits, out=self.next_ids)

    def __call__(self, ids: np.ndarray, past: np.ndarray) -> np.ndarray:
        self.inputs.write(ids, past)
        if self.graph is not None:
            self.graph.launch()
        else:
            self._run()
            if self.mode == "graph":
                try:
                    self.graph = self.be.capture(self._run)
                except DeviceError as e:
                    self.mode, self.note = "eager", f"{e}; decoding with eager steps instead"
        return self.be.to_numpy(self.next_ids)


def generate(cfg: ModelConfig, w: Weights, be: Backend, prompts: Sequence[np.ndarray], max_new_tokens: int,
             eos_id: int | None = None, use_graph: bool = True) -> Generation:
    """Greedy continuation of each prompt (token ids); see the module docstring."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not len(prompts):
        raise InputError("no prompts: pass at least one sequence")
    lengths = np.array([len(p) for p in prompts], np.int64)
    if not lengths.min():
        raise InputError(f"prompt {int(np.argmin(lengths))} is empty")
    total = int(lengths.max()) + int(max_new_tokens)
    if cfg.context_length and total > cfg.context_length:
        raise InputError(f"a prompt of {int(lengths.max())} tokens + {max_new_tokens} new tokens exceeds the "
                         f"model's context length {cfg.context_length}")
    n = len(prompts)
    # The last new token is never fed back: the cache needs one row less than `total`.
    cache = be.new_cache(cfg.n_layers, n, total - 1, cfg.n_kv_heads, cfg.head_dim)
    t0 = time.perf_counter()
    logits = forward(cfg, w, be, np.concatenate([np.asarray(p, np.int32) for p in prompts]),
                     Batch.from_lengths(lengths), cache=cache, last_only=True)
    ids = _argmax_host(be, logits)
    del logits
    prefill_seconds = time.perf_counter() - t0

    tokens: list[list[int]] = [[] for _ in range(n)]
    live = np.ones(n, bool)

    def keep(new: np.ndarray) -> None:
        for b in np.flatnonzero(live):
            tokens[b].append(int(new[b]))
            if int(new[b]) == eos_id or len(tokens[b]) == max_new_tokens:
                live[b] = False

    keep(ids)
    graphs = use_graph and callable(getattr(be, "capture", None))
    step = (_GraphStep if graphs else _EagerStep)(cfg, w, be, cache)
    past = lengths.copy()
    step_seconds = []
    while live.any():
        t = time.perf_counter()
        ids = step(ids, past)
        step_seconds.append(time.perf_counter() - t)
        past += 1
        keep(ids)
    return Generation(tokens, int(lengths.sum()), prefill_seconds, step_seconds, step.mode, step.note)
