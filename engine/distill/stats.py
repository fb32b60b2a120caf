"""How far one model's next-token distributions are from another's: the statistics that llama.cpp's
`llama-perplexity --kl-divergence` prints, under the same names, reduced in float64. The one place
the project computes them (`q4k-engine compare`, the parity tests and the benches all call it).

"base" is the reference (the F16 original, transformers, the CPU backend) and "Q" the model judged
(the Q4_K_M file, this engine, the GPU backend). Per position t, with p = base, q = Q and x the token
that actually follows position t:

- KLD = KL(p || q) = sum_i p_i (log p_i - log q_i), nats
- Δp  = q(x) - p(x); "RMS Δp" = sqrt(mean Δp^2)
- "Same top p": the fraction of positions whose argmax agrees (ties go to the lower id on both sides)
- PPL(Q) = exp(mean -log q(x)), PPL(base) likewise, their correlation, ratio, log ratio and difference

Uncertainties follow llama.cpp: the standard error of a mean is sqrt((E[v^2] - E[v]^2) / (n - 1)) and
is reported as 0 for n <= 10; "Same top p" has the binomial sqrt(p (1 - p) / (n - 1)); the log-ratio's
error subtracts the covariance of the two log-perplexities. Percentiles interpolate linearly between
sorted values at fraction * (n - 1), as llama.cpp and numpy's default do.

Where this differs from llama.cpp, on purpose: every position the caller passes is counted
(llama.cpp scores only the second half of each context window, an artefact of its own windowing);
the base log-probs are exact (llama.cpp stores them as 16-bit quantized values and skips those below
-16); the summary is given for any number of positions (llama.cpp prints it from 100 on).

Top-k inputs (each side's K most likely ids, their log-probs over the full vocabulary and the tail
log-mass log(1 - sum p)): the KLD is the KL between the two distributions coarsened to the partition
{each id in both top-k lists} + {every other id}; by the log-sum inequality it is a lower bound of the
full KL, equal to it when the lists cover the vocabulary, and the report says so (`kld_lower_bound`).
PPL and Δp need the probability of the actual next token, known only where it is in both lists; when
it is missing anywhere they are left out and the count of such positions is reported.

Memory: three float64 values are kept per position (KLD and the two next-token log-probs, for the
percentiles), 24 bytes; the [positions, vocab] inputs are processed in blocks of rows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

# float64 bytes of one block of [rows, vocab] intermediates
BLOCK_BYTES = 64 << 20
# (label as llama.cpp prints it, fraction, field of Distribution); "Median" is the 0.5 quantile
LEVELS = (("Maximum", 1.0, "max"), ("99.9%", 0.999, "p99_9"), ("99.0%", 0.99, "p99"), ("95.0%", 0.95, "p95"),
          ("90.0%", 0.9, "p90"), ("75.0%", 0.75, "p75"), ("Median", 0.5, "median"), ("25.0%", 0.25, "p25"),
          ("10.0%", 0.1, "p10"), (" 5.0%", 0.05, "p5"), (" 1.0%", 0.01, "p1"), (" 0.1%", 0.001, "p0_1"),
          ("Minimum", 0.0, "min"))
KLD_SKIPS = ("p75", "p25")  # llama.cpp prints these for Δp only


@dataclass(frozen=True)
class Positions:
    """Per-position figures of a block of positions, float64. nll_* is NaN where the next token's
    probability is not known (no next token given, or outside a top-k list)."""

    kld: np.ndarray
    same_top: np.ndarray
    nll_base: np.ndarray
    nll_q: np.ndarray
    max_abs_dlogit: float = math.nan  # dense inputs only
    max_abs_logit: float = math.nan  # max |base logit|, the scale to read max_abs_dlogit against


@dataclass(frozen=True)
class Distribution:
    """Mean (± its standard error) and the quantiles of one per-position quantity."""

    mean: float
    mean_unc: float
    max: float
    p99_9: float
    p99: float
    p95: float
    p90: float
    p75: float
    median: float
    p25: float
    p10: float
    p5: float
    p1: float
    p0_1: float
    min: float


@dataclass(frozen=True)
class Perplexity:
    """llama.cpp's "Perplexity statistics"."""

    ppl_q: float
    ppl_q_unc: float
    ppl_base: float
    ppl_base_unc: float
    cor_ln_ppl: float | None  # Cor(ln(PPL(Q)), ln(PPL(base))); None when an uncertainty is 0
    ln_ppl_ratio: float
    ln_ppl_ratio_unc: float
    ppl_ratio: float
    ppl_ratio_unc: float
    ppl_diff: float
    ppl_diff_unc: float


