"""`q4k-engine compare A B`: how far B's next-token distributions are from A's, with the statistics
of llama.cpp's `llama-perplexity --kl-divergence` (engine/distill/stats.py computes them).

A and B are two signal directories (`q4k-engine logits --out DIR`, same dataset and kind), or two
model files run here over --input / --tokens / --text. Registered on the group in cli/main.py, which
turns every Q4KError into one line and exit code 2.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from q4k_engine.cli.logits import parse_tokens
from q4k_engine.distill.compare import compare_signals, compare_teachers
from q4k_engine.distill.reader import open_signals
from q4k_engine.distill.rows import RowOptions, RowStats, read_rows
from q4k_engine.errors import InputError
from q4k_engine.fp8 import PRECISIONS
from q4k_engine.provider import DEFAULT_MAX_BATCH_TOKENS, load


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Models: a dataset (JSONL or Parquet rows of text, input_ids or chat messages), as `logits` reads it.")
@click.option("--tokens", multiple=True, help='Models: token ids, e.g. "1,2,3" (repeat for more sequences).')
@click.option("--text", "texts", multiple=True, help="Models: text, tokenized by A's tokenizer (repeatable).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Models: where both run.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_BATCH_TOKENS, show_default=True,
              help="Models: tokens per forward.")
@click.option("--precision-a", type=click.Choice(list(PRECISIONS)), default="fp16", show_default=True,
              help="Models: A's precision (see `logits --precision`).")
@click.option("--precision-b", type=click.Choice(list(PRECISIONS)), default="fp16", show_default=True,
              help="Models: B's precision; `compare M M --precision-b fp8` is the FP8 mode's drift on your data.")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None, help="Models: cut longer rows (counted).")
@click.option("--assistant-only", is_flag=True, help="Models: compare only the assistant tokens of chat rows.")
@click.option("--skip-bad-lines", is_flag=True, help="Models: skip malformed rows (counted) instead of stopping.")
@click.option("--no-verify", is_flag=True, help="Directories: skip checking each shard's sha256 against its manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def compare(a: str, b: str, input_path: Path | None, tokens: tuple[str, ...], texts: tuple[str, ...], device: str,
            batch_tokens: int, precision_a: str, precision_b: str, max_seq_len: int | None, assistant_only: bool,
            skip_bad_lines: bool, no_verify: bool, as_json: bool) -> None:
    """Statistics of B against A (the base): KL divergence, same top p, Δp, perplexities.

    A and B are both signal directories (written by `q4k-engine logits --out DIR` over the same
    dataset; top-k directories give the KL as a lower bound) or both model files, run over the
    sequences of --input, --tokens or --text. Named as llama-perplexity --kl-divergence names them:
    Q is B, base is A.
    """
    dirs = [Path(x).is_dir() for x in (a, b)]
    if dirs[0] != dirs[1]:
        raise InputError(f"{a if dirs[0] else b} is a directory and {b if dirs[0] else a} is not: "
                         "compare two signal directories or two model files")
    if dirs[0]:
        if input_path or tokens or texts:
            raise InputError("--input, --tokens and --text are for two model files; the directories hold their own rows")
        if (precision_a, precision_b) != ("fp16", "fp16"):
            raise InputError("--precision-a/-b are for two model files; a directory's manifest records its precision")
        report = compare_signals(open_signals(a, verify=not no_verify), open_signals(b, verify=not no_verify))
    else:
        if sum(bool(x) for x in (input_path, tokens, texts)) != 1:
            raise InputError("two model files: give exactly one input: --input, --tokens or --text")
        ta = load(a, device=device, precision=precision_a)
        tb = load(b, device=device, precision=precision_b)
        options = RowOptions(max_seq_len=max_seq_len, assistant_only=assistant_only, skip_bad_lines=skip_bad_lines)
        if input_path is not None:
            stats = RowStats()
            rows = ((r.input_ids, r.target_mask) for r in read_rows(input_path, ta, options, stats))
            report = compare_teachers(ta, tb, rows, batch_tokens=batch_tokens)
            click.echo(stats.summary(), err=True)
        else:
            seqs = [parse_tokens(t, f"--tokens #{i}") for i, t in enumerate(tokens)] or [ta.encode(t) for t in texts]
            if max_seq_len and any(len(s) > max_seq_len for s in seqs):
                click.echo(f"truncated {sum(len(s) > max_seq_len for s in seqs)} of {len(seqs)} sequence(s) to "
                           f"--max-seq-len {max_seq_len}", err=True)
                seqs = [s[:max_seq_len] for s in seqs]
            seqs = ta.validate(seqs)  # every bad id is reported before any compute
            report = compare_teachers(ta, tb, ((s, np.arange(len(s)) < len(s) - 1) for s in seqs),
                                      batch_tokens=batch_tokens)
    if as_json:
        click.echo(json.dumps({"base": a, "q": b, **report.to_dict()}, indent=2))
    else:
        click.echo(f"base (A): {a}\nQ (B):    {b}\n{report.text()}")
