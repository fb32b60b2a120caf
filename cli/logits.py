"""`q4k-engine logits`: teacher signals for token ids, text or a dataset: printed, one file, or shards.

Registered on the group in cli/main.py (which owns the error policy: every Q4KError becomes one
line on stderr and exit code 2). The work lives in the library: datasets in
q4k_engine.distill.rows, shards and their manifest in q4k_engine.distill.shards.

`--out` decides the output:
  DIR/ (any path without one of the suffixes below, or an existing directory): a directory of
                       shards and a manifest (distill/shards.py; README, "Shard directory"):
                       top-k Parquet (--format parquet, --top-k K) or dense safetensors. Needs
                       --input; streamed, so host memory does not grow with the dataset;
                       --resume continues an interrupted run.
  .npz / .safetensors  one file: arrays `logits` (float32/float16), `lengths` (int64 [B]) and
                       `input_ids` (int64 [B, T_max], padded with -1). positions=all: logits
                       [B, T_max, vocab], row t of sequence b predicts token t+1, rows t >=
                       lengths[b] are 0.0. positions=last: logits [B, vocab]. safetensors
                       metadata: positions, model. Full logits: --top-k is refused here.
  .npy                 the logits array alone; refused for positions=all when the sequences
                       differ in length (the padding could not be told apart).
Every file is written through binio.atomic_output; the destination is checked before any work.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import click
import numpy as np

from q4k_engine.binio import atomic_output
from q4k_engine.distill.chat import read_chat_template
from q4k_engine.distill.ray_run import write_signals_ray
from q4k_engine.distill.rows import RowOptions, RowStats, read_rows
from q4k_engine.distill.shards import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_ROWS, SignalOptions, prepare_out_dir, write_signals
from q4k_engine.errors import InputError
from q4k_engine.fp8 import PRECISIONS
from q4k_engine.provider import DEFAULT_MAX_BATCH_TOKENS, TeacherModel, load

OUT_SUFFIXES = (".npy", ".npz", ".safetensors")
PRINT_TOP_K = 5
SHARD_TOP_K = 64


def parse_tokens(text: str, where: str) -> list[int]:
    """Ids separated by commas and/or spaces; an empty entry ("1,,2", "1,2,") is an error."""
    stripped = text.strip()
    if not stripped.strip(","):
        raise InputError(f"{where}: no token ids")
    ids = []
    for j, p in enumerate(re.split(r"\s*,\s*|\s+", stripped)):
        if not p:
            raise InputError(f"{where}, position {j}: empty entry (two commas, or a comma at an end)")
        try:
            ids.append(int(p))
        except ValueError:
            raise InputError(f"{where}, position {j}: {p!r} is not an integer token id") from None
    return ids


def _fit_context(teacher: TeacherModel, seqs: list[list[int]], max_seq_len: int | None) -> list[list[int]]:
    """--tokens/--text sequences within the model's context: refused, or cut with --max-seq-len (counted)."""
    context = teacher.config.context_length
    if max_seq_len is None:
        for i, s in enumerate(seqs):
            if context and len(s) > context:
                raise InputError(f"sequence {i}: {len(s)} tokens, more than the model's context length "
                                 f"({context}); truncate with --max-seq-len")
        return seqs
    if context and max_seq_len > context:
        raise InputError(f"--max-seq-len {max_seq_len} is more than the model's context length ({context})")
    cut = sum(len(s) > max_seq_len for s in seqs)
    if cut:
        click.echo(f"truncated {cut} of {len(seqs)} sequence(s) to --max-seq-len {max_seq_len}", err=True)
    return [s[:max_seq_len] for s in seqs]


def _sequences(teacher: TeacherModel, tokens: tuple[str, ...], texts: tuple[str, ...], input_path: Path | None,
               rows: RowOptions) -> list[list[int]]:
    if tokens or texts:
        seqs = [parse_tokens(t, f"--tokens #{i}") for i, t in enumerate(tokens)] or [teacher.encode(t) for t in texts]
        return _fit_context(teacher, seqs, rows.max_seq_len)
    stats = RowStats()
    seqs = [r.input_ids.tolist() for r in read_rows(input_path, teacher, rows, stats)]
    if stats.truncated or stats.skipped_bad:
        click.echo(stats.summary(), err=True)
    return seqs


