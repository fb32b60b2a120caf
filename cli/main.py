"""The `q4k-engine` command line: one click group, one error policy for every command.

Commands raise Q4KError subclasses for every expected failure (bad file, bad option, missing
GPU); `Q4KGroup` turns them into one line `q4k-engine: error: <message>` on stderr and exit code
2, the same code click uses for usage errors. The engine's warnings (Q4KWarning: a fallback such as
device "auto" running on the CPU) become one line `q4k-engine: warning: <message>` when they
happen, which is before the work they concern. Ctrl-C exits 130 with one line (output files are
written atomically, so none is left half-written). Anything else is a bug and keeps its traceback.
Add a command with `@main.command()`; it inherits the policy.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from q4k_engine.apr import DTYPE_CODES_KEY, PORTABLE
from q4k_engine.binio import UNITS, human_bytes
from q4k_engine.convert import Reencoded, requantize, save_model, to_portable
from q4k_engine.errors import InputError, Q4KError, Q4KWarning
from q4k_engine.kernels.matmul import SCRATCH_BYTES
from q4k_engine.loader import model_name, open_model
from q4k_engine.provider import DEFAULT_MAX_BATCH_TOKENS, HEAD_CHUNK_BYTES
from q4k_engine.shapes import SHAPES, shape_model
from q4k_engine.synthetic import resolve_model
from q4k_engine.tensors import ModelFile
from q4k_engine.verify import verify_model

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C
TOPK_DEFAULT = 64  # the k of Axolotl-style top-k distillation datasets


def _one_line(text: str) -> str:
    return " ".join(str(text).splitlines())  # the promise is one line, whatever the message


class Q4KGroup(click.Group):
    """A click group whose commands report Q4KError as one line and exit code 2, the engine's
    warnings as one line each, and Ctrl-C as one line and exit code 130."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            show = warnings.showwarning

            def one_line_warning(message, category, filename, lineno, file=None, line=None):
                if issubclass(category, Q4KWarning):
                    click.echo(f"q4k-engine: warning: {_one_line(str(message))}", err=True)
                else:
                    show(message, category, filename, lineno, file, line)

            warnings.showwarning = one_line_warning
            try:
                return super().invoke(ctx)
            except Q4KError as e:
                click.echo(f"q4k-engine: error: {_one_line(str(e))}", err=True)
                ctx.exit(EXIT_ERROR)
            except KeyboardInterrupt:
                click.echo("q4k-engine: interrupted", err=True)
                ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=Q4KGroup)
@click.version_option(package_name="q4k-engine")
def main() -> None:
    """q4k-engine: a frozen k-quant teacher for knowledge distillation.

    MODEL arguments are .gguf or .apr files (detected by content), or `demo` for a small random
    model generated on first use.
    """


def _progress() -> bool:
    # Bars only for a person watching: never in logs, pipes or captured test output.
    return sys.stderr.isatty()


# --------------------------------------------------------------------------------------------
# inspect


