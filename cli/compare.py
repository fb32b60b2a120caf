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

from q4k_engine.distill.compare import compare_signals, compare_teachers
from q4k_engine.distill.reader import open_signals
from q4k_engine.errors import InputError
from q4k_engine.provider import load


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='Models: JSON lines, one object per sequence: {"text": ...} or {"input_ids": [...]}.')
@click.option("--tokens", multiple=True, help='Models: token ids, e.g. "1,2,3" (repeat for more sequences).')
@click.option("--text", "texts", multiple=True, help="Models: text, tokenized by A's tokenizer (repeatable).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Models: where both run.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Models: tokens per forward.")
@click.option("--no-verify", is_flag=True, help="Directories: skip checking each shard's sha256 against its manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def compare(a: str, b: str, input_path: Path | None, tokens: tuple[str, ...], texts: tuple[str, ...], device: str,
            batch_tokens: int, no_verify: bool, as_json: bool) -> None:
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
        report = compare_signals(open_signals(a, verify=not no_verify), open_signals(b, verify=not no_verify))
    else:
        from q4k_engine.cli.logits import _sequences

        if sum(bool(x) for x in (input_path, tokens, texts)) != 1:  # before any model is loaded
            raise InputError("two model files: give exactly one input: --input, --tokens or --text")
        ta = load(a, device=device)
        tb = load(b, device=device)
        report = compare_teachers(ta, tb, _sequences(ta, tokens, texts, input_path), batch_tokens=batch_tokens)
    if as_json:
        click.echo(json.dumps({"base": a, "q": b, **report.to_dict()}, indent=2))
    else:
        click.echo(f"base (A): {a}\nQ (B):    {b}\n{report.text()}")