@dataclass(frozen=True)
class KLReport:
    """Everything `llama-perplexity --kl-divergence` prints, for one comparison. Δp values are
    fractions (the text form prints them in %, as llama.cpp does)."""

    positions: int
    temperature: float
    kld_lower_bound: bool  # top-k inputs: the KLD figures are lower bounds of the full KL
    kld: Distribution
    same_top_p: float
    same_top_p_unc: float
    perplexity: Perplexity | None  # None when the next token's probability is missing somewhere
    dp: Distribution | None
    rms_dp: float | None
    rms_dp_unc: float | None
    missing_next: int  # positions without the next token's probability on one side or both
    max_abs_dlogit: float | None = None  # dense inputs only
    max_abs_logit: float | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """The report in llama-perplexity's layout (its section titles and line labels)."""
        lines = [f"positions: {self.positions}, temperature {self.temperature:g}"]
        if self.max_abs_dlogit is not None:
            lines.append(f"max |Δlogit|: {self.max_abs_dlogit:.6g} (max |logit| of base {self.max_abs_logit:.6g})")
        lines += [f"note: {n}" for n in self.notes]
        lines += ["", "====== Perplexity statistics ======"]
        p = self.perplexity
        if p is None:
            lines.append(f"(not available: the next token's probability is missing at {self.missing_next} "
                         f"of {self.positions} positions)")
        else:
            cor = "n/a" if p.cor_ln_ppl is None else f"{100 * p.cor_ln_ppl:6.2f}%"
            lines += [
                f"Mean PPL(Q)                   : {p.ppl_q:10.6f} ± {p.ppl_q_unc:10.6f}",
                f"Mean PPL(base)                : {p.ppl_base:10.6f} ± {p.ppl_base_unc:10.6f}",
                f"Cor(ln(PPL(Q)), ln(PPL(base))): {cor}",
                f"Mean ln(PPL(Q)/PPL(base))     : {p.ln_ppl_ratio:10.6f} ± {p.ln_ppl_ratio_unc:10.6f}",
                f"Mean PPL(Q)/PPL(base)         : {p.ppl_ratio:10.6f} ± {p.ppl_ratio_unc:10.6f}",
                f"Mean PPL(Q)-PPL(base)         : {p.ppl_diff:10.6f} ± {p.ppl_diff_unc:10.6f}",
            ]
        title = "KL divergence statistics" + (" (lower bounds: top-k inputs)" if self.kld_lower_bound else "")
        k = self.kld
        lines += ["", f"====== {title} ======", f"Mean    KLD: {k.mean:10.6f} ± {k.mean_unc:10.6f}"]
        lines += [f"{label:<7} KLD: {getattr(k, name):10.6f}" for label, _, name in LEVELS if name not in KLD_SKIPS]
        lines += ["", "====== Token probability statistics ======"]
        d = self.dp
        if d is not None:
            lines.append(f"Mean    Δp: {100 * d.mean:6.3f} ± {100 * d.mean_unc:5.3f} %")
            lines += [f"{label:<7} Δp: {100 * getattr(d, name):6.3f}%" for label, _, name in LEVELS]
            lines.append(f"RMS Δp    : {100 * self.rms_dp:6.3f} ± {100 * self.rms_dp_unc:5.3f} %")
        lines.append(f"Same top p: {100 * self.same_top_p:6.3f} ± {100 * self.same_top_p_unc:5.3f} %")
        return "\n".join(lines)


# --- per-position figures ----------------------------------------------------------------------


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log_softmax(logits / temperature) over the last axis, in float64."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _rows(x: Any, what: str) -> np.ndarray:
    """[positions, vocab] from one array or a list of [T_i, vocab] arrays."""
    if isinstance(x, (list, tuple)):
        x = np.concatenate([np.asarray(a) for a in x]) if x else np.zeros((0, 0))
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{what}: expected [positions, vocab] logits, got shape {x.shape}")
    return x


def _next_ids(next_ids: Any, n: int) -> np.ndarray | None:
    """[n] int64 from one array or list of ids, or a list of per-sequence arrays (concatenated)."""
    if next_ids is None:
        return None
    nested = isinstance(next_ids, (list, tuple)) and len(next_ids) and np.ndim(next_ids[0]) == 1
    ids = np.asarray(np.concatenate(next_ids) if nested else next_ids).astype(np.int64)
    if ids.shape != (n,):
        raise InputError(f"next token ids: expected {n} values, got shape {ids.shape}")
    return ids


