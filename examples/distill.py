"""One epoch of knowledge distillation into a small transformers causal LM, q4k-engine as the frozen
teacher (the student shares the teacher's vocabulary).

    python examples/distill.py                     # CPU, the demo teacher, a built-in dataset; a loss per step
    python examples/distill.py --teacher model.gguf --device cuda --student-size 100m \\
        --rows 512 --seq-len 512 --batch 8 --report-json distill.json
    python examples/distill.py --shards DIR        # offline: signals written by `q4k-engine logits --out DIR`
    python examples/distill.py --teacher qwen2-72b.gguf --device cuda --student-size 1b \
        --rows 80 --seq-len 1024 --batch 4            # a 72B Q4_K_M teacher and a 1.28B student on one H200

Online (default): every step the teacher runs on the batch and hands its logits to torch through
DLPack (output="torch": on the GPU the student reads the teacher's own device memory, no host copy);
the loss is q4k_engine.distill.kl_div_dense, or kl_div_topk on the teacher's top-k log-probs with
--top-k K. Offline (--shards DIR): the rows and the teacher's signals come from the shard directory
(dense or top-k, as its manifest says; the temperature is the one the signals were written at).

The dataset: --data PATH reads a JSONL or Parquet dataset as `q4k-engine logits` does (rows of
text, input_ids or chat messages, with their target masks; cut to --seq-len). Otherwise, without --rows, each sentence of a built-in text is a row (rows of different lengths,
padded per batch, padding masked out of the loss); with --rows N, N rows of exactly --seq-len tokens
packed from that text (repeated as needed). A teacher without a tokenizer gets seeded random token
ids instead, and says so. Target positions there are every real position but the last of a row
(position t predicts token t + 1), the rule `q4k-engine logits` writes.

Printed: the loss of every step; then tokens/s, the teacher's share of the step time (with
--device cuda every phase is timed between torch.cuda.synchronize() calls, which wait for the
teacher's CuPy work too; the first step, which compiles kernels, is left out of the rates), and
device memory: the teacher's from the engine's own report, the student's torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import q4k_engine
from q4k_engine.distill import kl_div_dense, kl_div_topk

TEXT = """\
The ferry leaves the north bank at seven in the morning and is full before the bell rings.
People carry bread, tools, letters and small animals in baskets.
The river is wide here, and the water moves slowly across the stones.
The crossing takes about twenty minutes when the weather is calm.
In the winter the wind comes down from the hills and the boat rolls from side to side.
The children hold the rail and count the gulls that follow the stern.
On the south bank there is a market with a long row of stalls.
A woman sells honey in clear jars, and a man repairs watches under a green umbrella.
Two brothers sell apples, pears and plums from the farm their family has worked for a hundred years.
Prices are written in chalk on slates: three apples for two coins.
In the afternoon the market is quiet and the traders talk about the price of grain.
They talk about the height of the river and the new bridge the town council has planned.
Some of them think the bridge will bring more buyers to the market.
Others think it will end the ferry, and with it the morning crossing.
The ferryman has worked on the river for thirty years and knows every current.
He says the river is never the same twice, even on the calmest day.
When the fog is thick he rings the bell every minute until the far bank appears.
The passengers drink tea from a kettle that sits on a small stove in the cabin.
In spring the banks are green and the willows hang low over the water.
In summer the boys swim beside the landing and dive from the posts.
The town keeps a record of every crossing in a book at the ferry office.
The oldest pages are yellow and the ink has faded to brown.
A teacher brings her class to read the book and to learn the history of the town.
They find the names of their grandparents, who crossed the river to be married.
The market closes at five, when the last boat returns to the north bank.
The traders pack their stalls and carry the empty baskets down to the water.
The gulls settle on the roof of the ferry office and the river grows dark.
Lamps are lit along the landing, and the ferryman counts the coins of the day.
He writes the number in the book and closes it until the morning.
Then he walks home along the bank, past the willows and the quiet houses.
Tomorrow the bell will ring again at seven, and the ferry will be full.
Nobody in the town can remember a morning without the crossing.
"""

STUDENTS = {  # LlamaConfig fields; the vocabulary is always the teacher's
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # SmolLM2-135M's widths at 12 layers: ~43M parameters besides the (tied) embedding; with a
    # 49152-token vocabulary ~71M in all, with a 152064-token one ~130M.
    "100m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=9,
                 num_key_value_heads=3),
    # Llama-3.2-1B's widths (16 layers, tied embedding): 973.1M parameters besides the embedding,
    # 1,284,573,184 in all with a 152064-token vocabulary (Qwen2's), 1,235,814,400 with Llama 3's.
    # Beside a 72B Q4_K_M teacher on one H200: see bench/bench_large.py --example-steps.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
}


@dataclass
class Batch:
    """One step's input: ids [B, T] (0 beyond each row's length), attention and target masks, and
    (offline) the teacher's signals as torch tensors."""

    rows: list[np.ndarray]  # online: the token ids the teacher runs on
    ids: torch.Tensor
    attention: torch.Tensor
    targets: torch.Tensor
    signals: dict[str, torch.Tensor] | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="demo", help="a .gguf/.apr teacher, or demo  [default: demo]")
    ap.add_argument("--shards", type=Path, default=None, help="train offline from this signals directory")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="teacher and student device")
    ap.add_argument("--student-size", default="tiny", choices=tuple(STUDENTS))
    ap.add_argument("--data", type=Path, default=None,
                    help="a dataset (JSONL/Parquet rows of text, input_ids or chat messages) instead of the built-in text")
    ap.add_argument("--rows", type=int, default=None, help="rows of --seq-len tokens packed from the built-in text")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the whole epoch)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per row (the cut of a sentence row)")
    ap.add_argument("--batch", type=int, default=2, help="rows per step")
    ap.add_argument("--top-k", type=int, default=0, help="online: train on the teacher's top-k + tail (0: dense)")
    ap.add_argument("--temperature", type=float, default=1.0, help="online: distillation temperature")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-json", type=Path, default=None, help="write the figures and the loss curve here")
    a = ap.parse_args(argv)
    for name in ("rows", "steps", "seq_len", "batch"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.top_k < 0 or a.temperature <= 0:
        ap.error("--top-k must be >= 0 and --temperature > 0")
    return a


# --- data ----------------------------------------------------------------------------------------


def dataset(teacher: Any, rows: int | None, seq_len: int, seed: int,
            data: Path | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, target_mask) of every row: from --data through q4k_engine.distill.rows (cut to
    seq_len), else from the built-in text (see the module docstring)."""
    if data is not None:
        from q4k_engine.distill.rows import RowOptions, RowStats, read_rows

        stats = RowStats()
        out = [(r.input_ids, r.target_mask) for r in read_rows(data, teacher, RowOptions(max_seq_len=seq_len), stats)]
        print(f"{data}: {stats.summary()}", file=sys.stderr)
        return out
    sentences = TEXT.splitlines()
    if teacher.model.tokenizer is None:
        print(f"note: {teacher.model.path.name} has no tokenizer: rows are seeded random token ids", file=sys.stderr)
        lengths = [seq_len] * rows if rows else [min(seq_len, 8 + len(s) // 4) for s in sentences]
        rng = np.random.default_rng(seed)
        ids = [rng.integers(0, teacher.vocab_size, n).astype(np.int32) for n in lengths]
    else:
        encoded = [np.array(teacher.encode(s), np.int32) for s in sentences]
        if rows:
            stream = np.concatenate(encoded)
            stream = np.tile(stream, -(-rows * seq_len // len(stream)))
            ids = [stream[i * seq_len:(i + 1) * seq_len] for i in range(rows)]
        else:
            ids = [e[:seq_len] for e in encoded if len(e) >= 2]
    return [(x, np.arange(len(x)) < len(x) - 1) for x in ids]  # every position but the last is a target


def pad(rows: list[tuple[np.ndarray, np.ndarray]], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, target mask) [B, T_max], padded with id 0 and False."""
    t = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), t), np.int64)
    attention = np.zeros((len(rows), t), bool)
    targets = np.zeros((len(rows), t), bool)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)], attention[i, :len(r)], targets[i, :len(r)] = r, True, m
    return (torch.from_numpy(ids).to(device), torch.from_numpy(attention).to(device),
            torch.from_numpy(targets).to(device))


