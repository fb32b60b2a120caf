"""The distillation losses (engine/distill/losses.py) against direct torch computations on fresh
random inputs (seed printed): dense KL equals torch.nn.functional.kl_div on the full tensors, with
masks, temperatures, odd shapes and any chunk size; the top-k + tail form is a lower bound of it,
equal when K covers the vocabulary, and its gradient is autograd's of the direct formula; padding,
vocabulary crop/pad, and no [positions, vocab] tensor kept for the backward."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from q4k_engine.distill import kl_div_dense, kl_div_topk  # noqa: E402
from q4k_engine.errors import InputError  # noqa: E402


def _inputs(rng, lead, vocab, teacher_vocab=None, scale=3.0):
    s = torch.from_numpy(rng.normal(0, scale, lead + (vocab,)))
    t = torch.from_numpy(rng.normal(0, scale, lead + (teacher_vocab or vocab,)))
    mask = torch.from_numpy(rng.random(lead) < 0.7)
    mask.view(-1)[int(rng.integers(mask.numel()))] = True  # at least one target
    return s, t, mask


def _direct_dense(s, t, mask, temperature):
    """T^2 * mean over mask of KL(p || q), with torch's own kl_div on the full tensors."""
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1),
                                    log_target=True, reduction="none").sum(-1)
    return temperature ** 2 * (kl * mask).sum() / mask.sum()


def _topk(t, k, temperature):
    lp = torch.log_softmax(t / temperature, -1)
    vals, ids = lp.topk(k, -1)
    tail = torch.log((1 - vals.exp().sum(-1)).clamp(min=0))
    if k == t.shape[-1]:
        tail = torch.full_like(tail, float("-inf"))
    return ids, vals, tail


def _direct_topk(s, ids, lp, tail, mask, temperature):
    """The K+1-bucket KL written out on the full tensors: student tail as log(1 - sum q)."""
    lq = torch.log_softmax(s / temperature, -1)
    lq_k = lq.gather(-1, ids)
    lq_tail = torch.log(1 - lq_k.exp().sum(-1))
    kl = (lp.exp() * (lp - lq_k)).sum(-1) + tail.exp() * (tail - lq_tail)
    return temperature ** 2 * (kl * mask).sum() / mask.sum()


def _grad(fn, s):
    x = s.clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("lead", [(1, 1), (3, 7), (2, 5, 3), (13,)])
def test_dense_matches_torch_kl_div(rng, lead):
    vocab = int(rng.integers(2, 90))
    s, t, mask = _inputs(rng, lead, vocab)
    temperature = float(rng.uniform(0.5, 4.0))
    chunk = int(rng.integers(1, int(np.prod(lead)) + 3))
    ref, gref = _grad(lambda x: _direct_dense(x, t, mask, temperature), s)
    got, g = _grad(lambda x: kl_div_dense(x, t, mask, temperature=temperature, chunk=chunk), s)
    print(f"lead {lead} vocab {vocab} T {temperature:.3f} chunk {chunk}: {got.item():.6g}")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-12)
    assert got > 0


