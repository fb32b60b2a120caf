"""`q4k-engine logits ... --out DIR/ --ray`: the shard stage on a local Ray cluster of CPU actors (demo model).

Every byte of every shard and of the manifest equals the single-process run's, with 1 and 2 workers,
after an actor killed while writing a shard, and after a run stopped as a whole and resumed; a
ray.data.Dataset of the same rows gives the same shards. One local Ray cluster serves the module."""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
import ray

from q4k_engine.distill import ray_run, shards
from q4k_engine.distill.ray_run import DATASET_NAME, write_signals_ray
from q4k_engine.distill.rows import RowOptions
from q4k_engine.distill.shards import MANIFEST, SignalOptions
from q4k_engine.errors import InputError, UnsupportedError

from cli_checks import dir_bytes as files, invoke_demo_logits as invoke
from conftest import fresh_seed
from distill_data import mixed_rows, write_jsonl

ARGS = ("--top-k", "4", "--temperature", "1.5", "--shard-rows", "6", "--max-seq-len", "24", "--batch-tokens", "64")
N_SHARDS = 8  # 48 rows, 6 per shard


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """Two CPUs: two one-CPU actors at most. The test classes below travel to the actors by value
    (the actors cannot import this module)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, demo) -> Path:
    seed = fresh_seed("ray dataset")
    return write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", mixed_rows(48, demo.vocab_size, seed))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> dict[str, bytes]:
    """The single-process CLI run every Ray run must equal."""
    out = tmp_path_factory.mktemp("single") / "signals"
    r = invoke("--input", str(dataset), "--out", str(out), *ARGS)
    assert r.exit_code == 0, r.output
    got = files(out)
    assert len(got) == N_SHARDS + 1
    return got


def assert_one_line_error(result, *fragments: str):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("q4k-engine: error: ")]
    assert len(errors) == 1, result.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_same_bytes_as_the_single_process_run(dataset, reference, tmp_path, workers):
    out = tmp_path / "signals"
    r = invoke("--input", str(dataset), "--out", f"{out}/", *ARGS, "--ray", "--num-workers", str(workers))
    assert r.exit_code == 0, r.output
    assert f"Ray: {workers} worker(s) on cpu" in r.stderr and "tokens/s" in r.stderr
    assert f"wrote {N_SHARDS} of {N_SHARDS} shard(s)" in r.stderr
    assert files(out) == reference


class CrashOnce(ray_run.ShardWorker):
    """Dies (the process exits, as a killed actor does) half-way through writing shard CRASH_SHARD, the
    first time only: a marker on disk tells the restarted actor that the crash has happened."""

    def __call__(self, batch):
        import pickle

        index = pickle.loads(batch["job"][0])[0]
        marker = self.out.parent / "crashed"
        if index == 3 and not marker.exists():
            marker.write_text(str(os.getpid()))
            real = shards.write_parquet

            def write_half_then_die(path, data):
                real(path, data)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                os._exit(1)

            shards.write_parquet = write_half_then_die  # this actor process only
        return super().__call__(batch)


def test_an_actor_killed_mid_shard_is_restarted_and_the_output_is_identical(dataset, reference, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(ray_run, "ShardWorker", CrashOnce)
    out = tmp_path / "signals"
    r = invoke("--input", str(dataset), "--out", str(out), *ARGS, "--ray", "--num-workers", "2")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "crashed").exists()  # the crash did happen (and the actor's process is gone)
    assert files(out) == reference  # no temporary left behind, every shard whole


class AlwaysCrashAtShard1(ray_run.ShardWorker):
    def __call__(self, batch):
        import pickle

        if pickle.loads(batch["job"][0])[0] == 1:
            os._exit(1)
        return super().__call__(batch)


def test_a_shard_that_always_kills_its_worker_ends_the_run_in_one_line(dataset, tmp_path, monkeypatch):
    """Ray restarts the actor and retries the shard SHARD_RETRIES times, then the run stops, resumable."""
    monkeypatch.setattr(ray_run, "ShardWorker", AlwaysCrashAtShard1)
    out = tmp_path / "signals"
    r = invoke("--input", str(dataset), "--out", str(out), *ARGS, "--ray", "--num-workers", "1")
    assert_one_line_error(r, "a Ray worker kept dying", f"{ray_run.SHARD_RETRIES} retries", "--resume")
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] in ([], ["shard-00000.parquet"])


class DiskFullAtShard4(ray_run.ShardWorker):
    """A run stopped as a whole: the disk is full when shard 4 is written, so the run ends there."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        real = shards.write_parquet

        def full_disk(path, data):
            if data.index == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(path, data)

        shards.write_parquet = full_disk  # this actor process only


