"""Issue 15: a file that parses but whose data are corrupt never yields logits.

- the provider refuses NaN/Inf logits (and log-probs) with the sequence and position named;
- `q4k-engine verify` / `load(..., verify=True)` read the whole file: APR footer CRC, every tensor
  decoded and checked, a report per tensor, exit 2 on any failure;
- tensor byte ranges tile the data section (messages name both tensors); the layouts that real
  writers produce still open.
(The mutation classes themselves are in test_fuzz_files.py.)
"""
from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import q4k_engine
from q4k_engine.apr import read_apr
from q4k_engine.backend_cpu import NumpyBackend
from q4k_engine.cli.main import main
from q4k_engine.dtypes import GGMLType
from q4k_engine.errors import FormatError, InputError
from q4k_engine.gguf_file import read_gguf
from q4k_engine.convert import save_model
from q4k_engine.loader import open_model
from q4k_engine.provider import TeacherModel, _Span, make_backend
from q4k_engine.synthetic import synthetic_model
from q4k_engine.verify import verify_model

TINY = dict(hidden=64, ffn=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, n_merges=8)
NAN_F16 = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)


@pytest.fixture(scope="module")
def clean(module_seed):
    """llama: an untied head, so a poisoned embedding row spoils only the positions of its token."""
    return synthetic_model("llama", module_seed, **TINY)


def nan_at(t, row: int) -> tuple[int, bytes]:
    """Where in `t`'s bytes to write what, so that row `row` decodes to NaN: its first value for
    float types, else the f16 scale of its first block (Q6_K keeps the scale at the block's end)."""
    start = row * t.row_bytes
    if t.dtype == GGMLType.F32:
        return start, np.float32(np.nan).tobytes()
    if t.dtype == GGMLType.BF16:
        return start, np.float32(np.nan).tobytes()[2:]
    return start + (208 if t.dtype == GGMLType.Q6_K else 0), NAN_F16.tobytes()


def poison_row(model, name: str, row: int):
    """`model` with row `row` of tensor `name` decoding to NaN."""
    t = model.tensors[name]
    at, nan = nan_at(t, row)
    data = t.data.copy()
    data[at : at + len(nan)] = np.frombuffer(nan, np.uint8)
    return dataclasses.replace(model, tensors={**model.tensors, name: dataclasses.replace(t, data=data)})


def file_offset(f, t) -> int:
    return t.data.__array_interface__["data"][0] - f.buffer.__array_interface__["data"][0]


# --------------------------------------------------------------------------------------------
# the provider


@pytest.mark.parametrize("max_batch_tokens", [4096, 4])  # one forward, or one per sequence
def test_nonfinite_logits_are_refused(clean, rng, max_batch_tokens):
    bad = int(rng.integers(10, clean.config.vocab_size))
    teacher = TeacherModel(poison_row(clean, "token_embd.weight", bad), NumpyBackend(), max_batch_tokens=max_batch_tokens)
    batch = [[1, 2, 3, 4], [5, bad, 6]]
    calls = {
        "per position": lambda: teacher.logits_per_position(batch),
        "last": lambda: teacher.logits_for_batch(batch),
        "log_softmax": lambda: teacher.log_softmax(batch),
        "top-k last": lambda: teacher.topk_logprobs(batch, 3, positions="last"),
        "top-k all, chunked": lambda: TeacherModel(teacher.model, teacher.backend, chunk_tokens=2).topk_logprobs(batch, 3),
        "logits chunks": lambda: list(teacher.logits_chunks(batch)),
    }
    for what, call in calls.items():
        with pytest.raises(FormatError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "non-finite logits" in msg and "sequence 1, position" in msg, (what, msg)
        assert "q4k-engine verify" in msg
        if what in ("last", "top-k last"):
            assert "sequence 1, position 2" in msg, msg
    # a batch that avoids the poisoned token is computed, and matches the clean model's logits
    ok = teacher.logits_per_position([[1, 2, 3, 4]])[0]
    np.testing.assert_array_equal(ok, TeacherModel(clean, NumpyBackend()).logits_per_position([[1, 2, 3, 4]])[0])


@pytest.mark.parametrize("last_only,row,expect", [(False, 5, "sequence 9, position 1 "), (False, 0, "sequence 4, position 0 "),
                                                  (True, 1, "sequence 9, position 2:")])
def test_nonfinite_row_is_located(clean, last_only, row, expect):
    """A head chunk of packed rows (4 + 3 tokens of the batch's sequences 4 and 9) or of one row
    per sequence (their last positions, 3 and 2): the spans say whose rows they are."""
    teacher = TeacherModel(clean, NumpyBackend())
    spans = ([_Span(4, 3, 0, 1), _Span(9, 2, 1, 1)] if last_only else [_Span(4, 0, 0, 4), _Span(9, 0, 4, 3)])
    y = np.zeros((2 if last_only else 7, 11), np.float32)
    y[row, 3] = np.inf
    y[-1, 0] = np.nan
    with pytest.raises(FormatError, match=expect.replace("(", r"\(")):
        teacher._refuse_nonfinite(y, "logits", spans)
    teacher._refuse_nonfinite(np.zeros((7, 11), np.float32), "logits", spans)
    teacher._refuse_nonfinite(np.zeros((7, 11), np.int64), "logits", spans)


def test_all_finite_chunks(monkeypatch, rng):
    """The check runs in row blocks (a bounded temporary); a bad value in any block is found."""
    import q4k_engine.backend_cpu as backend_cpu

    monkeypatch.setattr(backend_cpu, "FINITE_CHUNK_VALUES", 64)
    be = NumpyBackend()
    x = rng.standard_normal((50, 16)).astype(np.float32)
    assert be.all_finite(x)
    for r in (0, 3, 4, 49):
        y = x.copy()
        y[r, int(rng.integers(16))] = rng.choice([np.nan, np.inf, -np.inf])
        assert not be.all_finite(y)


def test_overflowing_temperature_is_named(clean):
    teacher = TeacherModel(clean, NumpyBackend())
    with pytest.raises(InputError, match="not finite although the logits are .*temperature"):
        teacher.log_softmax([[1, 2, 3]], temperature=1e-300)


def test_cli_logits_on_nan_model(clean, tmp_path, rng):
    bad = int(rng.integers(10, clean.config.vocab_size))
    path = save_model(tmp_path / "nan.apr", poison_row(clean, "token_embd.weight", bad), keep_ggml_codes=True)
    for extra in ([], ["--out", str(tmp_path / "x.npz")], ["--positions", "last"]):
        r = CliRunner().invoke(main, ["logits", "--device", "cpu", "-m", str(path), "--tokens", f"1,{bad},2", *extra])
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "non-finite logits" in lines[0] and "Traceback" not in r.output, r.output
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".x.npz*"))


