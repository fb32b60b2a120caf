"""Teacher signals out, streamed: a directory of bounded shards and one manifest.

    DIR/manifest.json        what was run and what is done (below)
    DIR/shard-00000.parquet  top-k: one Parquet row per dataset row, in dataset order
    DIR/shard-00000.safetensors   dense: the logits of every real position, packed

Top-k Parquet (Axolotl's KD field names, read with pyarrow alone):
  row_index int64; input_ids list<int32> [T]; target_token_ids list<list<int32>> [T][K];
  target_logprobs list<list<float16|float32>> [T][K]: log_softmax(logits / temperature) over the
  full (output) vocabulary, descending; tail_logmass list<float32> [T]: log(1 - sum(exp(...))),
  the log-mass of every other token (-inf when K covers the vocabulary); target_mask list<bool> [T]
  (rows.py: position t is a target when token t + 1 is). Row t predicts token t + 1.
Dense safetensors: logits [N, V] (float16/float32, raw: temperature 1, real positions only, the
  rows of the shard concatenated in dataset order), offsets int64 [R + 1] (row r is logits
  offsets[r]:offsets[r + 1]), input_ids int32 [N], row_index int64 [R], target_mask uint8 [N];
  metadata: format, temperature "1.0", vocab_size.
A student vocabulary (`vocab_size`) crops (top-k renormalised over the kept tokens, dense columns
cut; the probability mass dropped is reported) or pads (zero probability: never in the top-k,
-inf dense columns).

Shard boundaries depend only on the dataset and the options: a shard covers the dataset rows of
indices [start, end): it closes after `shard_rows` indices (bad rows skipped with --skip-bad-lines
count) or before a row that would take its output past `shard_bytes` (a single larger row makes a
shard alone). Within
a shard, rows are grouped by length (rows.length_batches) into forwards of at most `batch_tokens`.
So a resumed run computes every shard exactly as an uninterrupted one does and writes the same
bytes; the manifest holds nothing that depends on time or on where the run stopped.

Each shard and each manifest update is written atomically (binio.atomic_output) by one writer
thread while the teacher computes the next shard (at most one shard waits), so host memory is
about three shards whatever the dataset's size. The manifest lists a shard only once its file is
in place; `resume` checks the manifest matches this run (model sha256, input sha256, every
option), checks each listed shard's size and sha256, and continues after the last good one.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import numpy as np

from ..binio import HASH_CHUNK, atomic_output, sha256_file
from ..errors import InputError
from ..provider import DEFAULT_MAX_BATCH_TOKENS
from .rows import Row, RowOptions, RowStats, length_batches, read_rows

if TYPE_CHECKING:
    from ..provider import TeacherModel

FORMAT = "q4k-engine-signals"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = {"topk": ".parquet", "dense": ".safetensors"}
DEFAULT_SHARD_ROWS = 1000
DEFAULT_SHARD_BYTES = 512 << 20


@dataclass(frozen=True)
class SignalOptions:
    kind: str = "topk"  # "topk" (Parquet) or "dense" (safetensors)
    k: int | None = 64  # top-k only
    temperature: float = 1.0  # top-k only: dense logits are raw
    vocab_size: int | None = None  # a student's vocabulary (crop or pad); None: the model's
    dtype: str = "float32"  # of log-probs (top-k) or logits (dense)
    shard_rows: int = DEFAULT_SHARD_ROWS
    shard_bytes: int = DEFAULT_SHARD_BYTES
    batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    rows: RowOptions = field(default_factory=RowOptions)
    precision: str = "fp16"  # the teacher's (engine/fp8.py): "fp8" changes the signals' bytes


@dataclass
class RunSummary:
    shards: int = 0  # shards in the directory at the end
    written: int = 0  # shards this run wrote (the rest were already there: resume)
    rows: int = 0
    tokens: int = 0
    computed_tokens: int = 0  # tokens this run put through the teacher
    bytes: int = 0
    seconds: float = 0.0
    dropped_mean: float | None = None  # with a vocabulary crop: probability mass removed
    dropped_max: float | None = None
    row_stats: RowStats = field(default_factory=RowStats)



def package_version() -> str:
    try:
        return version("q4k-engine")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from .. import __version__

        return __version__


def prepare_out_dir(out: Path) -> None:
    """Create `out` (its parent must exist) and prove a file can be written there: the check runs
    before any work, so a bad destination costs nothing. InputError, one line, otherwise."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if not out.parent.is_dir():
        raise InputError(f"{out}: parent directory {out.parent} does not exist")
    try:
        out.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a nameless file: nothing to clean up, whatever happens
            pass
    except OSError as e:
        raise InputError(f"{out}: cannot write there ({e.strerror or e})") from None


