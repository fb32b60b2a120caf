"""`q4k-engine logits`: printing, the three file formats, and bad input (one line, exit 2, no file)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import q4k_engine
from q4k_engine.cli.main import main
from q4k_engine.convert import save_model
from q4k_engine.synthetic import synthetic_model

from cli_checks import assert_one_line_error


def invoke(*args: str):
    return CliRunner().invoke(main, ["logits", "--device", "cpu", *args])


def test_print_top_k_per_position(demo):
    r = invoke("--model", "demo", "--text", "the cat sat", "--top-k", "3")
    assert r.exit_code == 0, r.output
    ids = demo.encode("the cat sat")
    lines = r.stdout.splitlines()
    assert lines[0] == f"sequence 0 ({len(ids)} tokens)"
    assert len(lines) == 1 + len(ids)
    vals, idx, *_ = demo.topk_logprobs([ids], 3)
    last = lines[-1]
    assert f"{vals[0, -1, 0]:.3f}" in last and last.count(" -> ") == 1
    assert json.dumps(demo.tokenizer.token_text(int(idx[0, -1, 0])), ensure_ascii=False) in last


def test_print_last_position_for_several_sequences():
    r = invoke("--model", "demo", "--tokens", "5,6,7", "--tokens", "8 9", "--positions", "last")
    assert r.exit_code == 0, r.output
    assert [ln.split()[0] for ln in r.stdout.splitlines()] == ["sequence", "2", "sequence", "1"]
    assert len(r.stdout.splitlines()[1].split(" -> ")[1].split("  ")) == 5  # default top-5


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_out_file_padded_with_lengths(demo, tmp_path, suffix):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": "hello there world"}) + "\n\n" + json.dumps({"input_ids": [3, 4]}) + "\n")
    out = tmp_path / f"logits{suffix}"
    r = invoke("--model", "demo", "--input", str(jsonl), "--out", str(out), "--dtype", "float16")
    assert r.exit_code == 0, r.output
    if suffix == ".npz":
        data = dict(np.load(out))
    else:
        from safetensors.numpy import load_file

        data = load_file(out)
    seqs = [demo.encode("hello there world"), [3, 4]]
    ref, lengths = demo.logits_per_position(seqs, dtype="float16")
    assert data["logits"].dtype == np.float16 and np.array_equal(data["logits"], ref)
    assert data["lengths"].tolist() == lengths.tolist() == [len(seqs[0]), 2]
    assert data["input_ids"][1].tolist() == [3, 4] + [-1] * (len(seqs[0]) - 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", out.name]  # no temporary left


def test_out_npy_last_positions(demo, tmp_path):
    out = tmp_path / "last.npy"
    r = invoke("--model", "demo", "--tokens", "1,2,3", "--tokens", "4", "--positions", "last", "--out", str(out))
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.load(out), demo.logits_for_batch([[1, 2, 3], [4]]))


def test_npy_refuses_ragged_all_positions(tmp_path):
    out = tmp_path / "x.npy"
    assert_one_line_error(invoke("--model", "demo", "--tokens", "1,2,3", "--tokens", "4", "--out", str(out)),
                          ".npz or .safetensors")
    assert not out.exists()


@pytest.mark.parametrize("args, fragments", [
    (["--tokens", "1,2,x"], ["--tokens #0, position 2", "'x'"]),
    (["--tokens", "1,2,100000"], ["sequence 0, position 2", "100000 is outside"]),
    (["--tokens", "-3"], ["sequence 0, position 0", "-3"]),
    (["--tokens", " , "], ["no token ids"]),
    (["--tokens", "1,,2"], ["--tokens #0, position 1", "empty entry"]),
    (["--tokens", "1,2,"], ["--tokens #0, position 2", "empty entry"]),
    (["--tokens", "1", "--text", "hi"], ["exactly one input"]),
    ([], ["exactly one input"]),
])
def test_bad_input_is_one_line_and_leaves_no_file(tmp_path, args, fragments):
    out = tmp_path / "out.npz"
    assert_one_line_error(invoke("--model", "demo", *args, "--out", str(out)), *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, fragments", [
    ('{"text": "ok"}\nnot json\n', [":2:", "not JSON"]),
    ('{"text": "ok"}\n{"input_ids": [1, "a"]}\n', ["in.jsonl:2:", "position 1"]),  # file:line, not "sequence 1"
    ('{"text": "ok"}\n{"input_ids": [1, 99999]}\n', ["in.jsonl:2:", "99999"]),
    ('{"input_ids": 5}\n', [":1:", "input_ids"]),
    ('{"text": "a", "input_ids": [1]}\n', [":1:", "mixed row kinds"]),
    ('{"text": 3}\n', ['"text" must be a string']),
    ("\n\n", ["no rows"]),
])
def test_bad_jsonl(tmp_path, content, fragments):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    out = tmp_path / "out.safetensors"
    assert_one_line_error(invoke("--model", "demo", "--input", str(src), "--out", str(out)), *fragments)
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".out*"))


def test_bad_model_and_paths(tmp_path):
    assert_one_line_error(invoke("--model", str(tmp_path / "nope.gguf"), "--tokens", "1"), "no such model")
    assert_one_line_error(invoke("--model", "demo", "--tokens", "1", "--out", str(tmp_path / "x.csv")),
                          "unknown output type")
    assert_one_line_error(invoke("--model", "demo", "--tokens", "1", "--out", str(tmp_path / "no" / "x.npz")),
                          "no such directory")
    assert_one_line_error(invoke("--model", "demo", "--input", str(tmp_path / "missing.jsonl")), "no such input")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    assert_one_line_error(invoke("--model", str(junk), "--tokens", "1"), "junk.gguf")


def test_text_without_tokenizer(tmp_path):
    import dataclasses

    path = save_model(tmp_path / "m.apr", dataclasses.replace(synthetic_model("llama"), tokenizer=None), "apr")
    assert_one_line_error(invoke("--model", str(path), "--text", "hi"), "no tokenizer")
    r = invoke("--model", str(path), "--tokens", "1,2", "--top-k", "2")
    assert r.exit_code == 0 and "#" in r.stdout  # ids shown as #id without a tokenizer


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from q4k_engine.cli import logits as cmd

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(cmd.np, "savez", boom)
    out = tmp_path / "x.npz"
    out.write_bytes(b"old")  # an existing file is replaced only by a complete new one
    assert_one_line_error(invoke("--model", "demo", "--tokens", "1,2", "--out", str(out)), "cannot write", "disk full")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]


def test_tokens_separators():
    from q4k_engine.cli.logits import parse_tokens

    assert parse_tokens("1,2,3", "t") == parse_tokens(" 1, 2 ,3 ", "t") == parse_tokens("1 2  3", "t") == [1, 2, 3]


def test_top_k_with_a_logits_file_is_refused(tmp_path):
    """--top-k used to be silently ignored with --out FILE: now one line, before any work."""
    out = tmp_path / "x.npz"
    assert_one_line_error(invoke("--model", "demo", "--tokens", "1,2", "--top-k", "3", "--out", str(out)),
                          "--top-k", "--out DIR/")
    assert not out.exists()


def test_sequence_longer_than_the_context(demo, tmp_path):
    n = demo.config.context_length + 3
    ids = ",".join(["5"] * n)
    assert_one_line_error(invoke("--model", "demo", "--tokens", ids), f"{n} tokens", "context length", "--max-seq-len")
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"input_ids": [5] * n}) + "\n")
    assert_one_line_error(invoke("--model", "demo", "--input", str(src), "--positions", "last"), "long.jsonl:1:",
                          "context length")
    r = invoke("--model", "demo", "--tokens", ids, "--tokens", "1,2", "--max-seq-len", "4", "--positions", "last")
    assert r.exit_code == 0, r.output
    assert "truncated 1 of 2 sequence(s) to --max-seq-len 4" in r.stderr
    assert r.stdout.splitlines()[0] == "sequence 0 (4 tokens)"


@pytest.mark.parametrize("tokens, seconds, expect", [
    (3, 1000.0, "0.00300 tokens/s, 333333 ms/token"),
    (12345, 2.0, "6172 tokens/s, 0.162 ms/token"),
    (5, 0.5, "10.0 tokens/s, 100 ms/token"),
])
def test_rate_never_reads_zero(tokens, seconds, expect):
    from q4k_engine.cli.logits import rate

    assert rate(tokens, seconds) == expect


def test_rate_line_after_a_run():
    r = invoke("--model", "demo", "--tokens", "1,2,3")
    assert r.exit_code == 0
    line = [ln for ln in r.stderr.splitlines() if "tokens/s" in ln][0]
    assert " 0 tokens/s" not in line and "ms/token" in line


def test_chat_template_file(tmp_path):
    """--chat-template gives chat rows a template the model file lacks; without it they are refused
    in one line naming the flag; a template that does not compile is one line too."""
    import dataclasses

    import pyarrow.parquet as pq

    model = synthetic_model("llama")
    path = save_model(tmp_path / "m.apr", dataclasses.replace(model, tokenizer=dataclasses.replace(model.tokenizer, chat_template=None)), "apr",
                      keep_ggml_codes=True)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    assert_one_line_error(invoke("--model", str(path), "--input", str(data), "--out", str(tmp_path / "none") + "/"),
                          "chat template", "--chat-template")
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}")
    r = invoke("--model", str(path), "--input", str(data), "--chat-template", str(template), "--assistant-only",
               "--top-k", "4", "--out", str(tmp_path / "sig") + "/")
    assert r.exit_code == 0, r.output
    table = pq.read_table(tmp_path / "sig" / "shard-00000.parquet")
    ids = table.column("input_ids")[0].as_py()
    mask = table.column("target_mask")[0].as_py()
    teacher = q4k_engine.load(path, device="cpu")
    assert ids == teacher.encode("<user>hi</s><assistant>yo</s>", add_bos=False)
    assert any(mask) and not all(mask[:-1])  # only the assistant's answer is a target
    template.write_text("{% for m in messages %}")
    assert_one_line_error(invoke("--model", str(path), "--input", str(data), "--chat-template", str(template),
                                 "--out", str(tmp_path / "bad") + "/"), "does not compile")
    assert_one_line_error(invoke("--model", str(path), "--tokens", "1,2", "--chat-template", str(template)),
                          "--chat-template")