@pytest.mark.gpu
def test_cuda_refuses_poisoned_weight(clean, rng):
    bad = int(rng.integers(10, clean.config.vocab_size))
    teacher = TeacherModel(poison_row(clean, "token_embd.weight", bad), make_backend("cuda"))
    for call in (lambda: teacher.logits_per_position([[1, 2], [3, bad, 4]], dtype="float16"),
                 lambda: teacher.topk_logprobs([[1, 2], [3, bad, 4]], 5, positions="last")):
        with pytest.raises(FormatError, match="non-finite logits .* at sequence 1, position"):
            call()
    clean_teacher = TeacherModel(clean, make_backend("cuda"))
    assert np.isfinite(clean_teacher.logits_per_position([[1, 2], [3, bad, 4]])[0]).all()


# --------------------------------------------------------------------------------------------
# verify


@pytest.fixture(scope="module")
def files(clean, tmp_path_factory):
    d = tmp_path_factory.mktemp("verify")
    return {fmt: save_model(d / f"clean.{fmt}", clean, fmt, keep_ggml_codes=True) for fmt in ("apr", "gguf")}


def corrupt_copy(src, dest, name: str, row: int) -> None:
    """`src` with a NaN block scale in `row` of tensor `name`, written over its bytes in place."""
    f = read_apr(src) if src.suffix == ".apr" else read_gguf(src)
    t = f.tensors[name]
    data = bytearray(src.read_bytes())
    at, nan = nan_at(t, row)
    data[file_offset(f, t) + at : file_offset(f, t) + at + len(nan)] = nan
    dest.write_bytes(bytes(data))


def test_verify_clean_files(files):
    for fmt, path in files.items():
        report = verify_model(open_model(path))
        assert report.ok, report.failures
        assert len(report.tensors) == len(open_model(path).tensors)
        assert ("footer CRC32" if fmt == "apr" else "no checksum") in report.checksum.detail
        q4k_engine.load(path, device="cpu", verify=True)


@pytest.mark.parametrize("fmt", ["apr", "gguf"])
def test_verify_finds_the_bad_row(files, tmp_path, rng, fmt):
    src = files[fmt]
    name = "blk.0.attn_v.weight" if fmt == "gguf" else "model.layers.0.self_attn.v_proj.weight"
    rows = (read_apr(src) if fmt == "apr" else read_gguf(src)).tensors[name].rows
    row = int(rng.integers(rows))
    bad = tmp_path / f"bad.{fmt}"
    corrupt_copy(src, bad, name, row)
    report = verify_model(open_model(bad))
    failed = [t for t in report.tensors if not t.ok]
    assert [(t.name, t.bad_row) for t in failed] == [("blk.0.attn_v.weight", row)]
    assert report.checksum.ok == (fmt == "gguf")  # the APR footer CRC no longer matches
    with pytest.raises(FormatError) as e:
        q4k_engine.load(bad, device="cpu", verify=True)
    assert "\n" not in str(e.value) and "verification failed" in str(e.value)
    r = CliRunner().invoke(main, ["verify", str(bad)])
    assert r.exit_code == 2
    assert f"NaN/Inf in row {row} of {rows}" in r.stdout
    assert sum(" ok" in line for line in r.stdout.splitlines()) == len(report.tensors) - 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("q4k-engine: error: ") and "verification failed" in lines[0]


