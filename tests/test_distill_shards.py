"""Teacher signals out, streamed (`q4k-engine logits --input ... --out DIR/`): top-k Parquet and dense
safetensors shards on the demo model, read back with pyarrow / safetensors alone and checked against
the provider's own values; resume after a failure and after a kill is byte-identical; bad
destinations and mismatched resumes are one line, exit 2; a student's vocabulary is cropped or
padded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import q4k_engine
from q4k_engine.cli.main import main
from q4k_engine.distill.rows import RowOptions, read_rows
from q4k_engine.distill.shards import MANIFEST, SignalOptions, write_signals

from cli_checks import assert_one_line_error, dir_bytes as files, disk_full_at, invoke_demo_logits as invoke
from conftest import fresh_seed
from distill_data import mixed_rows, write_jsonl

MAX_LEN = 64  # rows cut to this (and counted): keeps the CPU reference forward fast


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, demo) -> Path:
    """200 rows: text, input_ids and chat messages, in a fresh order every run."""
    seed = fresh_seed("shards dataset")
    return write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", mixed_rows(200, demo.vocab_size, seed))


def rows_of(demo, path: Path, **options):
    return list(read_rows(path, demo, RowOptions(max_seq_len=MAX_LEN, **options)))


def test_topk_parquet_end_to_end(demo, dataset, tmp_path):
    import pyarrow.parquet as pq  # a trainer needs nothing else

    out = tmp_path / "topk"
    r = invoke("--input", str(dataset), "--out", f"{out}/", "--top-k", "6", "--temperature", "1.7",
               "--shard-rows", "64", "--max-seq-len", str(MAX_LEN), "--dtype", "float16")
    assert r.exit_code == 0, r.output
    assert "tokens/s" in r.stderr and "rows truncated" in r.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["format"] == "q4k-engine-signals"
    assert [s["rows"] for s in manifest["shards"]] == [[0, 64], [64, 128], [128, 192], [192, 200]]
    o = manifest["options"]
    assert (o["kind"], o["k"], o["temperature"], o["dtype"], o["max_seq_len"]) == ("topk", 6, 1.7, "float16", MAX_LEN)
    assert o["input"]["file"] == "data.jsonl" and len(o["input"]["sha256"]) == 64
    assert manifest["model"]["vocab_size"] == demo.vocab_size and len(manifest["model"]["sha256"]) == 64
    rows = rows_of(demo, dataset)
    assert manifest["stats"]["rows"] == 200 and manifest["stats"]["tokens"] == sum(len(x.input_ids) for x in rows)
    import pyarrow as pa

    tables = [pq.read_table(out / s["file"]) for s in manifest["shards"]]
    for s, t in zip(manifest["shards"], tables):
        assert t.num_rows == s["n_rows"] and (out / s["file"]).stat().st_size == s["bytes"]
    table = pa.concat_tables(tables)
    schema = table.schema
    assert schema.field("target_token_ids").type == pa.list_(pa.list_(pa.int32()))
    assert schema.field("target_logprobs").type == pa.list_(pa.list_(pa.float16()))
    assert schema.field("tail_logmass").type == pa.list_(pa.float32())
    assert schema.field("target_mask").type == pa.list_(pa.bool_())
    data = table.to_pydict()
    assert data["row_index"] == list(range(200))
    top = demo.topk_logprobs([x.input_ids for x in rows], 6, 1.7, dtype="float16", tail=True)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        assert data["input_ids"][b] == row.input_ids.tolist()
        assert data["target_mask"][b] == row.target_mask.tolist()
        assert np.array_equal(np.array(data["target_token_ids"][b]), top.indices[b, :n])
        assert np.array_equal(np.array(data["target_logprobs"][b], np.float16), top.values[b, :n])
        assert np.array_equal(np.array(data["tail_logmass"][b], np.float32), top.tail[b, :n])
        # the tail is the mass the top-k leaves: log(1 - sum p), to the float16 rounding of the values
        naive = np.log1p(-np.exp(np.array(data["target_logprobs"][b], np.float64)).sum(-1))
        assert np.abs(naive - top.tail[b, :n]).max() < 1e-2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert oct(os.stat(out / "shard-00000.parquet").st_mode & 0o777) != "0o600"


def test_dense_safetensors_end_to_end(demo, dataset, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "dense"
    r = invoke("--input", str(dataset), "--out", str(out), "--format", "safetensors", "--dtype", "float16",
               "--shard-rows", "80", "--max-seq-len", str(MAX_LEN))
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert manifest["options"]["kind"] == "dense" and manifest["options"]["k"] is None
    rows = rows_of(demo, dataset)
    ref, lengths = demo.logits_per_position([x.input_ids for x in rows], dtype="float16")
    b = 0
    for s in manifest["shards"]:
        with safe_open(out / s["file"], "np") as f:
            assert f.metadata() == {"format": "q4k-engine-signals", "temperature": "1.0",
                                    "vocab_size": str(demo.vocab_size)}
            logits, offsets, ids = f.get_tensor("logits"), f.get_tensor("offsets"), f.get_tensor("input_ids")
            row_index, mask = f.get_tensor("row_index"), f.get_tensor("target_mask")
        assert logits.dtype == np.float16 and logits.shape == (s["tokens"], demo.vocab_size)
        assert row_index.tolist() == list(range(*s["rows"])) and offsets[-1] == len(ids) == s["tokens"]
        for r_, idx in enumerate(row_index):
            lo, hi = offsets[r_], offsets[r_ + 1]
            assert np.array_equal(logits[lo:hi], ref[idx, :lengths[idx]])  # real positions only
            assert ids[lo:hi].tolist() == rows[idx].input_ids.tolist()
            assert mask[lo:hi].astype(bool).tolist() == rows[idx].target_mask.tolist()
            b += 1
    assert b == 200


def test_resume_after_a_failure_is_byte_identical(demo, tmp_path, monkeypatch):
    """Disk full on the third shard: one line, exit 2, the two shards before it stay listed; the
    resumed run's directory equals an uninterrupted run's, byte for byte (manifest included)."""
    from q4k_engine.distill import shards

    data = write_jsonl(tmp_path / "f.jsonl", mixed_rows(40, demo.vocab_size, fresh_seed("failure dataset")))
    args = ["--input", str(data), "--top-k", "4", "--shard-rows", "8", "--max-seq-len", "24"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert invoke(*args, "--out", str(whole)).exit_code == 0
    real = shards.write_parquet
    monkeypatch.setattr(shards, "write_parquet", disk_full_at(real, 3))
    assert_one_line_error(invoke(*args, "--out", str(cut)), "shard-00002.parquet", "No space left on device")
    manifest = json.loads((cut / MANIFEST).read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == ["shard-00000.parquet",
                                                                                    "shard-00001.parquet"]
    assert sorted(p.name for p in cut.iterdir()) == [MANIFEST, "shard-00000.parquet", "shard-00001.parquet"]
    monkeypatch.setattr(shards, "write_parquet", real)
    assert_one_line_error(invoke(*args, "--out", str(cut)), "--resume")  # never overwritten by accident
    r = invoke(*args, "--out", str(cut), "--resume")
    assert r.exit_code == 0, r.output
    assert "wrote 3 of 5 shard(s)" in r.stderr
    assert files(cut) == files(whole)
    r = invoke(*args, "--out", str(cut), "--resume")
    assert r.exit_code == 0 and "already complete" in r.stderr and files(cut) == files(whole)


def test_resume_after_a_kill_is_byte_identical(demo, tmp_path):
    """A run killed (SIGKILL) once its first shard is in place resumes to the same bytes."""
    data = write_jsonl(tmp_path / "kill.jsonl", mixed_rows(12, demo.vocab_size, fresh_seed("kill dataset")))
    args = ["logits", "--model", "demo", "--device", "cpu", "--input", str(data), "--top-k", "3",
            "--shard-rows", "3", "--max-seq-len", "16"]
    cmd = [sys.executable, "-c", "from q4k_engine.cli.main import main; main()"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cmd + args + ["--out", str(whole)], check=True, capture_output=True)
    proc = subprocess.Popen(cmd + args + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "shard-00000.parquet").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((killed / MANIFEST).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) < 4
    r = subprocess.run(cmd + args + ["--out", str(killed), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert files(killed) == files(whole)


@pytest.mark.parametrize("change, fragment", [
    (["--top-k", "5"], "option k differs"),
    (["--top-k", "4", "--temperature", "2"], "option temperature differs"),
    (["--top-k", "4", "--max-seq-len", "20"], "option max_seq_len differs"),
    (["--top-k", "4", "--dtype", "float16"], "option dtype differs"),
    (["--format", "safetensors"], "option kind differs"),
    (["--top-k", "4", "--precision", "fp8"], "option precision differs"),
])
def test_resume_refuses_a_different_run(dataset, tmp_path, change, fragment):
    out = tmp_path / "run"
    base = ["--input", str(dataset), "--shard-rows", "100", "--max-seq-len", "16", "--out", str(out)]
    assert invoke(*base, "--top-k", "4").exit_code == 0
    before = files(out)
    assert_one_line_error(invoke(*base, *change, "--resume"), "cannot resume", fragment)
    assert files(out) == before


def test_resume_refuses_another_input_or_nothing(demo, dataset, tmp_path):
    out = tmp_path / "run"
    other = write_jsonl(tmp_path / "data.jsonl", mixed_rows(10, demo.vocab_size, fresh_seed("other")))  # same name
    assert invoke("--input", str(dataset), "--max-seq-len", "16", "--out", str(out)).exit_code == 0
    assert_one_line_error(invoke("--input", str(other), "--max-seq-len", "16", "--out", str(out), "--resume"),
                          "cannot resume", "input file differs")
    assert_one_line_error(invoke("--input", str(other), "--out", str(tmp_path / "new"), "--resume"),
                          "nothing to resume")


def test_bad_destination_is_refused_before_any_work(dataset, tmp_path):
    """Checked before the model is even opened (a missing model would be the error otherwise)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    nowhere = ["--model", str(tmp_path / "no-such-model.gguf"), "--input", str(dataset)]
    runner = CliRunner()
    for out, fragment in ((f"{blocker}/", "not a directory"), (str(blocker / "sub"), "parent directory"),
                          (str(tmp_path / "a" / "b" / "c"), "does not exist"),
                          (str(tmp_path / "a" / "x.npz"), "no such directory")):
        r = runner.invoke(main, ["logits", "--device", "cpu", *nowhere, "--out", out])
        assert_one_line_error(r, fragment)
    if os.geteuid() != 0:  # root writes anywhere: the mode bits prove nothing then
        ro = tmp_path / "ro"
        ro.mkdir(0o555)
        r = runner.invoke(main, ["logits", "--device", "cpu", *nowhere, "--out", str(ro / "shards")])
        assert_one_line_error(r, "cannot write")
        r = runner.invoke(main, ["logits", "--device", "cpu", "--model", "demo", "--tokens", "1",
                                 "--out", str(ro / "x.npz")])
        assert_one_line_error(r, "cannot write")