def online_batches(rows: list[tuple[np.ndarray, np.ndarray]], batch: int, device: str) -> Iterator[Batch]:
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        yield Batch([ids for ids, _ in part], *pad(part, device))


def offline_batches(signals: Any, batch: int, device: str) -> Iterator[Batch]:
    for b in signals.batches(batch):
        t = b.to_torch(device)
        yield Batch([], t["input_ids"], t["attention_mask"], t["target_mask"], t)


# --- training ------------------------------------------------------------------------------------


def student_model(size: str, vocab: int, seq_len: int, device: str, seed: int) -> torch.nn.Module:
    """The student, initialised from `seed` on `device` (on "meta" it has shapes and no storage:
    what its parameter count needs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(seq_len, 128), tie_word_embeddings=True,
                         **STUDENTS[size])
    with torch.device(device):  # built in place: a 1B student is never first allocated on the host
        return LlamaForCausalLM(config)


class Clock:
    """Wall time of phases; on CUDA each reading waits for all queued work (torch's and CuPy's)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def teacher_signals(teacher: Any, b: Batch, args: argparse.Namespace) -> dict[str, Any]:
    """What the student is trained to match: the teacher run now on the batch (online, handed over
    through DLPack) or the signals stored for these rows (offline)."""
    if b.signals is not None:
        return b.signals
    if args.top_k:
        top = teacher.topk_logprobs(b.rows, args.top_k, args.temperature, output="torch", tail=True)
        return {"token_ids": top.indices, "logprobs": top.values, "tail": top.tail}
    logits, _ = teacher.logits_per_position(b.rows, output="torch")
    return {"logits": logits}


