"""Greedy generation with a KV cache (engine/generate.py) on the NumPy backend, and `q4k-engine generate`.

The oracle is the definition of greedy decoding: each new token is the argmax of one full forward
(no cache) over the prompt and the tokens generated before it. Random synthetic models have
near-tied top logits, so a token is accepted when its logit is within float noise of the maximum.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

import q4k_engine
from q4k_engine.backend import Batch
from q4k_engine.backend_cpu import NumpyBackend
from q4k_engine.cli.main import main
from q4k_engine.errors import InputError
from q4k_engine.forward import forward, upload
from q4k_engine.generate import generate
from q4k_engine.convert import save_model
from q4k_engine.synthetic import synthetic_model

# mistral: window 16, gemma3: window 8 (and a global layer): prompts + new tokens run past both.
ARCHS = ("llama", "mistral", "qwen2", "gemma3")


@pytest.fixture(scope="module")
def loaded(module_seed):
    """arch -> (model, backend, uploaded weights)."""
    rng = np.random.default_rng(module_seed)
    out = {}
    for arch in ARCHS:
        model = synthetic_model(arch, seed=int(rng.integers(2**31)))
        be = NumpyBackend()
        out[arch] = (model, be, upload(model, be))
    return out


def assert_greedy(model, be, w, prompts: list[list[int]], tokens: list[list[int]], rel_tol: float) -> float:
    """Every new token is (up to rel_tol of the logit scale) the argmax of a full forward over its
    prompt and the new tokens before it; returns the fraction that are the exact argmax.

    One causal forward without cache over prompt + new[:-1] of every sequence, packed, gives all
    those logits at once: row len(prompt) - 1 + t predicts new token t.
    """
    seqs = [p + t[:-1] for p, t in zip(prompts, tokens)]
    logits = be.to_numpy(forward(model.config, w, be, np.concatenate(seqs), Batch.from_lengths([len(s) for s in seqs])))
    start, exact = 0, []
    for p, new, s in zip(prompts, tokens, seqs):
        rows = logits[start + len(p) - 1:start + len(s)]
        start += len(s)
        for t, (row, tok) in enumerate(zip(rows, new)):
            gap = float(row.max() - row[tok])
            assert gap <= rel_tol * max(1.0, float(np.abs(row).max())), \
                f"{model.config.arch}: new token {t} is {tok}, {gap:.3g} below the argmax {int(row.argmax())}"
            exact.append(gap == 0.0)
    return float(np.mean(exact))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_equals_full_forwards(arch, loaded, rng):
    model, be, w = loaded[arch]
    v = model.config.vocab_size
    prompts = [rng.integers(0, v, n).tolist() for n in (9, 3)]
    g = generate(model.config, w, be, [np.array(p) for p in prompts], 10)
    assert g.mode == "eager" and g.note is None
    assert [len(t) for t in g.tokens] == [10, 10] and len(g.step_seconds) == 9
    assert all(0 <= x < v for t in g.tokens for x in t)
    assert assert_greedy(model, be, w, prompts, g.tokens, 1e-5) >= 0.9


@pytest.mark.parametrize("arch", ("mistral", "qwen2"))
def test_batch_of_different_lengths_equals_each_alone(arch, loaded, rng):
    model, be, w = loaded[arch]
    prompts = [rng.integers(0, model.config.vocab_size, n) for n in (9, 1, 20)]
    together = generate(model.config, w, be, prompts, 8).tokens
    for p, got in zip(prompts, together):
        assert generate(model.config, w, be, [p], 8).tokens[0] == got


def test_eos_stops_each_sequence(loaded, rng):
    model, be, w = loaded["qwen2"]
    c = model.config
    prompts = [rng.integers(0, c.vocab_size, n) for n in (6, 11, 3)]
    free = generate(c, w, be, prompts, 9).tokens
    eos = free[1][3]  # sequence 1 stops at its 4th new token or earlier; the others where eos occurs
    g = generate(c, w, be, prompts, 9, eos_id=eos)
    for want, got in zip(free, g.tokens):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert got == want[:cut]
    assert len(g.tokens[1]) <= 4
    assert len(g.step_seconds) == max(len(t) for t in g.tokens) - 1


def test_teacher_generate_uses_metadata_eos(loaded, rng):
    model, be, _ = loaded["llama"]
    prompt = rng.integers(0, model.config.vocab_size, 7).tolist()
    free = q4k_engine.TeacherModel(model, be).generate([prompt], 6).tokens[0]
    spec = dataclasses.replace(model.tokenizer, eos_id=free[2])
    teacher = q4k_engine.TeacherModel(dataclasses.replace(model, tokenizer=spec), be)
    assert teacher.generate([prompt], 6).tokens[0] == free[:free.index(free[2]) + 1]
    assert teacher.generate([prompt], 6, ignore_eos=True).tokens[0] == free


def test_bad_arguments(loaded):
    model, be, w = loaded["llama"]
    c = model.config
    for n in (0, -1, 2.0, True):
        with pytest.raises(InputError, match="max_new_tokens"):
            generate(c, w, be, [np.array([1, 2])], n)
    with pytest.raises(InputError, match="context length"):
        generate(c, w, be, [np.array([1, 2])], c.context_length)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        generate(c, w, be, [np.array([1]), np.array([], np.int32)], 2)
    teacher = q4k_engine.TeacherModel(model, be)
    with pytest.raises(InputError, match="position 1: token id 9999"):
        teacher.generate([[1, 9999]], 2)


# ------------------------------------------------------------------------------------------------
# the command


def invoke(*args: str):
    return CliRunner().invoke(main, ["generate", "--device", "cpu", *args])


def test_cli_prints_the_continuation_and_rates():
    r = invoke("--model", "demo", "--text", "The ferry leaves", "-n", "6", "--ignore-eos")
    assert r.exit_code == 0, r.output
    demo = q4k_engine.load("demo", device="cpu")
    new = demo.generate([demo.encode("The ferry leaves")], 6, ignore_eos=True).tokens[0]
    assert r.stdout == demo.decode(new, skip_special=True) + "\n"
    assert "prefill: " in r.stderr and "decode (eager): 5 tokens in 5 steps" in r.stderr
    assert r.stderr.count("tokens/s") == 2


def test_cli_batch_of_ids_without_tokenizer(tmp_path):
    path = save_model(tmp_path / "m.apr", dataclasses.replace(synthetic_model("qwen2"), tokenizer=None), "apr")
    r = invoke("--model", str(path), "--tokens", "1,2,3", "--tokens", "7", "-n", "4")
    assert r.exit_code == 0, r.output
    t = q4k_engine.load(path, device="cpu")
    want = t.generate([[1, 2, 3], [7]], 4).tokens
    assert r.stdout.splitlines() == ["--- sequence 0", ",".join(map(str, want[0])),
                                     "--- sequence 1", ",".join(map(str, want[1]))]


@pytest.mark.parametrize("args, fragment", [
    (["--tokens", "1,x"], "--tokens #0, position 1"),
    (["--tokens", "5,100000"], "100000 is outside"),
    (["--tokens", "1", "--text", "hi"], "exactly one input"),
    ([], "exactly one input"),
    (["--tokens", "1,2", "-n", "5000"], "context length"),
])
def test_cli_bad_input_is_one_line_exit_2(args, fragment):
    r = invoke("--model", "demo", *args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("q4k-engine: error: ") and fragment in lines[0], r.stderr
    assert r.stdout == ""