def dense_positions(base: Any, q: Any, next_ids: Any = None, *, temperature: float = 1.0) -> Positions:
    """Figures of every position from two sets of logits [positions, vocab] (or lists of [T_i, vocab]
    arrays, concatenated); next_ids[t] is the token that follows position t (None: no PPL or Δp)."""
    b, g = _rows(base, "base"), _rows(q, "Q")
    if b.shape != g.shape:
        raise InputError(f"base logits {b.shape} and Q logits {g.shape} differ in shape")
    n, vocab = b.shape
    nxt = _next_ids(next_ids, n)
    if nxt is not None and n and not (0 <= nxt.min() and nxt.max() < vocab):
        raise InputError(f"next token ids must lie in [0, {vocab})")
    kld, nll_b, nll_q = (np.full(n, np.nan) for _ in range(3))
    same = np.zeros(n, bool)
    dmax = lmax = 0.0
    step = max(1, BLOCK_BYTES // (8 * max(vocab, 1)))
    for s in range(0, n, step):
        bb, gg = b[s:s + step].astype(np.float64), g[s:s + step].astype(np.float64)
        bad = ~(np.isfinite(bb).all(1) & np.isfinite(gg).all(1))
        if bad.any():
            raise InputError(f"position {s + int(np.argmax(bad))}: logits are not finite")
        lp, lq = log_softmax(bb, temperature), log_softmax(gg, temperature)
        # clipped at 0: float rounding leaves tiny negatives where the two distributions are equal
        kld[s:s + step] = np.maximum((np.exp(lp) * (lp - lq)).sum(1), 0.0)
        same[s:s + step] = bb.argmax(1) == gg.argmax(1)
        dmax = max(dmax, float(np.abs(bb - gg).max(initial=0.0)))
        lmax = max(lmax, float(np.abs(bb).max(initial=0.0)))
        if nxt is not None:
            rows = np.arange(len(bb))
            nll_b[s:s + step] = -lp[rows, nxt[s:s + step]]
            nll_q[s:s + step] = -lq[rows, nxt[s:s + step]]
    return Positions(kld, same, nll_b, nll_q, dmax, lmax)


def _topk_arrays(ids: Any, logprobs: Any, tail: Any, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i, lp, t = np.asarray(ids).astype(np.int64), np.asarray(logprobs, np.float64), np.asarray(tail, np.float64)
    if i.ndim != 2 or lp.shape != i.shape or t.shape != i.shape[:1]:
        raise InputError(f"{what}: expected ids and log-probs [positions, k] and tail [positions], got "
                         f"{i.shape}, {lp.shape}, {t.shape}")
    return i, lp, t


def topk_positions(base_ids: Any, base_logprobs: Any, base_tail: Any, q_ids: Any, q_logprobs: Any, q_tail: Any,
                   next_ids: Any = None) -> Positions:
    """Figures of every position from two top-k sets (ids [N, K], log-probs [N, K] normalised over the
    full vocabulary, tail log-mass [N]). Ids < 0 (padding) carry no mass. The KLD is that of the
    partition {ids in both lists} + {the rest}: a lower bound of the full KL (see the module doc)."""
    bi, blp, bt = _topk_arrays(base_ids, base_logprobs, base_tail, "base top-k")
    qi, qlp, qt = _topk_arrays(q_ids, q_logprobs, q_tail, "Q top-k")
    if len(bi) != len(qi):
        raise InputError(f"base has {len(bi)} positions, Q has {len(qi)}")
    n = len(bi)
    nxt = _next_ids(next_ids, n)
    kld, nll_b, nll_q = (np.full(n, np.nan) for _ in range(3))
    step = max(1, BLOCK_BYTES // (8 * max(bi.shape[1] * qi.shape[1], 1)))
    for s in range(0, n, step):
        e = min(n, s + step)
        b_ids, q_ids_ = bi[s:e], qi[s:e]
        match = (b_ids[:, :, None] == q_ids_[:, None, :]) & (b_ids[:, :, None] >= 0)  # [n, Kb, Kq]
        in_b, in_q = match.any(2), match.any(1)
        lq_at_b = np.take_along_axis(qlp[s:e], match.argmax(2), 1)
        pb, pq = np.exp(blp[s:e]), np.exp(qlp[s:e])
        # The rest's mass as tail + the listed ids outside the shared set: a sum of positives, where
        # 1 - sum(shared) would cancel. Zero-mass entries (padding, an empty tail) add nothing;
        # the inf * 0 they produce in the branch np.where drops is expected.
        rest_b = np.exp(bt[s:e]) + np.where(in_b, 0.0, pb).sum(1)
        rest_q = np.exp(qt[s:e]) + np.where(in_q, 0.0, pq).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            shared = np.where(in_b & (pb > 0), pb * (blp[s:e] - np.where(in_b, lq_at_b, 0.0)), 0.0).sum(1)
            rest = np.where(rest_b > 0, rest_b * (np.log(rest_b) - np.log(rest_q)), 0.0)
        kld[s:e] = np.maximum(shared + rest, 0.0)
        if nxt is not None:
            for lp_, ids_, out in ((blp, bi, nll_b), (qlp, qi, nll_q)):
                hit = ids_[s:e] == nxt[s:e, None]
                out[s:e] = np.where(hit.any(1), -np.take_along_axis(lp_[s:e], hit.argmax(1)[:, None], 1)[:, 0], np.nan)
    return Positions(kld, bi[:, 0] == qi[:, 0], nll_b, nll_q)


# --- reductions ---------------------------------------------------------------------------------


def mean_and_unc(v: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and its standard error (0 for n <= 10)."""
    n = len(v)
    if n == 0:
        return math.nan, 0.0
    f = float(v.mean())
    var = float((v * v).mean()) - f * f
    return f, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    return (float((a * b).mean()) - float(a.mean()) * float(b.mean())) / (n - 1) if n >= 10 else 0.0


def distribution(v: np.ndarray) -> Distribution:
    mean, unc = mean_and_unc(v)
    if len(v) == 0:
        return Distribution(mean, unc, **{name: math.nan for _, _, name in LEVELS})
    qs = np.quantile(v, [f for _, f, _ in LEVELS])
    return Distribution(mean, unc, **{name: float(x) for (_, _, name), x in zip(LEVELS, qs)})


def perplexity(nll_q: np.ndarray, nll_base: np.ndarray) -> Perplexity:
    lq, uq = mean_and_unc(nll_q)
    lb, ub = mean_and_unc(nll_base)
    cov = _covariance(nll_q, nll_base)
    ppl_q, ppl_b = math.exp(lq), math.exp(lb)
    ln_ratio_unc = math.sqrt(max(uq * uq + ub * ub - 2 * cov, 0.0))
    ratio = math.exp(lq - lb)
    diff_var = (ppl_q * uq) ** 2 + (ppl_b * ub) ** 2 - 2 * ppl_q * ppl_b * cov
    return Perplexity(ppl_q, ppl_q * uq, ppl_b, ppl_b * ub, cov / (uq * ub) if uq > 0 and ub > 0 else None,
                      lq - lb, ln_ratio_unc, ratio, ratio * ln_ratio_unc, ppl_q - ppl_b, math.sqrt(max(diff_var, 0.0)))


class KLDivergence:
    """Accumulates Positions block by block; report() reduces them all in float64."""

    def __init__(self, *, temperature: float = 1.0, lower_bound: bool = False):
        self.temperature = temperature
        self.lower_bound = lower_bound
        self._kld: list[np.ndarray] = []
        self._nll_b: list[np.ndarray] = []
        self._nll_q: list[np.ndarray] = []
        self._same = 0
        self._dmax: float | None = None
        self._lmax: float | None = None

    def add(self, p: Positions) -> None:
        self._kld.append(p.kld)
        self._nll_b.append(p.nll_base)
        self._nll_q.append(p.nll_q)
        self._same += int(p.same_top.sum())
        if not math.isnan(p.max_abs_dlogit):
            self._dmax = max(self._dmax or 0.0, p.max_abs_dlogit)
            self._lmax = max(self._lmax or 0.0, p.max_abs_logit)

    def report(self, notes: Sequence[str] = ()) -> KLReport:
        kld = np.concatenate(self._kld) if self._kld else np.zeros(0)
        nll_b = np.concatenate(self._nll_b) if self._nll_b else np.zeros(0)
        nll_q = np.concatenate(self._nll_q) if self._nll_q else np.zeros(0)
        n = len(kld)
        if n == 0:
            raise InputError("no positions to compare (every row is shorter than 2 tokens or masked out)")
        missing = int((np.isnan(nll_b) | np.isnan(nll_q)).sum())
        same = self._same / n
        ppl = dp = rms = rms_unc = None
        if missing == 0:
            ppl = perplexity(nll_q, nll_b)
            p_diff = np.exp(-nll_q) - np.exp(-nll_b)
            dp = distribution(p_diff)
            mse, mse_unc = mean_and_unc(p_diff * p_diff)
            rms = math.sqrt(mse)
            rms_unc = 0.5 / rms * mse_unc if rms > 0 else 0.0
        return KLReport(
            positions=n, temperature=self.temperature, kld_lower_bound=self.lower_bound, kld=distribution(kld),
            same_top_p=same, same_top_p_unc=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
            perplexity=ppl, dp=dp, rms_dp=rms, rms_dp_unc=rms_unc, missing_next=missing,
            max_abs_dlogit=self._dmax, max_abs_logit=self._lmax, notes=tuple(notes))


def compare_logits(base: Any, q: Any, next_ids: Any = None, *, temperature: float = 1.0) -> KLReport:
    """One call for two sets of dense logits ([positions, vocab] arrays, or lists of [T_i, vocab]
    arrays): the report of KL(base || Q) and the rest."""
    acc = KLDivergence(temperature=temperature)
    acc.add(dense_positions(base, q, next_ids, temperature=temperature))
    return acc.report()