def _is_shard_dir(out: str) -> bool:
    """DIR/, an existing directory or a name without a suffix: shards; a known suffix: one file."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return True
    if path.suffix.lower() in OUT_SUFFIXES:
        return False
    raise InputError(f"{out}: unknown output type (use {', '.join(OUT_SUFFIXES)}, or a directory DIR/ for shards)")


def _check_out(out: Path) -> None:
    """A single output file: its directory must exist and take a file (checked before any work)."""
    if out.is_dir():
        raise InputError(f"{out}: is a directory")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such directory")
    prepare_out_dir(out.parent)


def write_file(out: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write `out` through the project's one atomic writer: nothing is left behind on failure."""
    kind = out.suffix.lower()
    with atomic_output(out) as tmp:
        if kind == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
            return
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            if kind == ".npy":
                np.save(f, arrays["logits"])
            else:
                np.savez(f, **arrays)


def _significant(x: float, digits: int = 3) -> str:
    """x with at least `digits` significant digits and no exponent (never "0" for a small rate)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def rate(n_tokens: int, seconds: float) -> str:
    """"1234 tokens/s, 0.810 ms/token": both, so that neither reads as zero."""
    seconds = max(seconds, 1e-9)
    if not n_tokens:
        return "no tokens"
    return f"{_significant(n_tokens / seconds)} tokens/s, {_significant(seconds * 1e3 / n_tokens)} ms/token"


def report_load(teacher: TeacherModel) -> None:
    """On stderr: the model, the device and (GPU) what the upload moved, per stored dtype."""
    be = teacher.backend
    upload = getattr(be, "upload", None)
    where = getattr(be, "device_name", be.name)
    click.echo(f"{teacher!r} on {where}" + (f": {upload}" if upload is not None else ""), err=True)


def report_run(teacher: TeacherModel, n_tokens: int, seconds: float) -> None:
    """On stderr, after a successful run (an error stays the only line): the load report, the rate
    of the run and (GPU) the engine's own peak-memory figures."""
    report_load(teacher)
    memory = getattr(teacher.backend, "memory_report", None)
    line = f"{n_tokens} tokens in {seconds:.3f} s ({rate(n_tokens, seconds)})"
    click.echo(line + (f"; memory: {memory()}" if memory else ""), err=True)


def _token_text(teacher: TeacherModel, token_id: int) -> str:
    if teacher.model.tokenizer is None:
        return f"#{token_id}"
    return json.dumps(teacher.tokenizer.token_text(token_id), ensure_ascii=False)


def print_topk(teacher: TeacherModel, seqs: list[list[int]], positions: str, k: int, temperature: float,
               vocab_size: int | None) -> None:
    top = teacher.topk_logprobs(seqs, k, temperature, positions=positions, output="numpy", vocab_size=vocab_size)
    for b, seq in enumerate(seqs):
        click.echo(f"sequence {b} ({len(seq)} tokens)")
        rows = range(len(seq)) if positions == "all" else [len(seq) - 1]
        for t in rows:
            v, i = (top.values[b, t], top.indices[b, t]) if positions == "all" else (top.values[b], top.indices[b])
            cands = "  ".join(f"{_token_text(teacher, int(j))} {float(x):.3f}" for x, j in zip(v, i))
            click.echo(f"  {t:>4} {_token_text(teacher, int(seq[t]))} -> {cands}")


