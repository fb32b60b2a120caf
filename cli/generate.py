"""`q4k-engine generate`: greedy continuation of token ids or text with a KV cache.

Prints each sequence's continuation (decoded when the model file carries a tokenizer, else the new
ids as "1,2,3") and, on stderr, the load report, prefill and decode tokens/s, and whether decode
steps replayed a CUDA graph. Registered on the group in cli/main.py (every Q4KError becomes one line
on stderr and exit code 2).
"""
from __future__ import annotations

import click

from q4k_engine.errors import InputError
from q4k_engine.generate import Generation
from q4k_engine.provider import TeacherModel, load

from .logits import parse_tokens, report_load


def report_speed(teacher: TeacherModel, g: Generation) -> None:
    """On stderr: prefill and decode rates, the decode mode and, if any, why no graph was used."""
    report_load(teacher)
    click.echo(f"prefill: {g.prompt_tokens} tokens in {g.prefill_seconds:.3f} s "
               f"({g.prompt_tokens / max(g.prefill_seconds, 1e-9):.0f} tokens/s)", err=True)
    steps = len(g.step_seconds)
    if steps:
        decode_s = sum(g.step_seconds)
        line = (f"decode ({g.mode}): {g.decode_tokens} tokens in {steps} steps x {len(g.tokens)} sequence(s), "
                f"{decode_s:.3f} s ({g.decode_tokens / max(decode_s, 1e-9):.1f} tokens/s)")
        if steps > 1:  # the first step runs eagerly (and captures the graph): reported apart
            line += f"; {g.step_ms():.2f} ms/step after the first, which took {g.step_seconds[0] * 1e3:.1f} ms"
        click.echo(line, err=True)
    if g.note:
        click.echo(f"note: {g.note}", err=True)


@click.command()
@click.option("--model", "-m", "model_spec", required=True, help="A .gguf/.apr file, or `demo`.")
@click.option("--tokens", multiple=True, help='Prompt token ids, e.g. "1,2,3" (repeat for a batch).')
@click.option("--text", "texts", multiple=True, help="Prompt text, tokenized by the model's own tokenizer (repeatable).")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens to generate per sequence (fewer when it ends with EOS).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-graph", is_flag=True, help="Run decode steps eagerly instead of replaying a CUDA graph.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the model's end-of-sequence token.")
def generate(model_spec: str, tokens: tuple[str, ...], texts: tuple[str, ...], max_new_tokens: int, device: str,
             no_graph: bool, ignore_eos: bool) -> None:
    """Greedy continuation of each prompt by MODEL (KV cache; CUDA graphs on the GPU)."""
    if bool(tokens) == bool(texts):
        raise InputError("give exactly one input: --tokens or --text")
    teacher = load(model_spec, device=device)
    seqs = [parse_tokens(t, f"--tokens #{i}") for i, t in enumerate(tokens)] or [teacher.encode(t) for t in texts]
    g = teacher.generate(seqs, max_new_tokens, ignore_eos=ignore_eos, use_graph=not no_graph)
    for b, new in enumerate(g.tokens):
        if len(g.tokens) > 1:
            click.echo(f"--- sequence {b}")
        click.echo(teacher.decode(new, skip_special=True) if teacher.model.tokenizer is not None
                   else ",".join(map(str, new)))
    report_speed(teacher, g)
