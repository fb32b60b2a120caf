"""`q4k-engine logits`: teacher logits for token ids or text, printed or written to a file.

Registered on the group in cli/main.py (which owns the error policy: every Q4KError becomes one
line on stderr and exit code 2).

Files (`--out`, written to a temporary name beside the target and renamed into place, so a
failed run never leaves a partial or stale file under the final name):
  .npz / .safetensors  arrays `logits` (float32/float16), `lengths` (int64 [B]) and `input_ids`
                       (int64 [B, T_max], padded with -1). positions=all: logits [B, T_max, vocab],
                       row t of sequence b predicts token t+1, rows t >= lengths[b] are 0.0.
                       positions=last: logits [B, vocab]. safetensors metadata: positions, model.
  .npy                 the logits array alone; refused for positions=all when the sequences
                       differ in length (the padding could not be told apart).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
import click
import numpy as np

from q4k_engine.binio import atomic_output
from q4k_engine.errors import InputError
from q4k_engine.provider import TeacherModel, load

OUT_SUFFIXES = (".npy", ".npz", ".safetensors")


def parse_tokens(text: str, where: str) -> list[int]:
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise InputError(f"{where}: no token ids")
    ids = []
    for j, p in enumerate(parts):
        try:
            ids.append(int(p))
        except ValueError:
            raise InputError(f"{where}, position {j}: {p!r} is not an integer token id") from None
    return ids


def read_jsonl(path: Path, teacher: TeacherModel) -> list[list[int]]:
    """One sequence per non-blank line: {"text": "..."} or {"input_ids": [...]}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    seqs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or ("text" in obj) == ("input_ids" in obj):
            raise InputError(f'{where}: expected an object with exactly one of "text" or "input_ids"')
        if "text" in obj:
            if not isinstance(obj["text"], str):
                raise InputError(f'{where}: "text" must be a string')
            seqs.append(teacher.encode(obj["text"]))
        else:
            ids = obj["input_ids"]
            if not isinstance(ids, list):
                raise InputError(f'{where}: "input_ids" must be a list of integers')
            seqs.append(ids)
    if not seqs:
        raise InputError(f"{path}: no sequences (empty file)")
    return seqs


def _sequences(teacher: TeacherModel, tokens: tuple[str, ...], texts: tuple[str, ...],
               input_path: Path | None) -> list[list[int]]:
    given = sum(bool(x) for x in (tokens, texts, input_path))
    if given != 1:
        raise InputError("give exactly one input: --tokens, --text or --input")
    if tokens:
        return [parse_tokens(t, f"--tokens #{i}") for i, t in enumerate(tokens)]
    if texts:
        return [teacher.encode(t) for t in texts]
    return read_jsonl(input_path, teacher)


def _check_out(out: Path) -> None:
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise InputError(f"{out}: unknown output type (use {', '.join(OUT_SUFFIXES)})")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such directory")
    if out.is_dir():
        raise InputError(f"{out}: is a directory")


def write_atomic(out: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write `out` through the project's one atomic writer: nothing is left behind on failure."""
    kind = out.suffix.lower()
    with atomic_output(out) as tmp:
        if kind == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=metadata)
            return
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            if kind == ".npy":
                np.save(f, arrays["logits"])
            else:
                np.savez(f, **arrays)


def report_load(teacher: TeacherModel) -> None:
    """On stderr: the model, the device and (GPU) what the upload moved, per stored dtype."""
    be = teacher.backend
    upload = getattr(be, "upload", None)
    where = getattr(be, "device_name", be.name)
    click.echo(f"{teacher!r} on {where}" + (f": {upload}" if upload is not None else ""), err=True)


def report_run(teacher: TeacherModel, n_tokens: int, seconds: float) -> None:
    """On stderr, after a successful run (an error stays the only line): the load report, tokens/s
    of the run and (GPU) the engine's own peak-memory figures."""
    report_load(teacher)
    memory = getattr(teacher.backend, "memory_report", None)
    line = f"{n_tokens} tokens in {seconds:.3f} s ({n_tokens / max(seconds, 1e-9):.0f} tokens/s)"
    click.echo(line + (f"; memory: {memory()}" if memory else ""), err=True)


def _token_text(teacher: TeacherModel, token_id: int) -> str:
    if teacher.model.tokenizer is None:
        return f"#{token_id}"
    return json.dumps(teacher.tokenizer.token_text(token_id), ensure_ascii=False)


def print_topk(teacher: TeacherModel, seqs: list[list[int]], positions: str, k: int) -> None:
    vals, idx, *_ = teacher.topk_logprobs(seqs, k, positions=positions, output="numpy")
    for b, seq in enumerate(seqs):
        click.echo(f"sequence {b} ({len(seq)} tokens)")
        rows = range(len(seq)) if positions == "all" else [len(seq) - 1]
        for t in rows:
            v, i = (vals[b, t], idx[b, t]) if positions == "all" else (vals[b], idx[b])
            cands = "  ".join(f"{_token_text(teacher, int(j))} {float(x):.3f}" for x, j in zip(v, i))
            click.echo(f"  {t:>4} {_token_text(teacher, int(seq[t]))} -> {cands}")


@click.command()
@click.option("--model", "-m", "model_spec", required=True, help="A .gguf/.apr file, or `demo`.")
@click.option("--tokens", multiple=True, help='Token ids, e.g. "1,2,3" (repeat for more sequences).')
@click.option("--text", "texts", multiple=True, help="Text, tokenized by the model's own tokenizer (repeatable).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='JSON lines, one object per sequence: {"text": ...} or {"input_ids": [...]}.')
@click.option("--positions", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="Logits of every position, or of each sequence's last one only.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Write logits to .npy, .npz or .safetensors (padded + lengths, see docs) instead of printing.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Tokens shown per position when printing.")
def logits(model_spec: str, tokens: tuple[str, ...], texts: tuple[str, ...], input_path: Path | None,
           positions: str, out: Path | None, dtype: str, device: str, top_k: int) -> None:
    """Teacher logits of MODEL for token ids or text.

    Without --out, prints for each position the top-k next tokens with their log-probabilities.
    """
    if out is not None:
        _check_out(out)
    teacher = load(model_spec, device=device)
    seqs = _sequences(teacher, tokens, texts, input_path)
    clean = teacher.validate(seqs)  # every bad id is reported before any compute
    t0 = time.perf_counter()
    if out is None:
        print_topk(teacher, seqs, positions, min(top_k, teacher.vocab_size))
        report_run(teacher, sum(map(len, clean)), time.perf_counter() - t0)
        return
    lengths = np.array([len(s) for s in clean], np.int64)
    if positions == "all":
        if out.suffix.lower() == ".npy" and len(set(lengths.tolist())) > 1:
            raise InputError(f"{out}: .npy cannot hold the lengths of sequences of different lengths; use .npz or .safetensors")
        x, _ = teacher.logits_per_position(clean, output="numpy", dtype=dtype)
    else:
        x = teacher.logits_for_batch(clean, output="numpy", dtype=dtype)
    seconds = time.perf_counter() - t0
    ids = np.full((len(clean), int(lengths.max())), -1, np.int64)
    for b, s in enumerate(clean):
        ids[b, :len(s)] = s
    meta = {"positions": positions, "model": str(teacher.model.path.name), "padding": "logits 0.0, input_ids -1"}
    write_atomic(out, {"logits": x, "lengths": lengths, "input_ids": ids}, meta)
    report_run(teacher, int(lengths.sum()), seconds)
    click.echo(f"wrote {out}: logits {list(x.shape)} {x.dtype}, {len(clean)} sequence(s), positions={positions}")