def distill_loss(student_logits: torch.Tensor, target: dict[str, Any], mask: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    if "logits" in target:
        return kl_div_dense(student_logits, target["logits"], mask, temperature=temperature)
    return kl_div_topk(student_logits, target["token_ids"], target["logprobs"], target["tail"], mask,
                       temperature=temperature)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    clock = Clock(args.device)
    t_start = clock()
    signals = None
    if args.shards is not None:
        from q4k_engine.distill.reader import open_signals

        signals = open_signals(args.shards, verify=True)
        if signals.kind == "topk":  # log-probs stored at the writer's temperature: the loss must use it
            args.temperature = signals.manifest.temperature
        vocab, n_rows, teacher = signals.manifest.vocab_size, len(signals), None
        batches = offline_batches(signals, args.batch, args.device)
        seq_len = args.seq_len
        source = f"{args.shards} ({signals.kind} signals of {signals.manifest.model.get('file', '?')})"
    else:
        teacher = q4k_engine.load(args.teacher, device=args.device)
        rows = dataset(teacher, args.rows, args.seq_len, args.seed, args.data)
        vocab, n_rows, seq_len = teacher.vocab_size, len(rows), max(len(ids) for ids, _ in rows)
        batches = online_batches(rows, args.batch, args.device)
        source = f"{teacher!r}"
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for the student
    student = student_model(args.student_size, vocab, seq_len, args.device, args.seed)
    params = sum(p.numel() for p in student.parameters())
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kind = "offline " + signals.kind if signals else ("online top-%d" % args.top_k if args.top_k else "online dense")
    print(f"teacher {source}\nstudent {args.student_size}: {params / 1e6:.1f}M parameters, vocabulary {vocab}; "
          f"{n_rows} rows, batch {args.batch}, {kind}, temperature {args.temperature:g}")

    losses: list[float] = []
    steps: list[dict[str, float]] = []
    t_prev = clock()
    for step, b in enumerate(batches):
        if args.steps is not None and step >= args.steps:
            break
        t0 = clock()
        with torch.no_grad():
            target = teacher_signals(teacher, b, args)
        t1 = clock()
        logits = student(input_ids=b.ids, attention_mask=b.attention).logits
        loss = distill_loss(logits, target, b.targets, args.temperature)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits, target
        t2 = clock()
        tokens = int(b.attention.sum())
        losses.append(float(loss.detach()))
        steps.append({"data_s": t0 - t_prev, "teacher_s": t1 - t0, "student_s": t2 - t1, "tokens": tokens})
        print(f"step {step + 1:4d}  loss {losses[-1]:.5f}  ({tokens} tokens, teacher {1e3 * (t1 - t0):.0f} ms, "
              f"student {1e3 * (t2 - t1):.0f} ms)")
        t_prev = clock()
    if not losses:
        raise SystemExit("no steps ran (empty dataset?)")
    report = summarize(args, losses, steps, teacher, params, clock() - t_start)
    print(f"{len(losses)} steps; loss {report['loss_first_quarter']:.5f} (first quarter) -> "
          f"{report['loss_last_quarter']:.5f} (last quarter); {report['tokens_per_s']:.0f} tokens/s; teacher "
          f"{100 * report['teacher_share']:.1f}% of step time")
    if report.get("memory"):
        m = report["memory"]
        print(f"device memory: teacher pool peak {m['teacher_pool_peak_bytes'] / 1e9:.2f} GB, student peak allocated "
              f"{m['student_max_allocated'] / 1e9:.2f} GB (GB = 1e9 bytes); engine report: {m['teacher']}")
    if args.report_json:
        args.report_json.write_text(json.dumps(report, indent=2))
    return report


def summarize(args: argparse.Namespace, losses: list[float], steps: list[dict[str, float]], teacher: Any,
              params: int, total_s: float) -> dict[str, Any]:
    q = max(1, len(losses) // 4)
    timed = steps[1:] or steps  # the first step compiles kernels and warms caches
    # a step: the data it reads (offline), the teacher, the student's forward, loss, backward and update
    step_s = sum(s["data_s"] + s["teacher_s"] + s["student_s"] for s in timed)
    teacher_s = sum(s["teacher_s"] for s in timed)
    report: dict[str, Any] = {
        "teacher": str(args.shards or args.teacher), "device": args.device, "student_size": args.student_size,
        "student_parameters": params, "steps": len(losses), "batch": args.batch, "seq_len": args.seq_len,
        "top_k": args.top_k, "temperature": args.temperature, "loss": losses,
        "loss_first_quarter": float(np.mean(losses[:q])), "loss_last_quarter": float(np.mean(losses[-q:])),
        "tokens": sum(s["tokens"] for s in steps), "total_s": total_s, "timed_steps": len(timed),
        "tokens_per_s": sum(s["tokens"] for s in timed) / step_s if step_s > 0 else math.nan,
        "teacher_share": teacher_s / step_s if step_s > 0 else math.nan, "step_times": steps,
    }
    if args.device == "cuda":
        # The teacher's figure is its CuPy pool's high-water mark (its weights, activations and the
        # logits it handed over); the process figure (MemoryReport.process_peak) adds what the process
        # holds besides that pool at the end: the student's torch cache and both CUDA runtimes.
        mem = teacher.backend.memory_report() if teacher is not None else None
        free, total = torch.cuda.mem_get_info()
        report["memory"] = {
            "teacher": str(mem) if mem is not None else "offline (no teacher on the device)",
            "teacher_pool_peak_bytes": mem.pool_peak_held if mem is not None else 0,
            "process_device_bytes": mem.process_peak if mem is not None else None,
            "device_used_bytes": total - free,
            "student_max_allocated": torch.cuda.max_memory_allocated(),
        }
    return report


if __name__ == "__main__":
    main()