def test_a_stopped_run_resumes_from_its_manifest(dataset, reference, tmp_path, monkeypatch):
    out = tmp_path / "signals"
    args = ("--input", str(dataset), "--out", str(out), *ARGS, "--ray", "--num-workers", "2")
    monkeypatch.setattr(ray_run, "ShardWorker", DiskFullAtShard4)
    assert_one_line_error(invoke(*args), "shard-00004.parquet", "No space left on device")
    manifest = json.loads((out / MANIFEST).read_text())
    assert not manifest["complete"]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.parquet" for i in range(len(manifest["shards"]))]
    assert len(manifest["shards"]) <= 4  # a prefix: never a shard after a missing one
    monkeypatch.undo()
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert files(out) == reference
    # and the single-process run takes over a Ray run's directory, and the other way round
    r = invoke("--input", str(dataset), "--out", str(out), *ARGS, "--resume")
    assert r.exit_code == 0 and "already complete" in r.stderr and files(out) == reference


def test_a_ray_dataset_gives_the_same_shards(demo, dataset, tmp_path):
    """Rows from a ray.data.Dataset (the same lines, read by Ray): the shards of the path run, and a
    manifest that differs only in naming its input."""
    opts = SignalOptions(kind="dense", dtype="float16", shard_rows=10, batch_tokens=64,
                         rows=RowOptions(max_seq_len=16))
    by_path, by_dataset = tmp_path / "path", tmp_path / "dataset"
    write_signals_ray("demo", dataset, by_path, opts, num_workers=2, device="cpu", log=lambda _: None)
    ds = ray.data.read_json(str(dataset))
    s = write_signals_ray("demo", ds, by_dataset, opts, num_workers=1, device="cpu", log=lambda _: None)
    assert s.rows == 48 and s.shards == 5 and s.workers == 1 and s.worker_seconds > 0
    a, b = files(by_path), files(by_dataset)
    assert sorted(a) == sorted(b) == [MANIFEST] + [f"shard-{i:05d}.safetensors" for i in range(5)]
    assert all(a[name] == b[name] for name in a if name != MANIFEST)
    ma, mb = json.loads(a[MANIFEST]), json.loads(b[MANIFEST])
    assert mb["options"].pop("input")["file"] == DATASET_NAME and ma["options"].pop("input")["file"] == "data.jsonl"
    assert ma == mb
    # its identity is its rows: another order of the same rows cannot resume it
    lines = dataset.read_text().splitlines()
    other = write_jsonl(tmp_path / "other.jsonl", [json.loads(x) for x in lines[1:] + lines[:1]])
    with pytest.raises(InputError, match="input file differs"):
        write_signals_ray("demo", ray.data.read_json(str(other)), by_dataset, opts, resume=True, device="cpu",
                          log=lambda _: None)


def test_without_ray_it_says_so_in_one_line(dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(UnsupportedError, match=r"^--ray needs Ray: pip install 'q4k-engine\[ray\]'$"):
        ray_run.import_ray()
    r = invoke("--input", str(dataset), "--out", str(tmp_path / "s"), "--ray")
    assert_one_line_error(r, "--ray needs Ray: pip install 'q4k-engine[ray]'")


def test_ray_options_are_checked_before_any_work(dataset, tmp_path):
    out = str(tmp_path / "s")
    assert_one_line_error(invoke("--input", str(dataset), "--out", out, "--num-workers", "2"), "--num-workers",
                          "without --ray")
    assert_one_line_error(invoke("--input", str(dataset), "--out", out, "--address", "auto"), "--address")
    assert_one_line_error(invoke("--tokens", "1,2", "--ray"), "--ray", "shard directory")
    assert_one_line_error(invoke("--input", str(dataset), "--out", out, "--ray", "--num-workers", "3"),
                          "--num-workers 3", "2 CPU(s)")
    assert_one_line_error(invoke("--input", str(dataset), "--out", out, "--ray", "--device", "cuda"),
                          "no GPU")
    assert not (tmp_path / "s" / MANIFEST).exists()
