"""Distillation losses for any PyTorch trainer: forward KL(teacher || student) at temperature T, from
dense teacher logits or from the teacher's top-k log-probs plus the tail bucket. This module is the
only one in q4k_engine.distill that imports torch.

    from q4k_engine.distill import kl_div_dense, kl_div_topk
    loss = kl_div_dense(student_logits, teacher_logits, target_mask, temperature=2.0)
    loss = kl_div_topk(student_logits, target_token_ids, target_logprobs, tail_logmass, target_mask,
                       temperature=2.0)   # the columns of a top-k shard (engine/distill/reader.py)

Both return T^2 times the mean, over target positions (mask True), of the per-position KL, in nats:
the T^2 of Hinton et al. keeps the gradient's size independent of the temperature. With no target
position the loss is 0 (and so is its gradient). Leading dimensions are free ([B, T, V], [N, V], ...);
the mask and the teacher's tensors share them. The teacher is a constant: no gradient flows to it.

- dense: p = softmax(teacher / T), q = softmax(student / T), KL = sum_i p_i (log p_i - log q_i).
- top-k: the teacher gives K ids with log p (normalised over its FULL vocabulary at temperature T,
  as q4k-engine writes them) and the tail log-mass log(1 - sum p) (None: computed from the K
  log-probs). The KL is taken over the K+1 buckets {id_1}, ..., {id_K}, {every other id}: the
  student's bucket log-probs are its log-softmax at the K ids and its own tail log(1 - sum q) over
  those ids (a log-sum-exp over the other ids, which stays accurate when the K ids hold almost all
  the mass). Merging ids can only lose information, so by the log-sum inequality this is a lower bound
  of the dense KL, equal to it when the K ids cover the vocabulary. Ids < 0 and log-probs of -inf
  (padding, as the engine pads) carry no mass.

Memory: the loss runs over `chunk` positions at a time inside one autograd Function. Its forward
keeps no graph; its backward recomputes each chunk and writes that chunk's gradient into the
gradient tensor, so besides the inputs and their gradient only [chunk, V] temporaries exist, never a
second [positions, V] copy (autograd through a plain log_softmax would keep one per call). Chunks are
computed in float32 (float64 inputs stay float64), whatever the student's dtype.

Vocabularies (`vocab`, explicit, never guessed): "same" (default) requires the teacher's and the
student's vocabulary sizes to agree. "crop": the teacher's vocabulary is larger (Qwen2's 152064
logits against a 151936-token student, torchtune's case): the teacher is cut to the student's first
V ids and renormalised over them; for top-k, listed ids >= V are dropped and the teacher's remaining
buckets renormalised (mass of cut ids inside the tail cannot be seen and stays in the tail). "pad":
the teacher's vocabulary is smaller: the student's extra ids get teacher probability 0 (the student
is still normalised over all its ids, so mass it puts there costs it). A top-k id outside the
student's vocabulary without "crop" is an InputError.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import InputError

VOCAB_MODES = ("same", "crop", "pad")
# Elements of one [chunk, V] temporary: 16M float32 = 64 MiB, a few of them alive per chunk.
CHUNK_ELEMENTS = 1 << 24


class _Chunked(torch.autograd.Function):
    """sum over chunks of fn(student[chunk], *extras[chunk]); gradient w.r.t. student only, recomputed
    chunk by chunk in backward."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, fn: Callable[..., torch.Tensor], chunk: int,
                *extras: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(student, *extras)
        total = torch.zeros((), dtype=_compute_dtype(student), device=student.device)
        for s in range(0, student.shape[0], chunk):
            total += fn(student[s:s + chunk], *(x[s:s + chunk] for x in extras))
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        student, *extras = ctx.saved_tensors
        grad = torch.empty_like(student)
        for s in range(0, student.shape[0], ctx.chunk):
            with torch.enable_grad():
                x = student[s:s + ctx.chunk].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(ctx.fn(x, *(e[s:s + ctx.chunk] for e in extras)), x)
            grad[s:s + ctx.chunk] = g * grad_out
        return (grad, None, None) + (None,) * len(extras)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_temperature(t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        raise InputError(f"temperature must be a positive number, got {t!r}")
    return float(t)


def _flatten(student: torch.Tensor, mask: torch.Tensor | None, temperature: float,
             chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """student as [N, V], each position's weight T^2 * mask / n_targets as [N], and the chunk size."""
    if student.ndim < 2:
        raise InputError(f"student logits must be [..., vocab], got shape {tuple(student.shape)}")
    lead = student.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=student.device)
    elif tuple(mask.shape) != tuple(lead):
        raise InputError(f"mask has shape {tuple(mask.shape)}; the student's positions are {tuple(lead)}")
    m = mask.reshape(-1).to(device=student.device, dtype=_compute_dtype(student))
    w = m * (temperature ** 2 / m.sum().clamp(min=1))
    v = student.shape[-1]
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // v)
    elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a positive number of positions, got {chunk!r}")
    return student.reshape(-1, v), w, chunk


def _teacher(x: torch.Tensor, lead: torch.Size, device: torch.device, what: str, per_position: bool = True) -> torch.Tensor:
    """A teacher tensor detached and flattened to [N, ...]: its leading dimensions must be the
    student's positions, followed by one dimension of values per position (per_position) or none."""
    ndim = len(lead) + per_position
    if x.ndim != ndim or tuple(x.shape[:len(lead)]) != tuple(lead):
        extra = " + [values]" if per_position else ""
        raise InputError(f"{what} has shape {tuple(x.shape)}; expected {tuple(lead)}{extra} (the student's positions)")
    if x.device != device:  # a silent copy across devices would hide a host round trip
        raise InputError(f"{what} is on {x.device}, the student's logits on {device}: move one of them")
    return x.detach().reshape((-1,) + tuple(x.shape[len(lead):]))


def _vocab_mode(vocab: str) -> str:
    if vocab not in VOCAB_MODES:
        raise InputError(f"vocab must be one of {', '.join(VOCAB_MODES)}; got {vocab!r}")
    return vocab


def kl_div_dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None, *,
                 temperature: float = 1.0, vocab: str = "same", chunk: int | None = None) -> torch.Tensor:
    """T^2 * mean over target positions of KL(softmax(teacher / T) || softmax(student / T))."""
    t = _check_temperature(temperature)
    mode = _vocab_mode(vocab)
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs != vt and mode == "same":
        raise InputError(f"teacher vocabulary {vt} != student vocabulary {vs}: pass vocab='crop' "
                         "(teacher larger) or vocab='pad' (teacher smaller)")
    if mode == "crop" and vt < vs or mode == "pad" and vt > vs:
        raise InputError(f"vocab={mode!r} needs a teacher vocabulary {'>=' if mode == 'crop' else '<='} the "
                         f"student's; got teacher {vt}, student {vs}")
    s, w, chunk = _flatten(student_logits, mask, t, chunk)
    teacher = _teacher(teacher_logits, student_logits.shape[:-1], s.device, "teacher logits")
    if mode == "crop":
        teacher = teacher[:, :vs]  # a view; renormalised over the student's ids by the log-softmax
    v = teacher.shape[1]

    def one(sc: torch.Tensor, tc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(sc)
        lq = torch.log_softmax(sc.to(dt) / t, -1)[:, :v]
        lp = torch.log_softmax(tc.to(dt) / t, -1)
        p = lp.exp()
        kl = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
        return (kl * wc).sum()

    return _Chunked.apply(s, one, chunk, teacher, w)


def kl_div_topk(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                teacher_tail: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                temperature: float = 1.0, vocab: str = "same", chunk: int | None = None) -> torch.Tensor:
    """T^2 * mean over target positions of the KL over the K+1 buckets (top-k ids + the tail): a lower
    bound of kl_div_dense, equal when the K ids cover the vocabulary. teacher_logprobs are already at
    temperature T (log-softmax of teacher / T over its full vocabulary)."""
    t = _check_temperature(temperature)
    mode = _vocab_mode(vocab)
    lead = student_logits.shape[:-1]
    vs = student_logits.shape[-1]
    s, w, chunk = _flatten(student_logits, mask, t, chunk)
    ids = _teacher(teacher_ids, lead, s.device, "teacher ids").long()
    dt = _compute_dtype(s)
    lp = _teacher(teacher_logprobs, lead, s.device, "teacher log-probs").to(dt)
    if lp.shape != ids.shape:
        raise InputError(f"teacher log-probs {tuple(lp.shape)} and ids {tuple(ids.shape)} differ in shape")
    listed = ids >= 0
    p = torch.where(listed, lp.exp(), 0.0)
    if teacher_tail is None:
        tail = torch.log((1 - p.double().sum(-1)).clamp(min=0)).to(dt)
    else:
        tail = _teacher(teacher_tail, lead, s.device, "teacher tail", per_position=False).to(dt)
    outside = listed & (ids >= vs)
    if bool(outside.any()):
        if mode != "crop":
            n = int(outside.nonzero()[0, 0])
            raise InputError(f"teacher top-k id {int(ids[outside][0])} (position {n}) is outside the student's "
                             f"vocabulary of {vs}: pass vocab='crop' to drop such ids")
        kept = torch.log((1 - torch.where(outside, p, 0.0).double().sum(-1)).clamp(min=1e-30)).to(dt)
        listed = listed & ~outside
        lp, tail = lp - kept[:, None], tail - kept
    ids = torch.where(listed, ids, 0)
    lp = torch.where(listed, lp, float("-inf"))

    def one(sc: torch.Tensor, ic: torch.Tensor, lpc: torch.Tensor, tc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
        lq_all = torch.log_softmax(sc.to(dt) / t, -1)
        pc = lpc.exp()
        head = torch.where(pc > 0, pc * (lpc - lq_all.gather(1, ic)), 0.0).sum(-1)
        # The student's tail: log-sum-exp of its log-probs outside the listed ids. Listed ids are set
        # to the most negative finite value, not -inf, so that a row whose ids cover the vocabulary
        # has a finite (negligible) tail and no NaN in the gradient.
        hits = torch.zeros_like(lq_all, dtype=torch.int32).scatter_add_(1, ic, (pc > 0).to(torch.int32))
        lq_tail = torch.logsumexp(lq_all.masked_fill(hits > 0, torch.finfo(dt).min), -1)
        pt = tc.exp()
        tail_term = torch.where(pt > 0, pt * (tc - lq_tail), 0.0)
        return ((head + tail_term) * wc).sum()

    return _Chunked.apply(s, one, chunk, ids, lp, tail, w)