def _remove_partials(out: Path) -> None:
    """Temporary files a killed run left (binio.atomic_output names them .NAME.*.part)."""
    for p in out.glob(".*.part"):
        if p.name.startswith((".shard-", f".{MANIFEST}.")):
            p.unlink(missing_ok=True)


def shard_name(kind: str, i: int) -> str:
    return f"shard-{i:05d}{KINDS[kind]}"


# --- one shard's signals ---------------------------------------------------------------------------
@dataclass
class ShardData:
    """The signals of one shard's rows, packed in dataset order (offsets into the positions)."""

    index: int
    start: int  # first dataset row index it covers
    end: int  # one past the last
    rows: list[Row]
    offsets: np.ndarray  # int64 [R + 1]
    arrays: dict[str, np.ndarray]  # per position: "values" [N, K or V], "ids" [N, K], "tail" [N]
    dropped_sum: float = 0.0
    dropped_max: float = 0.0


def bytes_per_token(opts: SignalOptions, out_vocab: int) -> int:
    """Output bytes per position, to bound shards by size before computing them."""
    item = np.dtype(opts.dtype).itemsize
    if opts.kind == "dense":
        return out_vocab * item + 4 + 1
    return opts.k * (item + 4) + 4 + 4 + 1


def compute_shard(teacher: "TeacherModel", opts: SignalOptions, index: int, start: int, end: int,
                  rows: list[Row], done: Callable[[int, int], None] = lambda rows, tokens: None) -> ShardData:
    """Run the teacher over a shard's rows, a length-sorted group per forward; done(rows, tokens)
    after each group (the progress bar)."""
    lengths = [len(r.input_ids) for r in rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    out_vocab = opts.vocab_size or teacher.vocab_size
    cropping = out_vocab < teacher.vocab_size
    dropped = np.zeros(n, np.float32) if cropping else None
    if opts.kind == "topk":
        arrays = {"values": np.empty((n, opts.k), opts.dtype), "ids": np.empty((n, opts.k), np.int32),
                  "tail": np.empty(n, np.float32)}
    else:
        arrays = {"values": np.empty((n, out_vocab), opts.dtype)}
    for group in length_batches(lengths, opts.batch_tokens):
        batch = [rows[i].input_ids for i in group]
        if opts.kind == "topk":
            top = teacher.topk_logprobs(batch, opts.k, opts.temperature, output="numpy", dtype=opts.dtype,
                                        tail=True, vocab_size=opts.vocab_size)
            for b, i in enumerate(group):
                s, e = offsets[i], offsets[i + 1]
                arrays["values"][s:e] = top.values[b, :lengths[i]]
                arrays["ids"][s:e] = top.indices[b, :lengths[i]]
                arrays["tail"][s:e] = top.tail[b, :lengths[i]]
                if cropping:
                    dropped[s:e] = top.dropped[b, :lengths[i]]
        else:
            for c in teacher.logits_chunks(batch, output="numpy", dtype=opts.dtype, vocab_size=opts.vocab_size):
                s = offsets[group[c.sequence]] + c.start
                arrays["values"][s:s + len(c.logits)] = c.logits
                if cropping:
                    dropped[s:s + len(c.logits)] = c.dropped
        done(len(group), sum(lengths[i] for i in group))
    data = ShardData(index, start, end, rows, offsets, arrays)
    if cropping and n:
        data.dropped_sum, data.dropped_max = float(dropped.astype(np.float64).sum()), float(dropped.max())
    return data


def _ids_and_mask(data: ShardData) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([r.input_ids for r in data.rows]).astype(np.int32, copy=False)
    mask = np.concatenate([r.target_mask for r in data.rows]).astype(bool, copy=False)
    return ids, mask


def write_parquet(path: Path, data: ShardData) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, mask = _ids_and_mask(data)
    n, k = data.arrays["ids"].shape
    offsets = pa.array(data.offsets.astype(np.int32))
    inner = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))

    def per_position(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    def per_candidate(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.ListArray.from_arrays(inner, pa.array(values.reshape(-1))))

    table = pa.table({
        "row_index": pa.array(np.array([r.index for r in data.rows], np.int64)),
        "input_ids": per_position(ids),
        "target_token_ids": per_candidate(data.arrays["ids"]),
        "target_logprobs": per_candidate(data.arrays["values"]),
        "tail_logmass": per_position(data.arrays["tail"]),
        "target_mask": per_position(mask),
    })
    pq.write_table(table, path, compression="zstd")


def write_dense(path: Path, data: ShardData, vocab_size: int) -> None:
    from safetensors.numpy import save_file

    ids, mask = _ids_and_mask(data)
    tensors = {
        "logits": np.ascontiguousarray(data.arrays["values"]),
        "offsets": data.offsets,
        "input_ids": ids,
        "row_index": np.array([r.index for r in data.rows], np.int64),
        "target_mask": mask.astype(np.uint8),
    }
    save_file(tensors, str(path), metadata={"format": FORMAT, "temperature": "1.0", "vocab_size": str(vocab_size)})
    _sort_metadata(path)


def _sort_metadata(path: Path) -> None:
    """safetensors writes the metadata from a hash map, in an order that changes from process to
    process; sorted, the same shard is the same bytes whichever process (a resume, a Ray worker)
    wrote it. Only the order changes, so the header keeps its length and the data stay in place."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        f.seek(8)
        f.write(text.ljust(n))  # safetensors pads its header with spaces


def write_shard(out: Path, opts: SignalOptions, teacher_vocab: int, data: ShardData) -> dict:
    """Write one shard's file into `out` atomically; its manifest entry. Every executor (this
    process's writer thread, a Ray worker) writes through this one function."""
    name = shard_name(opts.kind, data.index)
    out_vocab = opts.vocab_size or teacher_vocab
    with atomic_output(out / name) as tmp:
        if opts.kind == "topk":
            write_parquet(tmp, data)
        else:
            write_dense(tmp, data, out_vocab)
    entry = {"file": name, "rows": [data.start, data.end], "n_rows": len(data.rows),
             "tokens": int(data.offsets[-1]), "bytes": (out / name).stat().st_size,
             "sha256": sha256_file(out / name)}
    if out_vocab < teacher_vocab:
        entry["dropped_mass"] = {"sum": data.dropped_sum, "max": data.dropped_max}
    return entry


# --- the manifest ------------------------------------------------------------------------------------
def manifest_options(teacher: "TeacherModel", opts: SignalOptions, input_name: str, input_sha: str,
                     device: str | None = None) -> dict:
    """Every option that decides the shards' bytes: a resume must match all of them. `device` is
    the one that computes the shards (default: the teacher's)."""
    template = opts.rows.chat_template
    if template is None and teacher.model.tokenizer is not None:
        template = teacher.model.tokenizer.chat_template
    return {
        "kind": opts.kind,
        "k": opts.k if opts.kind == "topk" else None,
        "temperature": opts.temperature if opts.kind == "topk" else 1.0,
        "vocab_size": opts.vocab_size or teacher.vocab_size,
        "dtype": opts.dtype,
        "max_seq_len": opts.rows.max_seq_len,
        "assistant_only": opts.rows.assistant_only,
        "skip_bad_lines": opts.rows.skip_bad_lines,
        "add_bos": opts.rows.add_bos,
        "chat_template": None if template is None else hashlib.sha256(template.encode()).hexdigest(),
        "shard_rows": opts.shard_rows,
        "shard_bytes": opts.shard_bytes,
        "batch_tokens": opts.batch_tokens,
        "device": device or teacher.device,
        "precision": opts.precision,
        "input": {"file": input_name, "sha256": input_sha},
    }


def _write_json(path: Path, obj: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _stats(manifest: dict, row_stats: dict[str, int]) -> dict:
    shards = manifest["shards"]
    stats: dict[str, Any] = dict(row_stats)
    tokens = sum(s["tokens"] for s in shards)
    if manifest["options"]["vocab_size"] < manifest["model"]["vocab_size"]:
        stats["dropped_mass"] = {
            "mean": sum(s["dropped_mass"]["sum"] for s in shards) / max(tokens, 1),
            "max": max((s["dropped_mass"]["max"] for s in shards), default=0.0),
        }
    return stats


def _row_stats(stats: RowStats) -> dict[str, int]:
    return {k: v for k, v in asdict(stats).items() if k != "bad"}


def load_resumable(out: Path, options: dict, model: dict) -> tuple[dict, str | None]:
    """The manifest in `out` with its good shards, if this run may continue it; else InputError.
    Returns (manifest, note): the note says which listed shards had to be dropped."""
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{out}: nothing to resume (no {MANIFEST}); run without --resume") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    if manifest.get("q4k_engine_version") != package_version():
        raise InputError(f"{out}: cannot resume: the manifest was written by q4k-engine "
                         f"{manifest.get('q4k_engine_version')}, this is {package_version()}")
    if manifest.get("model", {}).get("sha256") != model["sha256"]:
        raise InputError(f"{out}: cannot resume: the manifest was made with another model file "
                         f"({manifest.get('model', {}).get('file')}, sha256 {str(manifest.get('model', {}).get('sha256'))[:12]}...)")
    theirs = manifest.get("options", {})
    for key in list(options) + [k for k in theirs if k not in options]:
        if theirs.get(key) != options.get(key):
            what = "input file" if key == "input" else f"option {key}"
            raise InputError(f"{out}: cannot resume: {what} differs from the manifest's "
                             f"({json.dumps(theirs.get(key))} there, {json.dumps(options.get(key))} now)")
    good = []
    note = None
    for s in manifest.get("shards", []):
        f = out / s["file"]
        if not f.is_file() or f.stat().st_size != s["bytes"] or sha256_file(f) != s["sha256"]:
            note = f"{s['file']} does not match the manifest: recomputing from row {s['rows'][0]}"
            break
        good.append(s)
    manifest["shards"] = good
    manifest["complete"] = manifest.get("complete", False) and note is None
    return manifest, note


# --- the run -----------------------------------------------------------------------------------------
def _shards(rows: Iterator[Row], opts: SignalOptions, per_token: int, first: int,
            start: int) -> Iterator[tuple[int, int, int, list[Row]]]:
    """(index, start, end, rows) of each shard from row index `start` on (the rows before it are
    read and dropped: they belong to shards already written)."""
    index, current, size = first, [], 0
    for row in rows:
        if row.index < start:
            continue
        while row.index >= start + opts.shard_rows:  # the shard's index range is full
            if current:
                yield index, start, start + opts.shard_rows, current
                index, current, size = index + 1, [], 0
            start += opts.shard_rows
        cost = len(row.input_ids) * per_token
        if current and size + cost > opts.shard_bytes:  # the shard is full: this row starts the next
            yield index, start, row.index, current
            index, current, size, start = index + 1, [], 0, row.index
        current.append(row)
        size += cost
    if current:
        yield index, start, current[-1].index + 1, current


def count_rows(path: Path) -> int | None:
    """A quick upper bound of the dataset's rows for the progress bar (None when unknown)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if suffix in (".jsonl", ".ndjson", ".json"):
            n, last = 0, b"\n"
            with open(path, "rb") as f:
                while block := f.read(HASH_CHUNK):
                    n += block.count(b"\n")
                    last = block[-1:]
            return n + (last != b"\n")
    except Exception:  # a bar without a total is fine; read_rows reports the real problem
        return None
    return None


@dataclass
class ShardJob:
    """One shard of the plan: what an executor needs to compute and write it."""

    index: int
    start: int  # dataset row indices [start, end) it covers
    end: int
    rows: list[Row]
    row_stats: dict[str, int]  # RowStats when the shard closed: the manifest's stats once it is listed


class ShardExecutor(Protocol):
    """Computes and writes (write_shard) the planned shards; yields each job with its manifest entry,
    in shard order, once the shard's file is in place; calls advance(rows, tokens) as work is done."""

    device: str  # the device that computes the shards: an option a resume must match

    def run(self, jobs: Iterator[ShardJob],
            advance: Callable[[int, int], None]) -> Iterator[tuple[ShardJob, dict]]: ...


@dataclass
class LocalExecutor:
    """This process's teacher computes each shard while one writer thread writes the previous one
    (at most one shard waits: bounded host memory)."""

    teacher: "TeacherModel"
    out: Path
    opts: SignalOptions

    @property
    def device(self) -> str:
        return self.teacher.device

    def run(self, jobs: Iterator[ShardJob],
            advance: Callable[[int, int], None]) -> Iterator[tuple[ShardJob, dict]]:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        pending: tuple[ShardJob, Future] | None = None
        try:
            for job in jobs:
                data = compute_shard(self.teacher, self.opts, job.index, job.start, job.end, job.rows, advance)
                if pending is not None:
                    yield pending[0], pending[1].result()  # at most one shard waits for the writer
                pending = job, pool.submit(write_shard, self.out, self.opts, self.teacher.vocab_size, data)
                del data
        except Exception:
            if pending is not None and pending[1].exception() is None:  # the shard before a failure stays listed
                yield pending[0], pending[1].result()
            raise
        else:
            if pending is not None:
                yield pending[0], pending[1].result()
        finally:
            pool.shutdown(wait=True)


class RowSource(Protocol):
    """Where the rows come from: a dataset file (FileRows), or a ray.data.Dataset (ray_run)."""

    name: str  # recorded in the manifest beside sha256(): a resume must read the same rows

    def sha256(self) -> str: ...

    def rows(self, teacher: "TeacherModel", options: RowOptions, stats: RowStats) -> Iterator[Row]: ...

    def count(self) -> int | None: ...  # for the progress bar


@dataclass(frozen=True)
class FileRows:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def sha256(self) -> str:
        return sha256_file(self.path)

    def rows(self, teacher: "TeacherModel", options: RowOptions, stats: RowStats) -> Iterator[Row]:
        return read_rows(self.path, teacher, options, stats)

    def count(self) -> int | None:
        return count_rows(self.path)


def write_signals(teacher: "TeacherModel", input_path: "Path | RowSource", out: Path, opts: SignalOptions, *,
                  resume: bool = False, progress: bool = False,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                  model_sha256: str | None = None, executor: ShardExecutor | None = None) -> RunSummary:
    """Stream the teacher's signals over a dataset into shards in `out` (module docstring).

    `out` is created if need be (prepare_out_dir, which a CLI runs before loading the model).
    Without `resume` a directory that already holds a manifest is refused; with it, the run
    continues a matching manifest. InputError (one line)
    for every problem of the input, the options or the destination (disk full included: the
    shards written so far stay listed and --resume continues from them).

    `executor` computes and writes the shards (default: LocalExecutor, this process); with another
    one (ray_run's) `teacher` only reads the rows and names the model, and may live on the CPU."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    if executor is None and teacher.precision != opts.precision:
        raise InputError(f"the teacher runs at precision {teacher.precision}, the signal options say {opts.precision}")
    executor = executor or LocalExecutor(teacher, out, opts)
    if opts.kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {opts.kind!r}")
    out_vocab = opts.vocab_size or teacher.vocab_size
    if opts.kind == "topk" and not 1 <= (opts.k or 0) <= min(out_vocab, teacher.vocab_size):
        raise InputError(f"--top-k must be in [1, {min(out_vocab, teacher.vocab_size)}], got {opts.k}")
    for name in ("shard_rows", "shard_bytes", "batch_tokens"):
        if getattr(opts, name) < 1:
            raise InputError(f"{name} must be >= 1, got {getattr(opts, name)}")
    if isinstance(input_path, (str, os.PathLike)):
        if not Path(input_path).is_file():
            raise InputError(f"{input_path}: no such input file")
        source: RowSource = FileRows(Path(input_path))
    else:
        source = input_path
    prepare_out_dir(out)
    manifest_path = out / MANIFEST
    if not resume and manifest_path.exists():
        raise InputError(f"{out}: already holds {MANIFEST}; pass --resume to continue it, or choose another directory")
    if not resume and any(out.glob("shard-*")):
        raise InputError(f"{out}: holds shard files but no {MANIFEST}; choose another directory")
    stats = RowStats()
    rows_iter = source.rows(teacher, opts.rows, stats)  # checks the file and options now
    model = {"file": teacher.model.path.name, "sha256": model_sha256 or sha256_file(teacher.model.path),
             "arch": teacher.config.arch, "vocab_size": teacher.vocab_size}
    options = manifest_options(teacher, opts, source.name, source.sha256(), executor.device)
    if resume:
        manifest, note = load_resumable(out, options, model)
        if note:
            log(note)
    else:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "q4k_engine_version": package_version(),
                    "model": model, "options": options, "shards": [], "complete": False, "stats": {}}
    _remove_partials(out)
    summary = RunSummary(row_stats=stats)
    if manifest["complete"]:
        log(f"{out}: already complete ({len(manifest['shards'])} shards); nothing to do")
        return _finish(summary, manifest, t0)
    done = list(manifest["shards"])
    resume_row = done[-1]["rows"][1] if done else 0
    manifest["complete"] = False
    _write_json(manifest_path, manifest)  # a new run is resumable (and its directory claimed) at once
    per_token = bytes_per_token(opts, out_vocab)
    bar = tqdm(total=source.count(), unit="row", disable=not progress, dynamic_ncols=True,
               file=sys.stderr, initial=sum(s["n_rows"] for s in done))
    t_compute = time.perf_counter()

    def advance(rows: int, tokens: int) -> None:
        summary.computed_tokens += tokens
        bar.update(rows)
        rate = summary.computed_tokens / max(time.perf_counter() - t_compute, 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)

    def jobs() -> Iterator[ShardJob]:
        for index, start, end, shard_rows in _shards(rows_iter, opts, per_token, len(done), resume_row):
            yield ShardJob(index, start, end, shard_rows, _row_stats(stats))

    try:
        for job, entry in executor.run(jobs(), advance):
            manifest["shards"].append(entry)
            manifest["stats"] = _stats(manifest, job.row_stats)
            _write_json(manifest_path, manifest)
    finally:
        bar.close()
    _remove_partials(out)  # a worker killed while writing (a Ray run goes on without it) left its temporary
    manifest["complete"] = True
    manifest["stats"] = _stats(manifest, _row_stats(stats))
    _write_json(manifest_path, manifest)
    summary.written = len(manifest["shards"]) - len(done)
    return _finish(summary, manifest, t0)


def _finish(summary: RunSummary, manifest: dict, t0: float) -> RunSummary:
    shards = manifest["shards"]
    summary.shards = len(shards)
    summary.rows = sum(s["n_rows"] for s in shards)
    summary.tokens = sum(s["tokens"] for s in shards)
    summary.bytes = sum(s["bytes"] for s in shards)
    dropped = manifest.get("stats", {}).get("dropped_mass")
    if dropped:
        summary.dropped_mean, summary.dropped_max = dropped["mean"], dropped["max"]
    summary.seconds = time.perf_counter() - t0
    return summary
