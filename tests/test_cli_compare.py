"""`q4k-engine compare A B`: two runs' signal directories (written to the documented layout from the
demo teacher and from a second synthetic model) and two model files over a dataset. Identical
teachers give KL 0 and same top p 100%; different ones a positive KL, the same figures as
engine/distill/stats.py computes on the logits directly."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

import q4k_engine
from q4k_engine.cli.main import main
from q4k_engine.distill.stats import compare_logits
from q4k_engine.synthetic import write_synthetic

from signals_dirs import teacher_rows, write_signals


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, module_seed):
    other = write_synthetic(tmp_path_factory.mktemp("models") / "other.apr", "llama", "apr", seed=module_seed + 1)
    return q4k_engine.load("demo", device="cpu"), q4k_engine.load(other, device="cpu"), other


def _seqs(rng, vocab):
    return [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(1, 24, 9)]


def _run(*args):
    """(exit code, stdout, stderr)."""
    r = CliRunner().invoke(main, ["compare", *map(str, args)])
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_directories(tmp_path, rng, teachers, kind):
    demo, other, _ = teachers
    seqs = _seqs(rng, demo.vocab_size)
    a_rows, b_rows = teacher_rows(demo, seqs), teacher_rows(other, seqs)
    a = write_signals(tmp_path / "a", a_rows, kind, k=16)
    a2 = write_signals(tmp_path / "a2", a_rows, kind, k=16)
    b = write_signals(tmp_path / "b", b_rows, kind, k=16)

    code, out, err = _run(a, a2, "--json")
    assert code == 0, out
    same = json.loads(out)
    assert same["kld"]["max"] == 0.0 and same["same_top_p"] == 1.0
    assert same["kld_lower_bound"] == (kind == "topk")

    code, out, err = _run(a, b, "--json")
    assert code == 0, out
    diff = json.loads(out)
    n = sum(len(s) - 1 for s in seqs)
    assert diff["positions"] == n and diff["kld"]["mean"] > 0 and diff["same_top_p"] < 1.0
    direct = compare_logits([r[2][:-1] for r in a_rows], [r[2][:-1] for r in b_rows], [np.array(s[1:]) for s in seqs])
    if kind == "dense":
        assert diff["kld"]["mean"] == pytest.approx(direct.kld.mean, rel=1e-6)
        assert diff["perplexity"]["ppl_q"] == pytest.approx(direct.perplexity.ppl_q, rel=1e-6)
        assert diff["same_top_p"] == direct.same_top_p
    else:  # a lower bound of the dense figure, position by position
        assert 0 < diff["kld"]["mean"] <= direct.kld.mean + 1e-9 and diff["kld"]["max"] <= direct.kld.max + 1e-9

    code, text, _ = _run(a, b)
    assert code == 0 and "Mean    KLD:" in text and "Same top p:" in text and "99.9%   KLD:" in text
    assert ("lower bound" in text) == (kind == "topk")


def test_models_over_a_dataset(tmp_path, rng, teachers):
    demo, other, other_path = teachers
    seqs = _seqs(rng, demo.vocab_size)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in seqs) + json.dumps({"text": "The ferry"}) + "\n")
    code, out, err = _run("demo", "demo", "--input", data, "--device", "cpu", "--json")
    assert code == 0, out
    same = json.loads(out)
    assert same["kld"]["max"] == 0.0 and same["same_top_p"] == 1.0 and same["perplexity"]["ppl_ratio"] == 1.0
    code, out, err = _run("demo", other_path, "--input", data, "--device", "cpu", "--json", "--batch-tokens", 64)
    assert code == 0, out
    diff = json.loads(out)
    all_seqs = seqs + [demo.encode("The ferry")]
    (la, n), (lb, _) = demo.logits_per_position(all_seqs), other.logits_per_position(all_seqs)
    direct = compare_logits([la[i, :k - 1] for i, k in enumerate(n)], [lb[i, :k - 1] for i, k in enumerate(n)],
                            [np.array(s[1:]) for s in all_seqs])
    assert diff["positions"] == direct.positions and diff["kld"]["mean"] == pytest.approx(direct.kld.mean, rel=1e-5)
    assert diff["perplexity"]["ppl_base"] == pytest.approx(direct.perplexity.ppl_base, rel=1e-5)


def test_fp8_drift_of_one_model(rng, teachers):
    """`compare M M --precision-b fp8`: the FP8 mode against fp16 on the same tokens (emulated on the
    CPU): the same figures as the two teachers' logits compared directly."""
    demo = teachers[0]
    seq = rng.integers(0, demo.vocab_size, 150).tolist()  # one forward of >= 129 tokens: FP8 products
    code, out, err = _run("demo", "demo", "--tokens", ",".join(map(str, seq)), "--device", "cpu", "--json",
                          "--precision-b", "fp8")
    assert code == 0, out
    got = json.loads(out)
    (la, _), (lb, _) = demo.logits_per_position([seq]), q4k_engine.load("demo", device="cpu", precision="fp8").logits_per_position([seq])
    direct = compare_logits([la[0, :-1]], [lb[0, :-1]], [np.array(seq[1:])])
    assert got["kld"]["mean"] > 0 and got["kld"]["mean"] == pytest.approx(direct.kld.mean, rel=1e-5)


def test_bad_input(tmp_path, rng, teachers):
    demo, other, other_path = teachers
    seqs = _seqs(rng, demo.vocab_size)
    a = write_signals(tmp_path / "a", teacher_rows(demo, seqs), "dense")
    t = write_signals(tmp_path / "t", teacher_rows(demo, seqs), "topk")
    fewer = write_signals(tmp_path / "f", teacher_rows(demo, seqs[:-1]), "dense")
    for args, message in (
        ((a, other_path), "is a directory and"),
        ((a, t), "holds dense signals and .* topk"),
        ((a, fewer), r"has 9 rows \(of 9\), .* 8 \(of 8\): not the same dataset"),
        ((a, a, "--tokens", "1,2"), "are for two model files"),
        ((a, a, "--precision-b", "fp8"), "--precision-a/-b are for two model files"),
        (("demo", other_path), "two model files: give exactly one input"),
        ((tmp_path / "missing.gguf", "demo", "--tokens", "1,2"), "no such model file"),
    ):
        code, out, err = _run(*args)
        assert code == 2, out
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("q4k-engine: error:"), out
        assert re.search(message, lines[0]), (message, lines[0])
