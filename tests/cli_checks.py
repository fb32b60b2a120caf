"""What every CLI failure must look like, for the tests of any command, and the CLI runs, output
comparisons and the full disk the tests share (import from a test as `from cli_checks import assert_one_line_error`:
pytest puts tests/ on sys.path)."""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Callable

from click.testing import CliRunner

from q4k_engine.cli.main import main


def invoke_demo_logits(*args: str):
    """`q4k-engine logits --model demo --device cpu ARGS` in-process (stdout and stderr apart)."""
    return CliRunner().invoke(main, ["logits", "--model", "demo", "--device", "cpu", *args])


def dir_bytes(d: Path) -> dict[str, bytes]:
    """Every file of an output directory by name: two runs are byte-identical when these are equal."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2 and exactly one line on stderr, `q4k-engine: error: ...`, holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("q4k-engine: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def disk_full_at(write: Callable, n: int) -> Callable:
    """A stand-in for a shard writer (`shards.write_parquet`): the n-th call fails as a full disk
    does (ENOSPC), every other one writes through `write`."""
    calls = 0

    def full_disk(path, data):
        nonlocal calls
        calls += 1
        if calls == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    return full_disk