def test_student_vocabulary_crop_and_pad(demo, tmp_path):
    rows_data = write_jsonl(tmp_path / "v.jsonl", mixed_rows(24, demo.vocab_size, fresh_seed("vocab dataset")))
    rows = rows_of(demo, rows_data)
    n = demo.vocab_size - 40
    out = tmp_path / "crop"
    r = invoke("--input", str(rows_data), "--out", str(out), "--top-k", "5", "--vocab-size", str(n),
               "--max-seq-len", str(MAX_LEN))
    assert r.exit_code == 0, r.output
    line = [ln for ln in r.stderr.splitlines() if "--vocab-size" in ln]
    assert len(line) == 1 and "dropped" in line[0] and "mean" in line[0] and "max" in line[0]
    manifest = json.loads((out / MANIFEST).read_text())
    ref = demo.topk_logprobs([x.input_ids for x in rows], 5, tail=True, vocab_size=n)
    dropped = np.concatenate([ref.dropped[b, :len(x.input_ids)] for b, x in enumerate(rows)])
    assert manifest["options"]["vocab_size"] == n
    assert abs(manifest["stats"]["dropped_mass"]["mean"] - dropped.mean()) < 1e-6
    assert manifest["stats"]["dropped_mass"]["max"] == pytest.approx(float(dropped.max()))
    import pyarrow.parquet as pq

    t = pq.read_table(out / "shard-00000.parquet").to_pydict()
    for b, x in enumerate(rows):
        ids = np.array(t["target_token_ids"][b])
        assert ids.max() < n and np.array_equal(ids, ref.indices[b, :len(x.input_ids)])
        assert np.array_equal(np.array(t["target_logprobs"][b], np.float32), ref.values[b, :len(x.input_ids)])
    big = demo.vocab_size + 30
    out = tmp_path / "pad"
    r = invoke("--input", str(rows_data), "--out", str(out), "--format", "safetensors", "--vocab-size", str(big),
               "--max-seq-len", str(MAX_LEN))
    assert r.exit_code == 0, r.output
    from safetensors.numpy import load_file

    d = load_file(out / "shard-00000.safetensors")
    assert d["logits"].shape[1] == big and np.all(d["logits"][:, demo.vocab_size:] == -np.inf)
    full, _ = demo.logits_per_position([rows[0].input_ids])
    assert np.array_equal(d["logits"][:len(rows[0].input_ids), :demo.vocab_size], full[0])


