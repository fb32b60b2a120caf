"""engine/distill/stats.py: llama-perplexity's KL-divergence statistics against a direct float64
computation written here (llama.cpp's running sums), against cases small enough to do by hand, and
the top-k form as a lower bound of the dense KL."""
from __future__ import annotations

import math

import numpy as np
import pytest

from q4k_engine.distill.stats import (KLDivergence, compare_logits, dense_positions, mean_and_unc,
                                      topk_positions)
from q4k_engine.errors import InputError


def _lsm(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def _llama_mean_unc(sum_, sum2, n):
    f = sum_ / n
    d = sum2 / n - f * f
    return f, (math.sqrt(d / (n - 1)) if d > 0 and n > 10 else 0.0)


def test_dense_matches_direct_float64(rng):
    n, vocab = int(rng.integers(120, 400)), int(rng.integers(5, 300))
    base = rng.normal(0, 2, (n, vocab)).astype(np.float32)
    q = (base + rng.normal(0, 0.3, (n, vocab))).astype(np.float32)
    nxt = rng.integers(0, vocab, n)
    r = compare_logits(base, q, nxt)

    lp, lq = _lsm(base), _lsm(q)
    kld = np.array([sum(math.exp(a) * (a - b) for a, b in zip(lp[i], lq[i])) for i in range(n)])
    nll_b, nll_q = -lp[np.arange(n), nxt], -lq[np.arange(n), nxt]
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    assert r.positions == n and not r.kld_lower_bound and r.missing_next == 0
    m, u = _llama_mean_unc(kld.sum(), (kld * kld).sum(), n)
    assert r.kld.mean == pytest.approx(m, rel=1e-10) and r.kld.mean_unc == pytest.approx(u, rel=1e-8)
    for name, pct in (("max", 100), ("p99_9", 99.9), ("p99", 99), ("p95", 95), ("p90", 90), ("median", 50),
                      ("p10", 10), ("p5", 5), ("p1", 1), ("p0_1", 0.1), ("min", 0)):
        assert getattr(r.kld, name) == pytest.approx(np.percentile(kld, pct), rel=1e-9, abs=1e-15), name
    assert r.same_top_p == pytest.approx(np.mean(base.argmax(1) == q.argmax(1)))
    p = r.same_top_p
    assert r.same_top_p_unc == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    lq_mean, uq = _llama_mean_unc(nll_q.sum(), (nll_q ** 2).sum(), n)
    lb_mean, ub = _llama_mean_unc(nll_b.sum(), (nll_b ** 2).sum(), n)
    cov = ((nll_q * nll_b).sum() / n - lq_mean * lb_mean) / (n - 1)
    pp = r.perplexity
    assert pp.ppl_q == pytest.approx(math.exp(lq_mean), rel=1e-10)
    assert pp.ppl_base == pytest.approx(math.exp(lb_mean), rel=1e-10)
    assert pp.ppl_q_unc == pytest.approx(math.exp(lq_mean) * uq, rel=1e-8)
    assert pp.cor_ln_ppl == pytest.approx(cov / (uq * ub), rel=1e-6)
    assert pp.ln_ppl_ratio == pytest.approx(lq_mean - lb_mean, rel=1e-8, abs=1e-12)
    assert pp.ln_ppl_ratio_unc == pytest.approx(math.sqrt(uq ** 2 + ub ** 2 - 2 * cov), rel=1e-6)
    assert pp.ppl_ratio == pytest.approx(math.exp(lq_mean - lb_mean), rel=1e-10)
    assert pp.ppl_diff == pytest.approx(math.exp(lq_mean) - math.exp(lb_mean), rel=1e-8, abs=1e-9)
    m, u = _llama_mean_unc(dp.sum(), (dp ** 2).sum(), n)
    assert r.dp.mean == pytest.approx(m, rel=1e-9, abs=1e-15) and r.dp.mean_unc == pytest.approx(u, rel=1e-7)
    assert r.dp.p75 == pytest.approx(np.percentile(dp, 75), abs=1e-15)
    mse, mse_u = _llama_mean_unc((dp ** 2).sum(), (dp ** 4).sum(), n)
    assert r.rms_dp == pytest.approx(math.sqrt(mse), rel=1e-9)
    assert r.rms_dp_unc == pytest.approx(0.5 / math.sqrt(mse) * mse_u, rel=1e-6)
    assert r.max_abs_dlogit == pytest.approx(np.abs(base - q).max())
    assert r.max_abs_logit == pytest.approx(np.abs(base).max())


def test_hand_computed_two_token_case():
    # base p = (1/2, 1/2), Q q = (0.9, 0.1); next token 0 at both positions
    base = np.zeros((2, 2))
    q = np.log(np.array([[0.9, 0.1], [0.9, 0.1]]))
    r = compare_logits(base, q, [0, 0])
    kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert r.kld.mean == pytest.approx(kl) and r.kld.max == pytest.approx(kl) and r.kld.mean_unc == 0.0
    assert r.same_top_p == 1.0  # the base's tie goes to the lower id, 0, as Q's argmax
    assert r.perplexity.ppl_q == pytest.approx(1 / 0.9) and r.perplexity.ppl_base == pytest.approx(2.0)
    assert r.perplexity.ln_ppl_ratio == pytest.approx(math.log(0.5 / 0.9))
    assert r.dp.mean == pytest.approx(0.4) and r.rms_dp == pytest.approx(0.4)
    assert r.perplexity.cor_ln_ppl is None  # no spread, no correlation (llama.cpp divides by zero)


def test_hand_computed_uncertainties_and_percentiles():
    v = np.array([0.0, 1.0] * 6)  # n = 12: mean 1/2, E[v^2] - mean^2 = 1/4
    assert mean_and_unc(v) == (0.5, pytest.approx(math.sqrt(0.25 / 11)))
    assert mean_and_unc(v[:10])[1] == 0.0  # llama.cpp gives no error bar for n <= 10
    # same top p: 3 of 4 agree -> sqrt(0.75 * 0.25 / 3) = 0.25
    base = np.eye(4)
    q = np.eye(4)
    q[3] = [1, 0, 0, 0]
    r = compare_logits(base, q)
    assert r.same_top_p == 0.75 and r.same_top_p_unc == pytest.approx(0.25)
    # percentiles interpolate at fraction * (n - 1): KLDs 0 (3 positions) and one x
    x = r.kld.max
    assert x > 0 and r.kld.p99 == pytest.approx(0.97 * x) and r.kld.median == 0.0
    assert r.perplexity is None and r.missing_next == 4  # no next tokens given


def test_identical_inputs(rng):
    a = rng.normal(0, 3, (57, 91))
    r = compare_logits(a, a.copy(), rng.integers(0, 91, 57))
    assert r.kld.max == 0.0 and r.same_top_p == 1.0 and r.rms_dp == 0.0
    assert r.perplexity.ppl_ratio == 1.0 and r.max_abs_dlogit == 0.0


def test_blocks_accumulate_like_one_call(rng, monkeypatch):
    """Positions added in several blocks (and computed in small row blocks) give the one-call figures."""
    import q4k_engine.distill.stats as stats

    base, q = rng.normal(0, 2, (90, 40)), rng.normal(0, 2, (90, 40))
    nxt = rng.integers(0, 40, 90)
    whole = compare_logits(base, q, nxt)
    monkeypatch.setattr(stats, "BLOCK_BYTES", 8 * 40 * 7)  # 7 rows per block
    acc = KLDivergence()
    for s in (slice(0, 13), slice(13, 14), slice(14, 90)):
        acc.add(dense_positions(base[s], q[s], nxt[s]))
    assert acc.report() == whole


def test_topk_is_a_lower_bound_equal_at_full_vocabulary(rng):
    n, vocab = 200, int(rng.integers(8, 60))
    base = rng.normal(0, 2, (n, vocab))
    q = base + rng.normal(0, 0.7, (n, vocab))
    nxt = rng.integers(0, vocab, n)
    dense = dense_positions(base, q, nxt)

    def topk(x, k):
        lp = _lsm(x)
        ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
        vals = np.take_along_axis(lp, ids, 1)
        with np.errstate(divide="ignore"):
            tail = np.log(np.maximum(1 - np.exp(vals).sum(1), 0)) if k < x.shape[1] else np.full(len(x), -np.inf)
        return ids, vals, tail

    for kb, kq in ((1, 1), (3, 5), (int(rng.integers(1, vocab)), int(rng.integers(1, vocab))), (vocab, vocab)):
        got = topk_positions(*topk(base, kb), *topk(q, kq), nxt)
        assert (got.kld <= dense.kld + 1e-12).all(), (kb, kq)
        np.testing.assert_array_equal(got.same_top, dense.same_top)
    np.testing.assert_allclose(got.kld, dense.kld, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(got.nll_q, dense.nll_q, rtol=1e-12)

    # K < V against the partition written out by hand, one position at a time
    kb, kq = 4, 6
    tb, tq = topk(base, kb), topk(q, kq)
    got = topk_positions(*tb, *tq, nxt)
    lp, lq = _lsm(base), _lsm(q)
    for i in range(n):
        shared = sorted(set(tb[0][i]) & set(tq[0][i]))
        p_rest = 1 - sum(math.exp(lp[i, j]) for j in shared)
        q_rest = 1 - sum(math.exp(lq[i, j]) for j in shared)
        want = sum(math.exp(lp[i, j]) * (lp[i, j] - lq[i, j]) for j in shared) + p_rest * math.log(p_rest / q_rest)
        assert got.kld[i] == pytest.approx(max(want, 0.0), rel=1e-7, abs=1e-12)
    in_both = np.array([nxt[i] in tb[0][i] and nxt[i] in tq[0][i] for i in range(n)])
    acc = KLDivergence(lower_bound=True)
    acc.add(got)
    r = acc.report()
    assert r.kld_lower_bound and r.missing_next == int((~in_both).sum())
    if not in_both.all():
        assert r.perplexity is None and r.dp is None and "not available" in r.text()


def test_topk_padding_ids_carry_no_mass():
    ids = np.array([[2, 0, -1]])
    lp = np.log(np.array([[0.6, 0.4, 1.0]]))
    lp[0, 2] = -np.inf
    tail = np.array([-np.inf])
    same = topk_positions(ids, lp, tail, ids, lp, tail, [2])
    assert same.kld[0] == 0.0 and same.nll_q[0] == pytest.approx(-math.log(0.6))


def test_errors(rng):
    with pytest.raises(InputError, match="differ in shape"):
        compare_logits(np.zeros((3, 4)), np.zeros((3, 5)))
    bad = rng.normal(size=(4, 6))
    bad[2, 1] = np.nan
    with pytest.raises(InputError, match="position 2: logits are not finite"):
        compare_logits(bad, np.zeros((4, 6)))
    with pytest.raises(InputError, match="next token ids must lie"):
        compare_logits(np.zeros((2, 4)), np.zeros((2, 4)), [0, 4])
    with pytest.raises(InputError, match="no positions"):
        KLDivergence().report()


def test_text_uses_llama_perplexity_labels(rng):
    base = rng.normal(size=(30, 12))
    text = compare_logits(base, base + rng.normal(0, 0.1, base.shape), rng.integers(0, 12, 30)).text()
    for label in ("====== Perplexity statistics ======", "Mean PPL(Q)                   :", "Mean PPL(base)",
                  "Cor(ln(PPL(Q)), ln(PPL(base))):", "Mean ln(PPL(Q)/PPL(base))     :", "Mean PPL(Q)/PPL(base)",
                  "====== KL divergence statistics ======", "Mean    KLD:", "Maximum KLD:", "99.9%   KLD:",
                  "99.0%   KLD:", "Median  KLD:", " 0.1%   KLD:", "Minimum KLD:",
                  "====== Token probability statistics ======", "Mean    Δp:", "RMS Δp    :", "Same top p:"):
        assert label in text, label
    assert "75.0%   KLD" not in text and "75.0%   Δp" in text