def memory_estimate(model: ModelFile, batch: int, seq: int, topk: int = TOPK_DEFAULT) -> dict[str, Any]:
    """GPU memory for one forward over `batch` sequences of `seq` tokens, by component, and for
    the provider's top-k log-prob output over the same sequences."""
    c = model.config
    tokens = batch * seq
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    kv_values = 2 * c.n_layers * tokens * kv_dim
    # fp32 values alive per token at the peak of one layer: the residual and its normed copy, plus
    # q, k, v and the attention output, or the MLP's f16 act(gate) * up (half a value per ffn unit:
    # kernels/matmul.py glu_matmul builds it a block of rows at a time).
    per_token = 2 * c.hidden + max(2 * q_dim + 2 * kv_dim, -(-c.ffn // 2))
    # The matmuls' f16 dequantize scratch and glu_matmul's block of products, each at most this.
    workspace = 2 * SCRATCH_BYTES
    weights = sum(t.nbytes for t in model.tensors.values())
    # Top-k output: the provider runs forwards of at most max_batch_tokens (whole sequences) and the
    # LM head plus the reduction on chunks of positions (provider.HEAD_CHUNK_BYTES of fp32 logits);
    # the reduction (ops.topk_logprobs) makes no temporary of the chunk's size, so one chunk of logits
    # beside the head's dequantize scratch (in the workspace). Then k values (fp32) and ids (int64)
    # and the tail (fp32) per position. No KV cache: a prefill's k/v live one layer at a time.
    fwd_tokens = min(tokens, max(seq, DEFAULT_MAX_BATCH_TOKENS // seq * seq))
    chunk = min(fwd_tokens, max(1, HEAD_CHUNK_BYTES // (4 * c.vocab_size)))
    parts = {
        "weights": weights,
        "kv_cache_fp16": kv_values * 2,
        "kv_cache_fp32": kv_values * 4,
        "activations_fp32": tokens * per_token * 4 + workspace,
        "logits_fp16": tokens * c.vocab_size * 2,
        "logits_fp32": tokens * c.vocab_size * 4,
        "topk_activations_fp32": fwd_tokens * per_token * 4 + workspace,
        "topk_logits": chunk * c.vocab_size * 4 + tokens * (topk * (4 + 8) + 4),
    }
    return {
        "batch": batch,
        "seq": seq,
        "topk": topk,
        "forward_tokens_topk": fwd_tokens,
        "bytes": parts,
        "total_fp16": weights + parts["kv_cache_fp16"] + parts["activations_fp32"] + parts["logits_fp16"],
        "total_fp32": weights + parts["kv_cache_fp32"] + parts["activations_fp32"] + parts["logits_fp32"],
        "total_topk": weights + parts["topk_activations_fp32"] + parts["topk_logits"],
        "assumptions": [
            "weights stay in their stored (quantized) types, uploaded once; a tied head is not duplicated",
            "KV cache holds every position of every layer (sliding-window layers are not trimmed)",
            "activations are float32 and only one layer's are alive at a time "
            f"({per_token} values per token: residual, normed input, then q/k/v/attention "
            "output or the MLP's f16 product, whichever is larger), plus the matmuls' workspace "
            f"({human_bytes(workspace)}: f16 dequantize scratch and one block of MLP products)",
            "prefill attention is tiled (no seq x seq score matrix)",
            "logits are kept for every position ([batch*seq, vocab]); last-position or top-k "
            "output needs only a [batch, vocab] slice",
            f"top-k (k={topk}): forwards of at most {DEFAULT_MAX_BATCH_TOKENS} tokens (the provider's "
            f"max_batch_tokens), the LM head and reduction on {chunk} positions at a time (about three "
            "chunks of fp32 logits alive), then k values + ids and the tail per position",
            "the CUDA context, cuBLAS workspace and the CuPy pool's cached blocks (a few hundred MB) are not "
            "included; the run's own report leads with the process's measured device memory",
        ],
    }


def inspect_report(model: ModelFile, batch: int, seq: int | None, topk: int = TOPK_DEFAULT) -> dict[str, Any]:
    c = model.config
    seq = seq or min(c.context_length or 2048, 2048)
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
    for t in model.tensors.values():
        dtypes[t.dtype.name]["count"] += 1
        dtypes[t.dtype.name]["bytes"] += t.nbytes
    tok = model.tokenizer
    return {
        "path": str(model.path),
        "format": model.format,
        "name": model_name(model),
        "config": dataclasses.asdict(c),
        "tokenizer": None if tok is None else {
            "model": tok.model,
            "kind": {"gpt2": "byte-level BPE", "llama": "SentencePiece"}.get(tok.model, tok.model),
            "tokens": len(tok.tokens),
            "merges": len(tok.merges or []),
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "add_bos": tok.add_bos,
            "pre": tok.pre,
            "chat_template": tok.chat_template is not None,
        },
        "tensor_count": len(model.tensors),
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["bytes"])),
        "memory": memory_estimate(model, batch, seq, topk),
    }


def _format_report(r: dict[str, Any]) -> str:
    c, m = r["config"], r["memory"]
    switches = [
        f"rope {'NEOX' if c['rope_neox'] else 'NORM'} theta {c['rope_theta']:g}"
        + (f" (local {c['rope_theta_local']:g})" if c["rope_theta_local"] else "")
        + (f" scale {c['rope_scale']:g}" if c["rope_scale"] != 1.0 else ""),
        f"sliding window {c['sliding_window']}" + (f" (every {c['sliding_pattern']}th layer global)" if c["sliding_pattern"] else "")
        if c["sliding_window"] else "full attention",
        *(label for key, label in (("qkv_bias", "QKV bias"), ("qk_norm", "QK-norm"), ("sandwich_norm", "sandwich norms"),
                                   ("embed_scale", "scaled embedding"), ("tied_head", "tied head")) if c[key]),
        f"act {c['act']}",
        f"rms eps {c['rms_eps']:g}",
    ]
    lines = [
        f"model      {r['path']} ({r['format']}" + (f", {r['name']!r})" if r["name"] else ")"),
        f"arch       {c['arch']}: {c['n_layers']} layers, hidden {c['hidden']}, ffn {c['ffn']}, "
        f"heads {c['n_heads']} (kv {c['n_kv_heads']}) x {c['head_dim']}, vocab {c['vocab_size']}, "
        f"context {c['context_length'] or 'unknown'}",
        f"switches   {', '.join(switches)}",
    ]
    tok = r["tokenizer"]
    lines.append(
        "tokenizer  none" if tok is None else
        f"tokenizer  {tok['kind']} ({tok['model']}), {tok['tokens']} tokens"
        + (f", {tok['merges']} merges" if tok["merges"] else "")
        + f", bos {tok['bos_id']}, eos {tok['eos_id']}" + (", chat template" if tok["chat_template"] else "")
    )
    lines.append(f"tensors    {r['tensor_count']}")
    lines.append(f"  {'dtype':<8}{'count':>7}{'size':>14}")
    for name, d in r["dtypes"].items():
        lines.append(f"  {name:<8}{d['count']:>7}{human_bytes(d['bytes']):>14}")
    b = m["bytes"]
    lines += [
        f"GPU memory estimate, batch {m['batch']} x seq {m['seq']} ({UNITS}):",
        f"  weights              {human_bytes(b['weights']):>12}",
        f"  KV cache fp16/fp32   {human_bytes(b['kv_cache_fp16']):>12} / {human_bytes(b['kv_cache_fp32'])}",
        f"  activations fp32     {human_bytes(b['activations_fp32']):>12}",
        f"  logits fp16/fp32     {human_bytes(b['logits_fp16']):>12} / {human_bytes(b['logits_fp32'])}",
        f"  total fp16/fp32      {human_bytes(m['total_fp16']):>12} / {human_bytes(m['total_fp32'])}",
        f"  top-{m['topk']} output       {human_bytes(m['total_topk']):>12} (forwards of {m['forward_tokens_topk']} "
        f"tokens: activations {human_bytes(b['topk_activations_fp32'])}, logits {human_bytes(b['topk_logits'])})",
        "  assumptions:",
        *(f"  - {a}" for a in m["assumptions"]),
    ]
    return "\n".join(lines)


@main.command()
@click.argument("model", required=False)
@click.option("--shape", type=click.Choice(list(SHAPES)), default=None,
              help="Describe a published shape's Q4_K_M file (q4k_engine.shapes) instead of a MODEL file; nothing is written.")
@click.option("--batch", "-b", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences per forward (memory estimate).")
@click.option("--seq", "-t", type=click.IntRange(min=1), default=None,
              help="Tokens per sequence (memory estimate)  [default: min(context, 2048)]")
@click.option("--topk", "-k", type=click.IntRange(min=1), default=TOPK_DEFAULT, show_default=True,
              help="k of the top-k output line of the memory estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(model: str | None, shape: str | None, batch: int, seq: int | None, topk: int, as_json: bool) -> None:
    """Describe MODEL: architecture, tokenizer, tensor types, and GPU memory for a batch."""
    if (model is None) == (shape is None):
        raise InputError("give a MODEL file or --shape NAME (one of them)")
    report = inspect_report(shape_model(shape) if shape else open_model(resolve_model(model)), batch, seq, topk)
    click.echo(json.dumps(report, indent=2) if as_json else _format_report(report))


# --------------------------------------------------------------------------------------------
# verify


@main.command()
@click.argument("model")
def verify(model: str) -> None:
    """Read all of MODEL: check the APR footer CRC and that every tensor decodes to finite values.

    Prints one line per tensor (name, type, ok or the first bad row); exits 2 on any failure.
    Opening a model never reads its tensor data, so only this finds bytes damaged inside a tensor.
    """
    path = resolve_model(model)
    m = open_model(path)
    width = max((len(n) for n in m.tensors), default=0)
    report = verify_model(m, on_tensor=lambda c: click.echo(f"{c.name:<{width}}  {c.dtype:<5} {c.status}"))
    click.echo(f"checksum: {report.checksum.detail}")
    report.raise_if_failed()
    click.echo(f"{path}: ok ({len(report.tensors)} tensors decode to finite values)")


# --------------------------------------------------------------------------------------------
# convert


@main.command()
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--quantize", type=click.Choice(["q4_k_m"]), default=None,
              help="Quantize F32/F16/BF16 weights after llama.cpp's Q4_K_M recipe (F16 for rows that K-quants "
                   "cannot hold); already quantized tensors are kept as they are.")
@click.option("--to", "fmt", type=click.Choice(["apr", "gguf"]), default=None,
              help="Output format  [default: gguf if DEST ends in .gguf, else apr]")
@click.option("--names", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True,
              help="APR tensor names: Hugging Face style (model.layers.N...) or GGUF style (blk.N...).")
@click.option("--no-lm-head", "omit_head", is_flag=True,
              help="APR: do not materialize lm_head.weight for a tied head (smaller file; realizar cannot load it).")
@click.option("--keep-ggml-codes", is_flag=True,
              help="APR: keep Q8_0/Q5_0/Q4_0/Q4_1/Q5_K tensors under GGML's dtype codes instead of re-encoding "
                   "them. ONLY q4k-engine reads such a file correctly: aprender and realizar misread or reject "
                   "those codes.")
def convert(source: str, dest: Path, quantize: str | None, fmt: str | None, names: str, omit_head: bool,
            keep_ggml_codes: bool) -> None:
    """Convert SOURCE (GGUF or APR) to DEST (APR or GGUF); quantized blocks are copied byte for byte.

    An APR file holds only the types every APR reader decodes alike (F32, F16, BF16, Q4_K, Q6_K):
    a tensor of another type (Q8_0, Q5_0, Q4_1, ...) is re-encoded as F16 (norms and biases F32),
    and each one is listed with the largest change of a weight. For a smaller portable file,
    convert a float source with --quantize q4_k_m.
    """
    src = resolve_model(source)
    if dest.exists() and dest.resolve() == src.resolve():
        raise InputError(f"{dest}: refusing to overwrite the input file")
    fmt = fmt or ("gguf" if dest.suffix.lower() == ".gguf" else "apr")
    if keep_ggml_codes and fmt != "apr":
        raise InputError("--keep-ggml-codes applies to APR output only (GGUF always uses GGML's codes)")
    model = open_model(src)
    if quantize:
        model = requantize(model, quantize, progress=_progress())
    report: list[Reencoded] = []
    if fmt == "apr" and not keep_ggml_codes:
        model, report = to_portable(model, progress=_progress())
    save_model(dest, model, fmt, names=names, materialize_head=not omit_head, keep_ggml_codes=keep_ggml_codes,
               progress=_progress())
    for r in report:
        click.echo(f"re-encoded {r.name}: {r.source.name} -> {r.target.name} (largest change {r.max_abs_change:.3g})")
    if report:
        worst = max(report, key=lambda r: r.max_abs_change)
        click.echo(
            f"re-encoded {len(report)} tensors to portable APR types (F16 for matrices, F32 for vectors or values "
            f"beyond F16's range; see q4k_engine.convert.portable_type); largest absolute change of any weight: "
            f"{worst.max_abs_change:.3g} ({worst.name})"
        )
    click.echo(
        f"wrote {dest} ({fmt}, {len(model.tensors)} tensors); size {human_bytes(src.stat().st_size)} -> "
        f"{human_bytes(dest.stat().st_size)}"
    )
    kept = sorted({t.dtype.name for t in model.tensors.values() if t.dtype not in PORTABLE})
    if fmt == "apr" and kept:
        click.echo(
            f"note: {', '.join(kept)} tensors keep their GGML dtype codes (marked '{DTYPE_CODES_KEY}'): "
            "only q4k-engine reads this file correctly; aprender and realizar misread or reject these codes",
            err=True,
        )


# Commands written in their own modules join the group here (after `main` exists: they may import
# helpers from this module).
from q4k_engine.cli.compare import compare  # noqa: E402
from q4k_engine.cli.generate import generate  # noqa: E402
from q4k_engine.cli.logits import logits  # noqa: E402

main.add_command(logits)
main.add_command(generate)
main.add_command(compare)

if __name__ == "__main__":
    main()