def test_shards_bounded_by_bytes(demo, tmp_path):
    """A shard closes at its byte budget (a longer row makes one alone); bad rows skipped with
    --skip-bad-lines keep their indices, so shard ranges never shift."""
    lines = [json.dumps({"input_ids": list(range(1, 1 + n))}) for n in (5, 5, 30, 5, 5, 5, 5)]
    lines.insert(3, "not json")
    src = tmp_path / "b.jsonl"
    src.write_text("\n".join(lines) + "\n")
    per_token = 2 * (4 + 4) + 9  # k = 2, float32
    opts = SignalOptions(k=2, shard_bytes=12 * per_token, shard_rows=4, rows=RowOptions(skip_bad_lines=True))
    s = write_signals(demo, src, tmp_path / "out", opts, log=lambda _: None)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert [(x["rows"], x["n_rows"], x["tokens"]) for x in manifest["shards"]] == [
        ([0, 2], 2, 10),  # 10 tokens: the 30-token row would cross 12
        ([2, 4], 1, 30),  # alone; row 3 is the bad line, and it counts in the range
        ([4, 6], 2, 10),
        ([6, 8], 2, 10),
    ]
    assert manifest["stats"]["skipped_bad"] == 1 and s.rows == 7


def test_option_conflicts_are_one_line(dataset, tmp_path):
    d = str(tmp_path / "o") + "/"
    assert_one_line_error(invoke("--tokens", "1,2", "--out", d), "give --input")
    assert_one_line_error(invoke("--input", str(dataset), "--out", d, "--format", "safetensors", "--top-k", "3"),
                          "--top-k", "dense")
    assert_one_line_error(invoke("--input", str(dataset), "--out", d, "--format", "safetensors",
                                 "--temperature", "2"), "--temperature")
    assert_one_line_error(invoke("--input", str(dataset), "--out", d, "--positions", "last"), "--positions last")
    assert_one_line_error(invoke("--tokens", "1,2", "--resume"), "--resume")
    assert_one_line_error(invoke("--input", str(dataset), "--out", str(tmp_path / "x.csv")), "unknown output type")
    assert_one_line_error(invoke("--input", str(dataset), "--out", d, "--top-k", str(10**6)), "--top-k")
    assert not list(tmp_path.glob("o/shard-*"))