def test_dense_without_mask_is_the_mean_over_all_positions(rng):
    s, t, _ = _inputs(rng, (4, 6), 33)
    ones = torch.ones(4, 6, dtype=torch.bool)
    torch.testing.assert_close(kl_div_dense(s, t), _direct_dense(s, t, ones, 1.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision_student(rng, dtype):
    """A float32 or bf16 student: the loss is computed in float32 (close to the float64 figure) and
    the gradient comes back in the student's dtype."""
    s, t, mask = _inputs(rng, (3, 9), 71, scale=1.0)
    d = getattr(torch, dtype)
    ref, gref = _grad(lambda x: _direct_dense(x, t, mask, 2.0), s.to(d).double())
    got, g = _grad(lambda x: kl_div_dense(x, t.float(), mask, temperature=2.0, chunk=5), s.to(d))
    assert got.dtype == torch.float32 and g.dtype == d
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    tol = 1e-6 if dtype == "float32" else 1e-2 * gref.abs().max().item()
    torch.testing.assert_close(g.double(), gref, rtol=0, atol=tol)


def test_topk_is_a_lower_bound_equal_at_full_vocabulary(rng):
    lead, vocab = (3, 11), int(rng.integers(20, 70))
    s, t, mask = _inputs(rng, lead, vocab)
    temperature = float(rng.uniform(0.5, 3.0))
    dense = _direct_dense(s, t, mask, temperature)
    prev = -1.0
    for k in sorted({1, int(rng.integers(2, vocab)), vocab - 1, vocab}):
        ids, lp, tail = _topk(t, k, temperature)
        got = kl_div_topk(s, ids, lp, tail, mask, temperature=temperature, chunk=int(rng.integers(1, 40)))
        print(f"k {k}/{vocab}: top-k KL {got.item():.6g}, dense {dense.item():.6g}")
        assert got <= dense + 1e-12
        assert got >= prev - 1e-12  # a finer partition never bounds lower
        prev = got.item()
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lead", [(2, 9), (17,), (1, 3, 4)])
def test_topk_matches_direct_formula_and_its_gradient(rng, lead):
    vocab = int(rng.integers(10, 80))
    s, t, mask = _inputs(rng, lead, vocab)
    k = int(rng.integers(1, vocab))
    temperature = float(rng.uniform(0.5, 3.0))
    ids, lp, tail = _topk(t, k, temperature)
    ref, gref = _grad(lambda x: _direct_topk(x, ids, lp, tail, mask, temperature), s)
    got, g = _grad(lambda x: kl_div_topk(x, ids, lp, tail, mask, temperature=temperature,
                                         chunk=int(rng.integers(1, 10))), s)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gref, rtol=1e-8, atol=1e-11)
    # without a tail given, it is computed from the K log-probs
    torch.testing.assert_close(kl_div_topk(s, ids, lp, None, mask, temperature=temperature), ref, rtol=1e-9, atol=1e-12)


def test_full_vocabulary_gradient_equals_dense(rng):
    """K = V: the tail bucket is empty (-inf on both sides): same loss and gradient as dense, no NaN."""
    s, t, mask = _inputs(rng, (4, 5), 29)
    ids, lp, tail = _topk(t, 29, 1.5)
    ref, gref = _grad(lambda x: kl_div_dense(x, t, mask, temperature=1.5), s)
    got, g = _grad(lambda x: kl_div_topk(x, ids, lp, tail, mask, temperature=1.5, chunk=3), s)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gref, rtol=1e-9, atol=1e-12)


def test_engine_padding_carries_no_mass(rng):
    """Padded positions as the engine gives them (ids -1, log-probs and tail -inf, mask False) change
    nothing and make no NaN."""
    s, t, _ = _inputs(rng, (2, 8), 41)
    ids, lp, tail = _topk(t, 6, 1.0)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    pids, plp, ptail = ids.clone(), lp.clone(), tail.clone()
    pids[1, 5:], plp[1, 5:], ptail[1, 5:] = -1, float("-inf"), float("-inf")
    ref, gref = _grad(lambda x: kl_div_topk(x, ids, lp, tail, mask), s)
    got, g = _grad(lambda x: kl_div_topk(x, pids, plp, ptail, mask, chunk=3), s)
    assert torch.isfinite(got) and torch.isfinite(g).all()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, gref, rtol=1e-12, atol=0)
    assert not g[1, 5:].any()


def test_no_target_positions_gives_zero(rng):
    s, t, _ = _inputs(rng, (2, 3), 17)
    none = torch.zeros(2, 3, dtype=torch.bool)
    loss, g = _grad(lambda x: kl_div_dense(x, t, none), s)
    assert loss.item() == 0.0 and not g.any()
    ids, lp, tail = _topk(t, 4, 1.0)
    loss, g = _grad(lambda x: kl_div_topk(x, ids, lp, tail, none), s)
    assert loss.item() == 0.0 and not g.any()