def _refuse(given: dict[str, bool], why: str) -> None:
    bad = [name for name, on in given.items() if on]
    if bad:
        raise InputError(f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not apply {why}")


@click.command()
@click.option("--model", "-m", "model_spec", required=True, help="A .gguf/.apr file, or `demo`.")
@click.option("--tokens", multiple=True, help='Token ids, e.g. "1,2,3" (repeat for more sequences).')
@click.option("--text", "texts", multiple=True, help="Text, tokenized by the model's own tokenizer (repeatable).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A dataset: JSONL or Parquet rows of `text`, `input_ids` or chat `messages`.")
@click.option("--positions", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="Logits of every position, or of each sequence's last one only.")
@click.option("--out", "out", default=None,
              help="DIR/ for shards + manifest, or one .npy/.npz/.safetensors file of full logits.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "safetensors"]), default=None,
              help="Shards: top-k Parquet (default) or dense safetensors logits.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=None,
              help=f"Tokens per position: printed (default {PRINT_TOP_K}) or in Parquet shards (default {SHARD_TOP_K}).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Top-k log-probs of logits / T (printing and Parquet shards; default 1).")
@click.option("--vocab-size", type=click.IntRange(min=1), default=None,
              help="A student's vocabulary: crop (the dropped mass is reported) or pad (zero probability).")
@click.option("--shard-rows", type=click.IntRange(min=1), default=None,
              help=f"Dataset rows per shard at most [default: {DEFAULT_SHARD_ROWS}].")
@click.option("--shard-mb", type=click.IntRange(min=1), default=None,
              help=f"Output MiB per shard at most (a longer row makes a shard alone) [default: {DEFAULT_SHARD_BYTES >> 20}].")
@click.option("--resume", is_flag=True, help="Continue the shard directory's interrupted run (same options).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Shards on Ray workers, one per GPU (same bytes); --out must be on a filesystem every node sees.")
@click.option("--address", default=None, help="--ray: an existing Ray cluster (e.g. auto); default: a local one.")
@click.option("--num-workers", type=click.IntRange(min=1), default=None,
              help="--ray: workers, one per GPU [default: every GPU of the cluster; 1 on the CPU].")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH_TOKENS, show_default=True,
              help="Tokens per forward (rows are grouped by length up to this).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Cut longer sequences (counted); without it a sequence beyond the model's context is an error.")
@click.option("--assistant-only", is_flag=True, help="Chat rows: only assistant tokens are targets (target_mask).")
@click.option("--skip-bad-lines", is_flag=True, help="Skip (and count) malformed dataset rows instead of stopping.")
@click.option("--chat-template", "chat_template", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Chat rows: a template (.jinja, or a tokenizer_config.json) instead of the model file's own.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp16", show_default=True,
              help="fp8: prefill's products in float8 e4m3 (GPUs of compute capability 8.9+; emulated on the "
                   "CPU), faster and less exact (bench/RESULTS.md); decode and the LM head stay fp16.")
