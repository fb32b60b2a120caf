"""Output files and interruptions, as a user meets them: files get the mode the umask gives (the
one atomic writer, binio.atomic_output, serves every command), and Ctrl-C anywhere in a command
exits 130 with one line and leaves nothing behind."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from q4k_engine.binio import UNITS, atomic_output
from q4k_engine.cli.main import main
from q4k_engine.provider import TeacherModel


@pytest.fixture
def umask():
    """Set a umask for the test, restored afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_every_output_file_gets_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    expect = 0o666 & ~mask
    with atomic_output(tmp_path / "plain.bin") as tmp:
        tmp.write_bytes(b"x")
    assert mode(tmp_path / "plain.bin") == expect
    for out in ("l.npz", "l.npy", "l.safetensors"):
        r = CliRunner().invoke(main, ["logits", "--device", "cpu", "--model", "demo", "--tokens", "1,2,3",
                                      "--out", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
        assert mode(tmp_path / out) == expect, out
    r = CliRunner().invoke(main, ["convert", "demo", str(tmp_path / "m.gguf")])
    assert r.exit_code == 0, r.output
    assert mode(tmp_path / "m.gguf") == expect
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.npy", "l.npz", "l.safetensors", "m.gguf", "plain.bin"]


def assert_interrupted(result, folder) -> None:
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines() == ["q4k-engine: interrupted"]
    assert list(folder.iterdir()) == [], "something was left behind"


def test_ctrl_c_during_the_forward_exits_130(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(TeacherModel, "logits_per_position", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(main, ["logits", "--device", "cpu", "--model", "demo", "--tokens", "1,2,3",
                                  "--out", str(out / "x.npz")])
    assert_interrupted(r, out)


@pytest.mark.parametrize("command", [["logits", "--device", "cpu", "--model", "demo", "--tokens", "1,2,3", "--out"],
                                     ["convert", "demo"]])
def test_ctrl_c_while_writing_leaves_nothing(tmp_path, monkeypatch, command):
    real_open = open

    class Interrupting:
        """A file that takes some bytes, then the user presses Ctrl-C."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            if self.written > 100:
                raise KeyboardInterrupt
            self.written += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def interrupting_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Interrupting(f) if "w" in mode and ".part" in str(file) else f

    monkeypatch.setattr("builtins.open", interrupting_open)
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(main, [*command, str(out / ("x.npz" if command[0] == "logits" else "m.apr"))])
    assert_interrupted(r, out)


def test_interrupted_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_inspect_sizes_in_one_stated_unit_system():
    r = CliRunner().invoke(main, ["inspect", "demo"])
    assert r.exit_code == 0, r.output
    assert "iB" not in r.stdout  # no binary units beside the decimal ones
    assert f"({UNITS})" in r.stdout and " MB" in r.stdout


def test_real_sigint_exits_130_and_leaves_nothing(tmp_path):
    """A real Ctrl-C (SIGINT to the process) in the middle of the forward, through click's own main."""
    out, ready = tmp_path / "out", tmp_path / "ready"
    out.mkdir()
    # The script's first lines give it Python's Ctrl-C handler, as a program started from a terminal
    # has: a pytest run started in the background of a non-interactive shell has SIGINT ignored, which
    # the child inherits, and then Python installs none.
    script = f"""
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
import time
from pathlib import Path
from q4k_engine.provider import TeacherModel
from q4k_engine.cli.main import main

def slow(*a, **k):  # the forward, taking its time
    Path({str(ready)!r}).touch()
    time.sleep(60)

TeacherModel.logits_per_position = slow
main(["logits", "--device", "cpu", "--model", "demo", "--tokens", "1,2,3", "--out", {str(out / "x.npz")!r}])
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["q4k-engine: interrupted"]
    assert list(out.iterdir()) == []
