"""examples/distill.py, the seed's falsifier "a distillation epoch completes": with no arguments it
trains the tiny student one epoch on the CPU from the demo teacher and the loss falls. Online top-k,
offline (dense and top-k shard directories written by the engine from the same rows) and --data
start from the loss the online run computes, as the same student init and teacher demand."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import q4k_engine  # noqa: E402


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distill.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("distill_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def epoch(example):
    return example.main([])


def test_one_epoch_with_falling_loss(epoch, example, capsys):
    losses = epoch["loss"]
    rows = len(example.dataset(q4k_engine.load("demo", device="cpu"), None, 64, seed=0))
    assert epoch["steps"] == -(-rows // 2) >= 12  # the whole epoch, batch 2
    assert all(np.isfinite(losses)) and min(losses) > 0
    # fixed seed: the student's init and the data order are the same every run; the margin is wide
    # (a fall of about a third on this machine)
    assert epoch["loss_last_quarter"] < 0.85 * epoch["loss_first_quarter"], losses
    assert epoch["tokens"] == sum(s["tokens"] for s in epoch["step_times"]) and epoch["tokens_per_s"] > 0
    assert 0 < epoch["teacher_share"] < 1


def test_prints_every_step(example, capsys, tmp_path):
    report = example.main(["--steps", "3", "--report-json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("step")] == \
        [["step", "1"], ["step", "2"], ["step", "3"]]
    assert "3 steps; loss" in out and (tmp_path / "r.json").read_text().count('"loss"') == 1
    assert report["steps"] == 3


def test_topk_data_and_offline_start_from_the_online_loss(example, epoch, tmp_path):
    """The same rows as a JSONL dataset (--data), as dense and top-k shards written by the engine's
    shard writer (--shards), and online top-k: the first step's loss (before any update) is the
    online dense one, or for top-k + tail its lower bound."""
    from q4k_engine.distill.shards import SignalOptions, write_signals

    teacher = q4k_engine.load("demo", device="cpu")
    rows = example.dataset(teacher, None, 64, seed=0)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"input_ids": ids.tolist()}) + "\n" for ids, _ in rows))
    first = epoch["loss"][0]
    assert example.main(["--data", str(data), "--steps", "1"])["loss"][0] == pytest.approx(first, rel=1e-6)
    for kind in ("dense", "topk"):
        write_signals(teacher, data, tmp_path / kind, SignalOptions(kind=kind, k=16), log=lambda _: None)
    dense = example.main(["--shards", str(tmp_path / "dense"), "--steps", "2"])
    assert dense["loss"][0] == pytest.approx(first, rel=1e-5)
    offline_topk = example.main(["--shards", str(tmp_path / "topk"), "--steps", "2"])
    online_topk = example.main(["--top-k", "16", "--steps", "2"])
    assert offline_topk["loss"][0] == pytest.approx(online_topk["loss"][0], rel=1e-5)
    assert 0 < online_topk["loss"][0] <= first * (1 + 1e-6)


def test_1b_student_size(example):
    """The 1B student (beside a 72B teacher in bench/bench_large.py --example-steps): Llama-3.2-1B
    widths with the teacher's vocabulary, counted on the meta device (no storage allocated)."""
    student = example.student_model("1b", 152064, 1024, "meta", seed=0)
    assert all(p.is_meta for p in student.parameters())
    params = sum(p.numel() for p in student.parameters())
    embedding = 152064 * 2048  # tied with the LM head: counted once
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048  # q, o; k, v; MLP; 2 norms
    assert params == embedding + 16 * per_layer + 2048 == 1_284_573_184  # + the final norm
    assert student.lm_head.weight is student.model.embed_tokens.weight


@pytest.mark.gpu
def test_gpu_epoch(example, tmp_path):
    """On the GPU the teacher's logits reach the student through DLPack on the device; the epoch
    completes with a falling loss and reports the teacher's and the student's device memory."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    teacher = q4k_engine.load("demo", device="cuda")
    arr = teacher.logits_per_position([[1, 2, 3]], output="dlpack")[0]
    t = torch.from_dlpack(arr)
    assert t.is_cuda and t.data_ptr() == arr.data.ptr
    report = example.main(["--device", "cuda", "--report-json", str(tmp_path / "r.json")])
    assert report["loss_last_quarter"] < 0.85 * report["loss_first_quarter"], report["loss"]
    m = report["memory"]
    assert m["teacher_pool_peak_bytes"] > 0 and m["student_max_allocated"] > 0
    assert 0 < report["teacher_share"] < 1
