"""Teacher signals on many GPUs and machines: the shard stage of shards.py as a Ray Data `map_batches`.

    from q4k_engine.distill.ray_run import write_signals_ray
    write_signals_ray("teacher.gguf", "data.jsonl", Path("/shared/signals"), SignalOptions(k=64))

The driver (this process) opens the model on the CPU (weights stay memory-mapped) only to read the
rows: it tokenizes the dataset once and cuts it into shards with shards.write_signals' own plan, so
shard boundaries are the single-process run's. The plan's shards go to a Ray Data `map_batches`
stage of one actor per GPU (`num_gpus=1`; one CPU each for device cpu); each actor loads the teacher
once, then computes a shard with shards.compute_shard and writes it with shards.write_shard (the
same functions as the single-process run) into `out`, which every node must see at the same path
(a shared filesystem). The driver lists each shard in the manifest once it and every shard before
it are in place, through the same manifest code. So the directory holds the same bytes as the
single-process run, whatever the number of workers and whichever ran what; `resume` continues a
directory either kind of run left.

Faults: an actor that dies (killed, its node lost) is restarted by Ray (max_restarts=-1) and its
shard is computed again, up to SHARD_RETRIES times; a temporary it left is removed at the end. A
run stopped as a whole resumes from its manifest.

Input: a JSONL/Parquet path (read by the driver exactly as the single-process run reads it), or a
`ray.data.Dataset` of rows with the same columns (text / input_ids / messages). A Dataset's rows are
taken in order (its DataContext keeps the order) and the manifest records it as
{"file": "ray.data.Dataset", "sha256": sha256 of its rows as canonical JSON lines}.
"""
from __future__ import annotations

import hashlib
import json
import math
import pickle
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from ..binio import sha256_file
from ..errors import DeviceError, FormatError, InputError, Q4KError, UnsupportedError
from .rows import Row, RowOptions, RowStats, encode_rows
from .shards import RunSummary, ShardJob, SignalOptions, compute_shard, prepare_out_dir, write_shard, write_signals

if TYPE_CHECKING:
    from ..provider import TeacherModel

# Retries of one shard whose actor died: a shard that kills its worker this often is a bug or a
# machine out of memory, not a transient fault.
SHARD_RETRIES = 3
DATASET_NAME = "ray.data.Dataset"
ERRORS = {e.__name__: e for e in (InputError, FormatError, UnsupportedError, DeviceError)}  # a worker's, by name


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401  (the extra installs it; plain `ray` lacks it)
    except ImportError:
        raise UnsupportedError("--ray needs Ray: pip install 'q4k-engine[ray]'") from None
    return ray


# --- a ray.data.Dataset as rows ------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A row value as JSON would give it: Arrow hands lists over as numpy arrays, numbers as numpy scalars."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class DatasetRows:
    """A shards.RowSource over a ray.data.Dataset, read in order (twice: its hash, then its rows)."""

    dataset: Any
    name: str = DATASET_NAME

    def __post_init__(self) -> None:
        self.dataset.context.execution_options.preserve_order = True  # row indices must not depend on timing
        self.dataset = self.dataset.materialize()

    def _objects(self) -> Iterator[tuple[str, Any]]:
        for i, row in enumerate(self.dataset.iter_rows()):
            yield f"{self.name}:row {i}", _plain(dict(row))

    def sha256(self) -> str:
        h = hashlib.sha256()
        for _, obj in self._objects():
            h.update(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        return h.hexdigest()

    def rows(self, teacher: "TeacherModel", options: RowOptions, stats: RowStats) -> Iterator[Row]:
        return encode_rows(self._objects(), teacher, options, stats, self.name)

    def count(self) -> int | None:
        return self.dataset.count()


# --- the actors ----------------------------------------------------------------------------------------
class ShardWorker:
    """One Ray Data actor: the teacher is loaded once (here), then each call computes and writes one shard.

    Two calls run at once, in two threads: while one writes its shard, the other computes the next
    (a lock keeps one on the teacher), the overlap of the single-process run's writer thread, with
    at most two shards in memory.

    The project's own errors (a bad destination, a full disk, another model file on this node) come
    back as data, not as a failed task: the driver raises them as they are (one line from the CLI),
    where Ray would wrap them in its own exception and traceback."""

    def __init__(self, model: str, model_sha256: str, device: str, out: str, opts: SignalOptions):
        from ..provider import load

        self.out, self.opts = Path(out), opts
        self.error: Q4KError | None = None
        self.teacher_busy = threading.Lock()
        try:
            self.teacher = load(model, device=device, max_batch_tokens=opts.batch_tokens, precision=opts.precision)
            mine = sha256_file(self.teacher.model.path)
            if mine != model_sha256:  # another file at the same path on this node: its shards would be wrong
                raise InputError(f"{self.teacher.model.path}: differs on this Ray node from the driver's model "
                                 f"(sha256 {mine[:12]}... here, {model_sha256[:12]}... there)")
        except Q4KError as e:
            self.error = e

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, start, end, rows = pickle.loads(batch["job"][0])
        started = time.time()
        entry, error = "", ""
        try:
            if self.error is not None:
                raise self.error
            with self.teacher_busy:  # one shard on the device at a time; the other call meanwhile writes its own
                data = compute_shard(self.teacher, self.opts, index, start, end, rows)
            entry = json.dumps(write_shard(self.out, self.opts, self.teacher.vocab_size, data))
        except Q4KError as e:
            error = json.dumps([type(e).__name__, str(e)])
        return {"index": np.array([index]), "entry": np.array([entry]), "error": np.array([error]),
                "started": np.array([started]), "ended": np.array([time.time()])}


@dataclass
class RayExecutor:
    """A shards.ShardExecutor: the plan's shards through a `map_batches` stage of `num_workers` actors."""

    model: str  # what each worker opens: "demo", or the model file's absolute path
    model_sha256: str
    device: str  # "cpu" or "cuda", resolved against the cluster
    out: Path
    opts: SignalOptions
    num_workers: int
    worker_seconds: float | None = None  # from the first shard's start on any worker to the last one's end

    def run(self, jobs: Iterator[ShardJob],
            advance: Callable[[int, int], None]) -> Iterator[tuple[ShardJob, dict]]:
        import ray

        plan = list(jobs)  # every remaining shard's rows, tokenized once, here
        if not plan:
            return
        items = [{"index": j.index, "job": pickle.dumps((j.index, j.start, j.end, j.rows), pickle.HIGHEST_PROTOCOL)}
                 for j in plan]
        waiting = {j.index: replace(j, rows=[]) for j in plan}
        next_index = plan[0].index
        del plan
        shards = ray.data.from_items(items, override_num_blocks=len(items))  # one block per shard
        del items
        shards.context.enable_progress_bars = False  # write_signals' bar counts rows and tokens/s; one bar is enough
        resources = {"num_gpus": 1} if self.device == "cuda" else {"num_cpus": 1}
        with warnings.catch_warnings():
            # Ray 2.60 deprecates passing actor options this way and names no other for these two.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            results = shards.map_batches(
                ShardWorker, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(self.num_workers, len(waiting)),
                                                   max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
                fn_constructor_kwargs={"model": self.model, "model_sha256": self.model_sha256, "device": self.device,
                                       "out": str(self.out), "opts": self.opts},
                # Explicit, not Ray Data's defaults (which retry a shard forever): a dead actor is
                # restarted (any number of times over a long run), one shard is computed again at
                # most SHARD_RETRIES times.
                max_restarts=-1, max_task_retries=SHARD_RETRIES, **resources)
        finished: dict[int, dict] = {}
        first, last = math.inf, -math.inf
        rows = iter(results.iter_rows())
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except ray.exceptions.RayActorError as e:
                raise DeviceError(f"a Ray worker kept dying on shard {next_index} or later, {SHARD_RETRIES} retries "
                                  f"spent ({str(e).splitlines()[0]}); the shards in the manifest stay, --resume "
                                  "continues") from None
            if row["error"]:
                name, message = json.loads(str(row["error"]))
                raise ERRORS.get(name, Q4KError)(message)
            entry = finished[int(row["index"])] = json.loads(str(row["entry"]))
            advance(entry["n_rows"], entry["tokens"])
            first, last = min(first, float(row["started"])), max(last, float(row["ended"]))
            self.worker_seconds = last - first
            while next_index in finished:  # the manifest lists a shard once every shard before it is in place
                yield waiting.pop(next_index), finished.pop(next_index)
                next_index += 1


