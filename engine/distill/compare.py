"""Two teachers compared position by position (`q4k-engine compare A B`): either two signal
directories written over the same dataset, or two model files run over the same sequences. The
statistics themselves are engine/distill/stats.py's; this module only pairs the positions up.

A is the base (the reference: the F16 original, the model the student should match), B the model
judged. The positions compared are the training targets that have a next token: target_mask[t] and
t < T - 1 (rows from engine/distill/rows.py, or every position but the last), with token t + 1 as
"the next token" of PPL and Δp.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import InputError
from ..provider import DEFAULT_MAX_BATCH_TOKENS
from .reader import SignalRow, Signals
from .stats import KLDivergence, KLReport, dense_positions, topk_positions


def _positions(mask: np.ndarray) -> np.ndarray:
    pos = np.flatnonzero(mask)
    return pos[pos < len(mask) - 1]


def _pair(a: SignalRow, b: SignalRow) -> np.ndarray:
    if a.row_index != b.row_index:
        raise InputError(f"row {a.row_index} of A is paired with row {b.row_index} of B")
    if not np.array_equal(a.input_ids, b.input_ids):
        raise InputError(f"row {a.row_index}: A and B were computed on different token ids "
                         "(a different dataset, template or truncation)")
    if not np.array_equal(a.target_mask, b.target_mask):
        raise InputError(f"row {a.row_index}: A and B mark different target positions (--assistant-only on one side?)")
    return _positions(a.target_mask)


def compare_signals(a: Signals, b: Signals) -> KLReport:
    """KL(A || B) and the rest over two signal directories of the same dataset and kind."""
    ma, mb = a.manifest, b.manifest
    if ma.kind != mb.kind:
        raise InputError(f"{ma.directory} holds {ma.kind} signals and {mb.directory} {mb.kind}: compare two of one kind")
    if ma.vocab_size != mb.vocab_size:
        raise InputError(f"vocabularies differ: {ma.vocab_size} ({ma.directory}) vs {mb.vocab_size} ({mb.directory})")
    if (ma.rows, ma.stored_rows) != (mb.rows, mb.stored_rows):
        raise InputError(f"{ma.directory} has {ma.stored_rows} rows (of {ma.rows}), {mb.directory} {mb.stored_rows} "
                         f"(of {mb.rows}): not the same dataset")
    topk = ma.kind == "topk"
    if topk and ma.temperature != mb.temperature:
        raise InputError(f"top-k signals at different temperatures ({ma.temperature:g} vs {mb.temperature:g})")
    notes = []
    if topk:
        notes.append(f"top-k signals (k = {ma.k} and {mb.k}): KLD over the ids in both lists plus one bucket for "
                     "the rest, a lower bound of the full KL")
        if ma.temperature != 1.0:
            notes.append(f"log-probs at temperature {ma.temperature:g}, so PPL is that of the tempered distributions")
    acc = KLDivergence(temperature=ma.temperature if topk else 1.0, lower_bound=topk)
    for ra, rb in zip(a.rows(), b.rows(), strict=True):
        pos = _pair(ra, rb)
        if not len(pos):
            continue
        nxt = ra.input_ids[pos + 1]
        if topk:
            acc.add(topk_positions(ra.token_ids[pos], ra.logprobs[pos], ra.tail[pos],
                                   rb.token_ids[pos], rb.logprobs[pos], rb.tail[pos], nxt))
        else:
            acc.add(dense_positions(ra.logits[pos], rb.logits[pos], nxt))
    return acc.report(notes)


def compare_teachers(a, b, rows: Iterable[tuple[np.ndarray, np.ndarray]], *, batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> KLReport:
    """KL(A || B) and the rest of two TeacherModels over the same rows: (input_ids, target_mask)
    pairs, streamed and run in groups of up to batch_tokens tokens (memory stays bounded)."""
    if a.vocab_size != b.vocab_size:
        raise InputError(f"vocabularies differ: {a.vocab_size} (A) vs {b.vocab_size} (B)")
    ta, tb = a.model.tokenizer, b.model.tokenizer
    if ta is not None and tb is not None and ta.tokens != tb.tokens:
        raise InputError("A and B have different tokenizers: their token ids mean different things")
    acc = KLDivergence()

    def run(group: list[tuple[np.ndarray, np.ndarray]]) -> None:
        seqs = a.validate([ids for ids, _ in group])
        la, _ = a.logits_per_position(seqs, output="numpy")
        lb, _ = b.logits_per_position(seqs, output="numpy")
        for j, (ids, mask) in enumerate(group):
            pos = _positions(np.asarray(mask, bool))
            if len(pos):
                acc.add(dense_positions(la[j, pos], lb[j, pos], seqs[j][pos + 1]))

    group: list[tuple[np.ndarray, np.ndarray]] = []
    tokens = 0
    for ids, mask in rows:
        if group and tokens + len(ids) > batch_tokens:
            run(group)
            group, tokens = [], 0
        group.append((ids, mask))
        tokens += len(ids)
    if group:
        run(group)
    return acc.report()