def test_vocabulary_crop_and_pad(rng):
    lead = (2, 7)
    s, t, mask = _inputs(rng, lead, 40, teacher_vocab=47)  # teacher larger: torchtune's 152064 vs 151936
    with pytest.raises(InputError, match="teacher vocabulary 47 != student vocabulary 40"):
        kl_div_dense(s, t, mask)
    with pytest.raises(InputError, match="vocab='pad' needs"):
        kl_div_dense(s, t, mask, vocab="pad")
    torch.testing.assert_close(kl_div_dense(s, t, mask, vocab="crop", chunk=4), _direct_dense(s, t[..., :40], mask, 1.0),
                               rtol=1e-12, atol=0)
    # teacher smaller: the student's extra ids have teacher probability 0
    s2, t2, _ = _inputs(rng, lead, 47, teacher_vocab=40)
    lp, lq = torch.log_softmax(t2, -1), torch.log_softmax(s2, -1)[..., :40]
    direct = ((lp.exp() * (lp - lq)).sum(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(kl_div_dense(s2, t2, mask, vocab="pad", chunk=3), direct, rtol=1e-12, atol=0)
    with pytest.raises(InputError, match="vocab='crop' needs"):
        kl_div_dense(s2, t2, mask, vocab="crop")


def test_topk_ids_outside_the_student_vocabulary(rng):
    s, t, mask = _inputs(rng, (3, 4), 30, teacher_vocab=36)
    t[..., 33] += 3.0  # id 33 in (nearly) every top-k list, without taking all the mass
    ids, lp, tail = _topk(t, 5, 1.0)
    assert (ids >= 30).any()
    with pytest.raises(InputError, match=r"id 3\d \(position \d+\) is outside the student's vocabulary of 30"):
        kl_div_topk(s, ids, lp, tail, mask)
    # crop: ids >= 30 dropped and the teacher's remaining buckets renormalised
    keep = ids < 30
    p = torch.where(keep, lp.exp(), 0.0)
    norm = 1 - torch.where(keep, 0.0, lp.exp()).sum(-1)
    lq = torch.log_softmax(s, -1)
    lq_k = lq.gather(-1, ids.clamp(max=29))
    rest_q = 1 - torch.where(keep, lq_k.exp(), 0.0).sum(-1)
    p_tail = tail.exp() / norm
    kl = (torch.where(keep, p / norm[..., None] * (torch.log(p / norm[..., None]) - lq_k), 0.0)).sum(-1)
    kl = kl + p_tail * (torch.log(p_tail) - torch.log(rest_q))
    direct = (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(kl_div_topk(s, ids, lp, tail, mask, vocab="crop", chunk=5), direct, rtol=1e-10, atol=0)


def test_bad_arguments(rng):
    s, t, mask = _inputs(rng, (2, 3), 11)
    with pytest.raises(InputError, match="mask has shape"):
        kl_div_dense(s, t, mask[:, :2])
    with pytest.raises(InputError, match="teacher logits has shape"):
        kl_div_dense(s, t[:1], mask)
    with pytest.raises(InputError, match="temperature"):
        kl_div_dense(s, t, mask, temperature=0)
    with pytest.raises(InputError, match="vocab must be one of"):
        kl_div_dense(s, t, mask, vocab="guess")
    with pytest.raises(InputError, match="chunk"):
        kl_div_dense(s, t, mask, chunk=0)
    ids, lp, tail = _topk(t, 3, 1.0)
    with pytest.raises(InputError, match="teacher tail has shape"):
        kl_div_topk(s, ids, lp, tail[:, None], mask)


def test_backward_keeps_no_vocab_sized_intermediate(rng):
    """What autograd keeps for the backward is the inputs themselves (views of the student's logits
    and of the teacher's), never a log-softmax or other [positions, vocab] intermediate."""
    s, t, mask = _inputs(rng, (4, 64), 301)
    leaf = s.float().requires_grad_(True)
    y, t = leaf * 1.0, t.float()  # y: a non-leaf, as a model's output is
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = kl_div_dense(y, t, mask, chunk=16)
        loss_k = kl_div_topk(y, *_topk(t, 5, 1.0), mask, chunk=16)
    inputs = {y.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    large = [x for x in saved if x.numel() > mask.numel() * 5]
    assert large and all(x.untyped_storage().data_ptr() in inputs for x in large), [tuple(x.shape) for x in large]
    (loss + loss_k).backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad.any()


def test_distill_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import q4k_engine.distill, q4k_engine.distill.stats, "
            "q4k_engine.distill.reader, q4k_engine.distill.compare, q4k_engine.cli.main; "
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True)