def logits(model_spec: str, tokens: tuple[str, ...], texts: tuple[str, ...], input_path: Path | None,
           positions: str, out: str | None, fmt: str | None, top_k: int | None, temperature: float | None,
           vocab_size: int | None, shard_rows: int | None, shard_mb: int | None, resume: bool, use_ray: bool,
           address: str | None, num_workers: int | None, batch_tokens: int, max_seq_len: int | None,
           assistant_only: bool, skip_bad_lines: bool, chat_template: Path | None, dtype: str, device: str,
           precision: str) -> None:
    """Teacher signals of MODEL for token ids, text or a dataset.

    Without --out, prints for each position the top-k next tokens with their log-probabilities.
    With --out DIR/, streams a dataset (--input) into top-k Parquet or dense safetensors shards.
    """
    if sum(bool(x) for x in (tokens, texts, input_path)) != 1:
        raise InputError("give exactly one input: --tokens, --text or --input")
    rows = RowOptions(max_seq_len=max_seq_len, assistant_only=assistant_only, skip_bad_lines=skip_bad_lines,
                      chat_template=read_chat_template(chat_template) if chat_template else None)
    shard_flags = {"--format": fmt is not None, "--resume": resume, "--shard-rows": shard_rows is not None,
                   "--shard-mb": shard_mb is not None, "--ray": use_ray}
    if not use_ray:
        _refuse({"--address": address is not None, "--num-workers": num_workers is not None}, "without --ray")
    if input_path is None:
        _refuse({"--assistant-only": assistant_only, "--skip-bad-lines": skip_bad_lines,
                 "--chat-template": chat_template is not None}, "to --tokens or --text")
    # Every option is checked, and the destination proven writable, before the model is loaded.
    if out is not None and _is_shard_dir(out):
        if input_path is None:
            raise InputError(f"{out}: a shard directory is written from a dataset: give --input")
        dense = fmt == "safetensors"
        _refuse({"--positions last": positions == "last"}, "to shards (every position is written)")
        if dense:
            _refuse({"--top-k": top_k is not None, "--temperature": temperature is not None},
                    "to dense safetensors shards (raw logits of the whole vocabulary; apply T in the loss)")
        out_dir = Path(out)
        prepare_out_dir(out_dir)
        opts = SignalOptions(kind="dense" if dense else "topk", k=None if dense else top_k or SHARD_TOP_K,
                             temperature=1.0 if temperature is None else temperature, vocab_size=vocab_size,
                             dtype=dtype, shard_rows=shard_rows or DEFAULT_SHARD_ROWS,
                             shard_bytes=(shard_mb << 20) if shard_mb else DEFAULT_SHARD_BYTES,
                             batch_tokens=batch_tokens, rows=rows, precision=precision)
        log = lambda line: click.echo(line, err=True)  # noqa: E731
        if use_ray:
            s = write_signals_ray(model_spec, input_path, out_dir, opts, resume=resume, num_workers=num_workers,
                                  address=address, device=device, progress=sys.stderr.isatty(), log=log)
            teacher, teacher_vocab = None, s.vocab_size
            click.echo(f"Ray: {s.workers} worker(s) on {s.device}" + (
                f"; {rate(s.computed_tokens, s.worker_seconds)} over the workers' {s.worker_seconds:.1f} s of "
                "shards (after their model loads)" if s.worker_seconds else ""), err=True)
        else:
            teacher = load(model_spec, device=device, max_batch_tokens=batch_tokens, precision=precision)
            s = write_signals(teacher, input_path, out_dir, opts, resume=resume, progress=sys.stderr.isatty(), log=log)
            report_load(teacher)
            teacher_vocab = teacher.vocab_size
        line = (f"wrote {s.written} of {s.shards} shard(s) to {out_dir} ({s.rows} rows, {s.tokens} tokens, "
                f"{s.bytes / 1e6:.1f} MB in all) in {s.seconds:.1f} s")
        if s.computed_tokens:
            line += f" ({rate(s.computed_tokens, s.seconds)})"
        click.echo(line, err=True)
        click.echo(s.row_stats.summary(), err=True)
        if s.dropped_mean is not None:
            click.echo(f"--vocab-size {vocab_size} crops the teacher's {teacher_vocab} tokens: probability "
                       f"mass dropped per position mean {s.dropped_mean:.3g}, max {s.dropped_max:.3g}", err=True)
        memory = teacher is not None and getattr(teacher.backend, "memory_report", None)
        if memory:
            click.echo(f"memory: {memory()}", err=True)
        return

    _refuse(shard_flags, "without a shard directory (--out DIR/)")
    if out is not None:
        out_file = Path(out)
        _refuse({"--top-k": top_k is not None, "--temperature": temperature is not None,
                 "--vocab-size": vocab_size is not None},
                f"to {out_file.suffix} files of full logits (for top-k signals write shards: --out DIR/)")
        _check_out(out_file)
    teacher = load(model_spec, device=device, max_batch_tokens=batch_tokens, precision=precision)
    seqs = _sequences(teacher, tokens, texts, input_path, rows)
    clean = teacher.validate(seqs)  # every bad id is reported before any compute
    t0 = time.perf_counter()
    if out is None:
        print_topk(teacher, seqs, positions, min(top_k or PRINT_TOP_K, vocab_size or teacher.vocab_size,
                                                 teacher.vocab_size), temperature or 1.0, vocab_size)
        report_run(teacher, sum(map(len, clean)), time.perf_counter() - t0)
        return
    lengths = np.array([len(s) for s in clean], np.int64)
    if positions == "all":
        if out_file.suffix.lower() == ".npy" and len(set(lengths.tolist())) > 1:
            raise InputError(f"{out_file}: .npy cannot hold the lengths of sequences of different lengths; "
                             "use .npz or .safetensors")
        x, _ = teacher.logits_per_position(clean, output="numpy", dtype=dtype)
    else:
        x = teacher.logits_for_batch(clean, output="numpy", dtype=dtype)
    seconds = time.perf_counter() - t0
    ids = np.full((len(clean), int(lengths.max())), -1, np.int64)
    for b, s in enumerate(clean):
        ids[b, :len(s)] = s
    meta = {"positions": positions, "model": str(teacher.model.path.name), "padding": "logits 0.0, input_ids -1"}
    write_file(out_file, {"logits": x, "lengths": lengths, "input_ids": ids}, meta)
    report_run(teacher, int(lengths.sum()), seconds)
    click.echo(f"wrote {out_file}: logits {list(x.shape)} {x.dtype}, {len(clean)} sequence(s), positions={positions}")