# --- the entry point -----------------------------------------------------------------------------------
@dataclass
class RaySummary(RunSummary):
    vocab_size: int = 0  # the teacher's
    workers: int = 0
    device: str = ""
    worker_seconds: float | None = None  # the workers' compute time (RayExecutor); None when nothing was computed


def write_signals_ray(model: str | Path, data: "str | Path | Any", out: Path, opts: SignalOptions, *,
                      resume: bool = False, num_workers: int | None = None, address: str | None = None,
                      device: str = "auto", progress: bool = False,
                      log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> RaySummary:
    """Write the shard directory `out` of `model`'s signals over `data` (a JSONL/Parquet path or a
    ray.data.Dataset of rows) on Ray workers: the same bytes as shards.write_signals.

    Ray is started here (`address`: an existing cluster, e.g. "auto" or "ray://head:10001"; None:
    a local one) unless this process already started it. device "auto" is cuda when the cluster has
    GPUs. num_workers: actors, one per GPU (default: every GPU of the cluster; 1 on the CPU).
    The returned summary's `worker_seconds` is the workers' compute time, from the first shard's
    start to the last one's end; `seconds` runs from the plan on (after Ray's start), the actors'
    start and model loads included."""
    ray = import_ray()
    from ..provider import load

    out = Path(out)
    if num_workers is not None and num_workers < 1:
        raise InputError(f"--num-workers must be >= 1, got {num_workers}")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be one of auto, cpu, cuda; got {device!r}")
    prepare_out_dir(out)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    elif address is not None:
        log(f"Ray is already running in this process: its cluster is used, not --address {address}")
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if device == "auto":
            device = "cuda" if gpus else "cpu"
            if not gpus:
                log("--device auto: the Ray cluster has no GPU; the workers run on the CPU")
        if device == "cuda" and not gpus:
            raise DeviceError("--device cuda: the Ray cluster has no GPU")
        have, unit = (gpus, "GPU") if device == "cuda" else (cpus, "CPU")
        workers = num_workers or (gpus if device == "cuda" else 1)
        if workers > have:
            raise InputError(f"--num-workers {workers}: the Ray cluster has {have} {unit}(s), one per worker")
        planner = load(model, device="cpu", max_batch_tokens=opts.batch_tokens)  # rows and metadata only
        model_sha = sha256_file(planner.model.path)
        executor = RayExecutor("demo" if str(model) == "demo" else str(planner.model.path.resolve()), model_sha,
                               device, out, opts, workers)
        source = data if isinstance(data, (str, Path)) else DatasetRows(data)
        summary = write_signals(planner, source, out, opts, resume=resume, progress=progress, log=log,
                                model_sha256=model_sha, executor=executor)
        return RaySummary(**vars(summary), vocab_size=planner.vocab_size, workers=workers, device=device,
                          worker_seconds=executor.worker_seconds)
    finally:
        if started_ray:
            ray.shutdown()
