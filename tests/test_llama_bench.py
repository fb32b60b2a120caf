"""bench/llama_bench.py without a GPU or a llama-bench binary: reading llama-bench's JSON (a recorded
output of the vendored llama.cpp), finding the CUDA libraries it links against, choosing or
building the binary, and the tables."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from bench_scripts import bench_module

from q4k_engine.errors import DeviceError, InputError

SAMPLE = Path(__file__).resolve().parent / "llama_bench_sample.json"


lb = bench_module("llama_bench")


def test_parse_recorded_output():
    """A real `llama-bench -o json` run (CPU build of the vendored llama.cpp, 2-layer synthetic
    Qwen2-7B): one row per test, tokens/s as llama-bench computed them from its samples."""
    raw = json.loads(SAMPLE.read_text())
    rows = lb.parse_json(SAMPLE.read_text())
    assert [r.test for r in rows] == [f"pp{t['n_prompt']}" if t["n_prompt"] else f"tg{t['n_gen']}" for t in raw]
    assert {r.test for r in rows} >= {"pp64", "tg8"}
    for r, t in zip(rows, raw):
        assert r.tps_mean == pytest.approx(sum(t["samples_ts"]) / len(t["samples_ts"]), rel=1e-3)
        assert r.reps == len(t["samples_ts"]) and r.tps_std >= 0
        assert r.build == f"{t['build_commit']} (b{t['build_number']})" and t["build_commit"] != "unknown"
        assert r.flash_attn in ("on", "off", "auto")


def test_parse_names_tests_and_flash_attn_codes():
    base = json.loads(SAMPLE.read_text())[0]
    mixed = [dict(base, n_prompt=512, n_gen=128, n_depth=0, flash_attn=1),
             dict(base, n_prompt=0, n_gen=128, n_depth=4096, flash_attn=-1),
             dict(base, n_prompt=2048, n_gen=0, flash_attn=False)]  # older builds: a bool
    rows = lb.parse_json(json.dumps(mixed))
    assert [(r.test, r.flash_attn) for r in rows] == [("pp512+tg128", "on"), ("tg128 @ d4096", "auto"), ("pp2048", "off")]


@pytest.mark.parametrize("text, says", [("not json", "not JSON"), ('{"a": 1}', "not a JSON list"),
                                        ('[{"n_prompt": 512}]', "test 0: missing or bad field 'n_gen'")])
def test_parse_refuses_other_output(text, says):
    with pytest.raises(InputError, match=says):
        lb.parse_json(text)


def _lib(d: Path, *names: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"")
    return d


def test_cuda_lib_dirs(tmp_path):
    """pip's nvidia/cu13/lib first, then other nvidia/*/lib, then the system toolkit; only dirs
    holding a CUDA runtime or cuBLAS library, each once."""
    sp1, sp2 = tmp_path / "sp1", tmp_path / "sp2"
    cu13 = _lib(sp1 / "nvidia" / "cu13" / "lib", "libcudart.so.13", "libcublas.so.13")
    cublas = _lib(sp1 / "nvidia" / "cublas" / "lib", "libcublasLt.so.13")
    _lib(sp1 / "nvidia" / "nccl" / "lib", "libnccl.so.2")  # not one llama-bench needs
    system = _lib(tmp_path / "usr-local-cuda" / "lib64", "libcudart.so.13")
    (tmp_path / "alias").symlink_to(system)
    found = lb.cuda_lib_dirs([sp1, sp2, sp1], system=(system, tmp_path / "alias", tmp_path / "missing"))
    assert found == [cu13, cublas, system]
    assert lb.cuda_lib_dirs([sp2], system=()) == []


def test_run_env_puts_lib_dirs_first(tmp_path):
    env = lb.run_env([tmp_path / "a", tmp_path / "b"], {"LD_LIBRARY_PATH": "/old", "X": "1"})
    assert env["LD_LIBRARY_PATH"] == os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b"), "/old"])
    assert env["X"] == "1"
    assert lb.run_env([tmp_path / "a"], {})["LD_LIBRARY_PATH"] == str(tmp_path / "a")


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_binary_prefers_the_carried_one(tmp_path):
    whl = tmp_path / ".whl"
    carried = _script(whl / "llama-bench", '[ "$1" = --list-devices ] && echo "Available devices:"')
    assert lb.find_binary(whl, tmp_path / "build", tmp_path / "no-script.sh", lib_dirs=[]) == carried


def test_find_binary_unpacks_the_carried_xz(tmp_path, capsys):
    """The binary is carried xz-compressed (~21 MB, not ~50): unpacked once into the build dir,
    executable, byte for byte."""
    import lzma

    whl, build = tmp_path / ".whl", tmp_path / "build"
    whl.mkdir()
    body = b"#!/bin/sh\nexit 0\n" + bytes(range(256)) * 8  # a script, then bytes of every value
    (whl / "llama-bench.xz").write_bytes(lzma.compress(body))
    got = lb.find_binary(whl, build, tmp_path / "no-script.sh", lib_dirs=[])
    assert got == build / "llama-bench" and got.read_bytes() == body and os.access(got, os.X_OK)
    assert "unpacked" in capsys.readouterr().err
    lb.find_binary(whl, build, tmp_path / "no-script.sh", lib_dirs=[])
    assert "unpacked" not in capsys.readouterr().err  # once


def test_find_binary_restores_a_lost_execute_bit(tmp_path, capsys):
    whl = tmp_path / ".whl"
    carried = _script(whl / "llama-bench", "exit 0")
    carried.chmod(0o644)
    assert lb.find_binary(whl, tmp_path / "build", tmp_path / "no-script.sh", lib_dirs=[]) == carried
    assert os.access(carried, os.X_OK) and "was not executable; made it so" in capsys.readouterr().err


def test_find_binary_builds_once_when_the_carried_one_fails(tmp_path, capsys):
    """A carried binary that does not run (missing library, other CPU) is passed over with a line
    saying why; the stripped sdist is built with the build script, and that build is reused."""
    whl, build = tmp_path / ".whl", tmp_path / "build"
    _script(whl / "llama-bench", 'echo "error while loading shared libraries: libcublas.so.13" >&2; exit 127')
    (whl / "llama-cpp-python-0.3.36-stripped.tar.gz").write_bytes(b"")
    calls = tmp_path / "calls"
    script = _script(tmp_path / "build.sh", f'echo "$@" >> {calls}\n'
                     'printf \'#!/bin/sh\\nexit 0\\n\' > "$2/llama-bench"; chmod +x "$2/llama-bench"')
    got = lb.find_binary(whl, build, script, lib_dirs=[])
    assert got == build / "llama-bench"
    err = capsys.readouterr().err
    assert "not using" in err and "libcublas.so.13" in err and "building llama-bench from" in err
    assert calls.read_text().split() == [str(whl / "llama-cpp-python-0.3.36-stripped.tar.gz"), str(build)]
    assert lb.find_binary(whl, build, script, lib_dirs=[]) == got
    assert len(calls.read_text().splitlines()) == 1  # built once


def test_find_binary_says_why_when_nothing_can_run(tmp_path):
    with pytest.raises(DeviceError, match=r"no runnable llama-bench .*no such file.*stripped\.tar\.gz"):
        lb.find_binary(tmp_path / ".whl", tmp_path / "build", tmp_path / "build.sh", lib_dirs=[])
    whl = tmp_path / ".whl"
    (whl).mkdir()
    (whl / "llama-cpp-python-0.3.36-stripped.tar.gz").write_bytes(b"")
    failing = _script(tmp_path / "build.sh", 'echo "nvcc fatal: unsupported gpu architecture" ; exit 2')
    with pytest.raises(DeviceError, match="building llama-bench failed .*unsupported gpu architecture"):
        lb.find_binary(whl, tmp_path / "build", failing, lib_dirs=[])


def test_command_line(tmp_path):
    cmd = lb.command(Path("/x/llama-bench"), tmp_path / "m.gguf", (512, 2048), 128, True, 99, 3)
    assert cmd == ["/x/llama-bench", "-m", str(tmp_path / "m.gguf"), "-p", "512,2048", "-n", "128", "-fa", "on",
                   "-ngl", "99", "-r", "3", "-o", "json"]
    assert lb.command(Path("b"), Path("m"), (64,), 8, False, 0, 1)[5:11] == ["-n", "8", "-fa", "off", "-ngl", "0"]


def test_run_refuses_a_missing_model(tmp_path):
    with pytest.raises(InputError, match="no such model file"):
        lb.run(tmp_path / "none.gguf", binary=Path("/bin/true"))


def test_tables():
    rows = lb.parse_json(SAMPLE.read_text())
    text = lb.table(rows, "m.gguf")
    assert text.count("\n| ") == len(rows) + 1 and rows[0].build in text
    for r in rows:
        assert f"| {r.test} | {r.tps_mean:,.1f} | {r.tps_std:,.1f} | {r.reps} |" in text
    pp, tg = rows[0], rows[-1]
    figs = [lb.EngineFigure("prefill 1x64", pp.tps_mean * 2.5, pp.test),
            lb.EngineFigure("decode batch 1", tg.tps_mean / 4, tg.test),
            lb.EngineFigure("prefill 1x4096", 1000.0, "pp4096")]
    cmp = lb.compare_table(figs, rows, "HEADER").splitlines()
    assert cmp[0] == "HEADER" and len(cmp) == 4 + len(figs)
    assert cmp[4].endswith("| 2.50x |") and cmp[5].endswith("| 0.25x |")
    assert "| pp4096 | not run |" in cmp[6]
    with pytest.raises(InputError, match="ran no test"):
        lb.table([], "m.gguf")


def test_synthetic_gguf_has_what_llama_cpp_needs(tmp_path):
    """What llama.cpp's vocabulary loader (src/llama-vocab.cpp) demands of a byte-level BPE GGUF,
    checked on the synthetic shapes' tokenizer (bench/make_7b.py --format gguf): tokenizer model
    "gpt2" with merges, a pre-tokenizer name it knows ("gpt-2"), one distinct non-empty token per
    embedding row (it aborts on duplicates), a token type per token, every byte's token (its
    byte_to_token lookup throws without one), BOS/EOS ids that are control tokens; merges "a b"
    whose parts and result are tokens."""
    import gguf
    import numpy as np

    from q4k_engine.shapes import write_shape
    from q4k_engine.tokenizer import bytes_to_unicode

    r = gguf.GGUFReader(write_shape(tmp_path / "tiny.gguf", "tiny", n_layers=1))

    def field(key):
        f = r.fields[key]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            return [f.contents(i) for i in range(len(f.data))]
        return f.contents()

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == len(types) == int(embd.shape[1])  # GGUF shapes are [hidden, vocab]
    assert len(set(tokens)) == len(tokens) and all(tokens)
    assert set(bytes_to_unicode().values()) <= set(tokens)
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert types[field(key)] == 3, key  # LLAMA_TOKEN_TYPE_CONTROL
    merges, vocab = field("tokenizer.ggml.merges"), set(tokens)
    assert merges and all(m.find(" ", 1) > 0 for m in merges)
    assert all({a, b, a + b} <= vocab for a, b in (m.split(" ", 1) for m in merges))
    assert set(np.unique(types)) <= {1, 3, 5}  # normal, control, unused (the padding rows)
    assert field("general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M: else llama.cpp guesses, e.g. "all F32"
    assert r.fields["general.file_type"].types == [gguf.GGUFValueType.UINT32]  # the type llama.cpp reads