def test_progress_bar_and_foreign_shards(demo, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", mixed_rows(9, demo.vocab_size, fresh_seed("progress dataset")))
    opts = SignalOptions(k=2, shard_rows=3, rows=RowOptions(max_seq_len=8))
    s = write_signals(demo, data, tmp_path / "out", opts, progress=True, log=lambda _: None)
    err = capsys.readouterr().err
    assert s.shards == 3 and "9/9" in err and "row" in err and "tokens/s" in err  # rows done/total, the rate
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shard-00000.parquet").write_bytes(b"someone else's")
    with pytest.raises(q4k_engine.InputError, match="shard files but no manifest"):
        write_signals(demo, data, tmp_path / "other", opts)


@pytest.mark.gpu
def test_gpu_shards_resume_byte_identical_and_agree_with_cpu(demo, tmp_path, monkeypatch):
    """On the GPU the same batches give the same bytes (resume relies on it), and the values are
    the CPU reference's up to float rounding."""
    import pyarrow.parquet as pq

    from q4k_engine.distill import shards

    gpu = q4k_engine.load("demo", device="cuda")
    data = write_jsonl(tmp_path / "g.jsonl", mixed_rows(40, demo.vocab_size, fresh_seed("gpu dataset")))
    opts = SignalOptions(k=8, shard_rows=8, rows=RowOptions(max_seq_len=MAX_LEN))
    write_signals(gpu, data, tmp_path / "whole", opts, log=lambda _: None)
    real = shards.write_parquet
    monkeypatch.setattr(shards, "write_parquet", disk_full_at(real, 3))
    with pytest.raises(q4k_engine.InputError, match="No space left"):
        write_signals(gpu, data, tmp_path / "cut", opts, log=lambda _: None)
    monkeypatch.setattr(shards, "write_parquet", real)
    write_signals(gpu, data, tmp_path / "cut", opts, resume=True, log=lambda _: None)
    assert files(tmp_path / "cut") == files(tmp_path / "whole")
    write_signals(demo, data, tmp_path / "cpu", opts, log=lambda _: None)
    g = pq.read_table(tmp_path / "whole" / "shard-00000.parquet").to_pydict()
    c = pq.read_table(tmp_path / "cpu" / "shard-00000.parquet").to_pydict()
    assert g["input_ids"] == c["input_ids"] and g["target_mask"] == c["target_mask"]
    for key in ("target_logprobs", "tail_logmass"):
        for a, b in zip(g[key], c[key]):
            assert np.abs(np.array(a, np.float64) - np.array(b, np.float64)).max() < 1e-2, key