def test_verify_footer_crc(files, tmp_path, rng):
    """A flipped bit in the data that still decodes to finite values: only the CRC sees it."""
    src = files["apr"]
    f = read_apr(src)
    t = f.tensors["model.layers.0.self_attn.q_proj.weight"]
    data = bytearray(src.read_bytes())
    data[file_offset(f, t) + 2 + int(rng.integers(32))] ^= 1  # a low bit of a value or nibble: still finite
    bad = tmp_path / "crc.apr"
    bad.write_bytes(bytes(data))
    report = verify_model(open_model(bad))
    assert all(t.ok for t in report.tensors)
    assert not report.checksum.ok and "footer CRC32 mismatch" in report.checksum.detail
    r = CliRunner().invoke(main, ["verify", str(bad)])
    assert r.exit_code == 2 and "footer CRC32 mismatch" in r.stderr
    nofooter = tmp_path / "nofooter.apr"
    nofooter.write_bytes(src.read_bytes()[:-4])  # realizar's writers add no footer
    assert verify_model(open_model(nofooter)).checksum.detail.startswith("no footer CRC")
    r = CliRunner().invoke(main, ["verify", str(nofooter)])
    assert r.exit_code == 0 and r.stdout.strip().splitlines()[-1].endswith("tensors decode to finite values)")


# --------------------------------------------------------------------------------------------
# byte ranges: messages, and the layouts real writers produce


def raw_apr(entries: list[tuple[str, bytes]], offsets: list[int], aligned: bool = False, shift: int = 0,
            tail: bytes = b"") -> bytes:
    """An APR file laid out by hand: F32 tensors at the given offsets; the data section right after
    the unpadded index (realizar's test factories) or at the next 64-byte boundary, plus `shift`."""
    meta = json.dumps({"architecture": "llama"}).encode()
    index = b"".join(
        struct.pack("<H", len(n)) + n.encode() + struct.pack("<BBQ", 0, 1, len(v) // 4) + struct.pack("<QQ", off, len(v))
        for (n, v), off in zip(entries, offsets)
    )
    io = 64 + len(meta)
    do = io + len(index)
    do = (-(-do // 64) * 64 if aligned else do) + shift
    data = bytearray(max(off + len(v) for (_, v), off in zip(entries, offsets)))
    for (_, v), off in zip(entries, offsets):
        data[off : off + len(v)] = v
    header = struct.pack("<4sBBHIQIQQI20s", b"APR\0", 2, 0, 0, len(entries), 64, len(meta), io, do, 0, bytes(20))
    return header + meta + index + bytes(do - io - len(index)) + bytes(data) + tail


def test_apr_layouts(tmp_path):
    a, b = ("a", np.arange(3, dtype="<f4").tobytes()), ("b", np.ones(5, "<f4").tobytes())
    cases = {
        "packed (realizar test factory)": (raw_apr([a, b], [0, 12]), None),
        "aligned": (raw_apr([a, b], [0, 64], aligned=True), None),
        "aligned, footer": (raw_apr([a, b], [0, 64], aligned=True, tail=bytes(44) + b"crc!"), None),
        "overlap": (raw_apr([a, b], [0, 8]), "tensors a [" ),
        "gap in a packed layout": (raw_apr([a, b], [0, 13]), "1 bytes between tensors a and b"),
        "hole in an aligned layout": (raw_apr([a, b], [0, 128]), "116 bytes between tensors a and b"),
        "data offset shifted": (raw_apr([a, b], [0, 12], shift=1), "does not follow the tensor index"),
        "aligned data offset shifted": (raw_apr([a, b], [0, 64], aligned=True, shift=-1), "does not follow the tensor index"),
    }
    for what, (data, error) in cases.items():
        p = tmp_path / "x.apr"
        p.write_bytes(data)
        if error is None:
            f = read_apr(p)
            assert np.array_equal(f.tensors["b"].data.view("<f4"), np.ones(5)), what
        else:
            with pytest.raises(FormatError, match=error.replace("[", r"\[")) as e:
                read_apr(p)
            assert str(p) in str(e.value), what
    overlap = tmp_path / "o.apr"
    overlap.write_bytes(cases["overlap"][0])
    with pytest.raises(FormatError, match=r"tensors a \[\d+, \d+\) and b \[\d+, \d+\) overlap"):
        read_apr(overlap)


def test_gguf_overlap_names_both(files, tmp_path):
    src = files["gguf"]
    f = read_gguf(src)
    data = bytearray(src.read_bytes())
    nb = b"output_norm.weight"
    at = data.index(struct.pack("<Q", len(nb)) + nb) + 8 + len(nb)
    ndim = struct.unpack_from("<I", data, at)[0]
    data_start = min(file_offset(f, t) for t in f.tensors.values())
    embd = file_offset(f, f.tensors["token_embd.weight"]) - data_start
    struct.pack_into("<Q", data, at + 4 + 8 * ndim + 4, embd + 64)  # inside the embedding's bytes
    bad = tmp_path / "overlap.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"tensors token_embd.weight \[.*\) and output_norm.weight \[.*\) overlap"):
        open_model(bad)
