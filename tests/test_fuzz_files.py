"""Property: a mutated model file either works (loads, and a 4-token forward gives finite logits)
or fails with a one-line Q4KError that no safety net produced ("internal") — never another
exception, never a hang, never NaN handed to a caller. Through the API (load + forward) and the
CLI (`inspect`, `logits`: exit 2, one line on stderr, no traceback).

Three kinds of mutation:
- random bytes: flips and overwrites (mostly in the header, metadata and index) and truncation;
- the classes of issue 15, one named case each: a tensor offset moved into another tensor, the
  APR data_offset shifted under a re-sealed header CRC, dtype codes swapped to a type of another
  size and of the same size, GGUF general.alignment changed, layer numbers of thousands of digits,
  metadata numbers beyond float range (10^309), NaN, -0.0 and bools where integers are meant;
- the same classes with random parameters (which tensor, by how much, which code).

A dtype swapped to a type of the same byte size (Q4_K <-> Q4_0, APR 12 -> 2/8/128) leaves a file
that no structural check can tell from a valid one: it must either fail cleanly or give finite
logits (the provider refuses NaN/Inf, so a silent NaN is impossible either way).

CI runs a bounded number of random cases. A longer campaign (thousands of cases) by hand:

    Q4K_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/test_fuzz_files.py

(tests/FUZZING.md says more.)
"""
from __future__ import annotations

import itertools
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from q4k_engine import load
from q4k_engine.apr import read_apr, write_apr
from q4k_engine.cli.main import main
from q4k_engine.dtypes import TYPE_INFO, GGMLType
from q4k_engine.errors import Q4KError
from q4k_engine.gguf_file import read_gguf, write_gguf
from q4k_engine.synthetic import write_synthetic
from q4k_engine.tensors import QTensor

TINY = dict(hidden=64, ffn=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, n_merges=8)
# Rows of 256 values: the k-quants (Q4_K, Q6_K) appear, whose same-size twins are the hard case.
SMALL = dict(hidden=256, ffn=256, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=128, n_merges=8)
EXAMPLES = int(os.environ.get("Q4K_FUZZ_EXAMPLES", 300))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
TOKENS = [1, 2, 3, 4]

_names = itertools.count()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------------------------
# outcomes: a clean error, or finite logits


def assert_clean(msg: str, path: Path) -> None:
    assert "\n" not in msg and str(path) in msg, msg
    assert "internal" not in msg, f"a corrupt file slipped past the checks: {msg}"


def api_outcome(path: Path) -> str:
    """'error' (a clean one-line Q4KError) or 'finite' (loaded, and the forward's logits are)."""
    try:
        logits, _ = load(path, device="cpu").logits_per_position([TOKENS])
    except Q4KError as e:
        assert_clean(str(e), path)
        return "error"
    assert np.isfinite(logits).all(), "non-finite logits reached the caller"
    return "finite"


def cli_check(path: Path, api: str) -> None:
    """`inspect` and `logits` agree with the API: exit 2 with one clean line, or exit 0."""
    runner = CliRunner()
    for args in (["inspect", str(path)], ["logits", "--device", "cpu", "-m", str(path), "--tokens", ",".join(map(str, TOKENS))]):
        r = runner.invoke(main, args)
        assert r.exit_code in (0, 2) and (r.exception is None or isinstance(r.exception, SystemExit)), (args, r.output, r.exception)
        if args[0] == "logits":
            assert r.exit_code == (2 if api == "error" else 0), (api, r.output)
        if r.exit_code == 2:
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("q4k-engine: error: "), r.stderr
            assert_clean(lines[0], path)
            assert "Traceback" not in r.output


def outcome(workdir: Path, data: bytes, suffix: str, cli: bool = False) -> str:
    path = workdir / f"m{next(_names)}{suffix}"
    path.write_bytes(data)
    try:
        result = api_outcome(path)
        if cli:
            cli_check(path, result)
        return result
    finally:
        path.unlink()


# --------------------------------------------------------------------------------------------
# the base files and where their fields lie


@dataclass(frozen=True)
class Entry:
    """One tensor's index entry (APR) or tensor info (GGUF): where its fields are in the file."""

    name: str
    code: int
    code_at: int
    offset: int
    offset_at: int
    size_at: int | None  # APR only: GGUF derives sizes from dtype and shape


@dataclass(frozen=True, repr=False)  # Hypothesis prints the strategy's arguments: keep it short
class Base:
    fmt: str
    data: bytes
    entries: dict[str, Entry]
    prefix: int  # length of the structural part (header, metadata, index): where bytes matter most

    def __repr__(self) -> str:
        return f"Base({self.fmt}, {len(self.data)} bytes, {len(self.entries)} tensors)"


def apr_entries(data: bytes, names) -> dict[str, Entry]:
    out = {}
    for name in names:
        nb = name.encode()
        at = data.index(struct.pack("<H", len(nb)) + nb) + 2 + len(nb)
        code, ndim = data[at], data[at + 1]
        offset_at = at + 2 + 8 * ndim
        out[name] = Entry(name, code, at, struct.unpack_from("<Q", data, offset_at)[0], offset_at, offset_at + 8)
    return out


def gguf_entries(data: bytes, names) -> dict[str, Entry]:
    out = {}
    for name in names:
        nb = name.encode()
        at = data.index(struct.pack("<Q", len(nb)) + nb) + 8 + len(nb)
        ndim = struct.unpack_from("<I", data, at)[0]
        code_at = at + 4 + 8 * ndim
        out[name] = Entry(name, struct.unpack_from("<I", data, code_at)[0], code_at,
                          struct.unpack_from("<Q", data, code_at + 4)[0], code_at + 4, None)
    return out


def make_base(path: Path) -> Base:
    data = path.read_bytes()
    if path.suffix == ".apr":
        f = read_apr(path)
        return Base("apr", data, apr_entries(data, f.tensors), f.header.data_offset)
    f = read_gguf(path)
    entries = gguf_entries(data, f.tensors)
    return Base("gguf", data, entries, min(f.buffer.size - t.data.size for t in f.tensors.values()))


@pytest.fixture(scope="module")
def bases(workdir, module_seed) -> dict[str, Base]:
    """qwen2 APR (GGML dtype codes, marked), mistral APR (portable codes only: codes 2/8 keep
    their legacy meanings), llama GGUF (Q4_1 present) with an explicit general.alignment."""
    qwen2 = write_synthetic(workdir / "qwen2.apr", "qwen2", "apr", seed=module_seed, keep_ggml_codes=True, **SMALL)
    mistral = write_synthetic(workdir / "mistral.apr", "mistral", "apr", seed=module_seed + 1, **SMALL)
    llama = write_synthetic(workdir / "llama0.gguf", "llama", "gguf", seed=module_seed + 2, **SMALL)
    g = read_gguf(llama)
    write_gguf(workdir / "llama.gguf", {**g.metadata, "general.alignment": 32}, g.tensors.values())
    return {k: make_base(p) for k, p in (("qwen2", qwen2), ("mistral", mistral), ("llama", workdir / "llama.gguf"))}


@pytest.fixture(scope="module")
def tiny(workdir) -> dict[str, Base]:
    apr = write_synthetic(workdir / "tiny.apr", "qwen2", "apr", seed=1, keep_ggml_codes=True, **TINY)
    gguf = write_synthetic(workdir / "tiny.gguf", "gemma3", "gguf", seed=2, **TINY)
    return {"apr": make_base(apr), "gguf": make_base(gguf)}


# --------------------------------------------------------------------------------------------
# mutators: each takes the base and returns the mutated bytes


def seal(out: bytearray) -> bytearray:
    """Re-compute the APR header CRC, so that a mutation reaches the checks behind it."""
    struct.pack_into("<I", out, 40, zlib.crc32(bytes(out[:40] + out[44:64])))
    return out


def set_offset(b: Base, name: str, offset: int) -> bytes:
    out = bytearray(b.data)
    struct.pack_into("<Q", out, b.entries[name].offset_at, offset % 2**64)  # negative: wraps like a corrupt u64
    return bytes(out)


def move_into(b: Base, name: str, other: str, delta: int) -> bytes:
    """`name`'s data now starts `delta` bytes into `other`'s."""
    return set_offset(b, name, b.entries[other].offset + delta)


def set_code(b: Base, name: str, code: int) -> bytes:
    out = bytearray(b.data)
    e = b.entries[name]
    if b.fmt == "apr":
        out[e.code_at] = code
    else:
        struct.pack_into("<I", out, e.code_at, code)
    return bytes(out)


def shift_data_offset(b: Base, delta: int) -> bytes:
    out = bytearray(b.data)
    struct.pack_into("<Q", out, 32, (struct.unpack_from("<Q", out, 32)[0] + delta) % 2**64)
    return bytes(seal(out))


def grow_size(b: Base, name: str, delta: int) -> bytes:
    out = bytearray(b.data)
    at = b.entries[name].size_at
    struct.pack_into("<Q", out, at, (struct.unpack_from("<Q", out, at)[0] + delta) % 2**64)
    return bytes(out)


def set_alignment(b: Base, value: int) -> bytes:
    key = b"general.alignment"
    at = b.data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", b.data, at)[0] == 4  # UINT32
    out = bytearray(b.data)
    struct.pack_into("<I", out, at + 4, value)
    return bytes(out)


def by_type(b: Base, dtype: GGMLType) -> str:
    """The first 2-D tensor of `dtype` in the base file."""
    return next(n for n, e in b.entries.items() if e.code == dtype and not n.endswith("norm.weight"))


def neighbours(b: Base) -> tuple[str, str]:
    """The first two tensors of the data section, in file order."""
    ordered = sorted(b.entries.values(), key=lambda e: e.offset)
    return ordered[0].name, ordered[1].name


# (id, base, mutator, expected): "error" = must fail cleanly; "either" = a file no structural
# check can tell from a valid one: a clean error or finite logits.
Case = tuple[str, str, Callable[[Base], bytes], str]

OVERLAPS: list[Case] = [
    ("gguf-offset-into-next", "llama", lambda b: move_into(b, neighbours(b)[0], neighbours(b)[1], 32), "error"),
    ("gguf-offset-onto-other", "llama", lambda b: move_into(b, neighbours(b)[1], neighbours(b)[0], 0), "error"),
    ("gguf-offset-into-previous", "llama", lambda b: move_into(b, neighbours(b)[1], neighbours(b)[0], 64), "error"),
    ("apr-offset-into-next", "qwen2", lambda b: move_into(b, neighbours(b)[0], neighbours(b)[1], 64), "error"),
    ("apr-offset-onto-other", "qwen2", lambda b: move_into(b, neighbours(b)[1], neighbours(b)[0], 0), "error"),
    ("apr-offset-by-one", "mistral", lambda b: move_into(b, neighbours(b)[1], neighbours(b)[1], 1), "error"),
    ("apr-size-plus-one", "mistral", lambda b: grow_size(b, neighbours(b)[0], 1), "error"),
]
DATA_OFFSETS: list[Case] = [
    (f"apr-data-offset{d:+d}-{base}", base, lambda b, d=d: shift_data_offset(b, d), "error")
    for base in ("qwen2", "mistral") for d in (1, -1, 64, -64, 7)
]
DTYPES: list[Case] = [
    ("gguf-q4_1-to-f32", "llama", lambda b: set_code(b, by_type(b, GGMLType.Q4_1), GGMLType.F32), "error"),
    ("gguf-q4_k-to-q8_0", "llama", lambda b: set_code(b, by_type(b, GGMLType.Q4_K), GGMLType.Q8_0), "error"),
    ("gguf-q6_k-to-q4_k", "llama", lambda b: set_code(b, by_type(b, GGMLType.Q6_K), GGMLType.Q4_K), "error"),
    ("gguf-f32-to-f16", "llama", lambda b: set_code(b, "blk.0.attn_norm.weight", GGMLType.F16), "error"),
    ("gguf-q4_k-to-q4_0", "llama", lambda b: set_code(b, by_type(b, GGMLType.Q4_K), GGMLType.Q4_0), "either"),
    ("apr-q4_k-to-f32", "qwen2", lambda b: set_code(b, by_type(b, GGMLType.Q4_K), 0), "error"),
    ("apr-q6_k-to-q4_k", "qwen2", lambda b: set_code(b, by_type(b, GGMLType.Q6_K), 12), "error"),
    ("apr-q4_k-to-8-ggml", "qwen2", lambda b: set_code(b, by_type(b, GGMLType.Q4_K), 8), "error"),
    ("apr-q4_k-to-2-ggml", "qwen2", lambda b: set_code(b, by_type(b, GGMLType.Q4_K), 2), "either"),
    *[(f"apr-q4_k-to-{c}-legacy", "mistral", lambda b, c=c: set_code(b, by_type(b, GGMLType.Q4_K), c), "either")
      for c in (2, 8, 128)],
]
ALIGNMENTS: list[Case] = [
    (f"gguf-alignment-{a}", "llama", lambda b, a=a: set_alignment(b, a), "moves") for a in (1, 2, 8, 16, 64, 1 << 20, 24, 0)
]


def moves_data(b: Base, alignment: int) -> bool:
    """Whether `alignment` (instead of 32) moves the data section, or is no alignment at all. If
    it does not, and every tensor size is a multiple of it, the file reads exactly as before."""
    infos_end = max(e.offset_at + 8 for e in b.entries.values())
    if alignment <= 0 or alignment & (alignment - 1):
        return True
    return -(-infos_end // alignment) * alignment != -(-infos_end // 32) * 32


@pytest.mark.parametrize("case", OVERLAPS + DATA_OFFSETS + DTYPES + ALIGNMENTS, ids=lambda c: c[0])
def test_issue15_classes(bases, workdir, case):
    name, base, mutate, expected = case
    b = bases[base]
    if expected == "moves":
        expected = "error" if moves_data(b, int(name.rsplit("-", 1)[1])) else "either"
    got = outcome(workdir, mutate(b), f".{b.fmt}", cli=True)
    assert expected == "either" or got == expected, f"{name}: the mutated file loaded and ran"


# --- names and metadata numbers: files written with the corrupt value in place


def rewrite_apr(src: Path, dest: Path, meta_raw: dict[str, str] | None = None, extra: list[str] = ()) -> bytes:
    """`src` again with `meta_raw` values spliced in as raw JSON text (numbers no JSON writer
    emits: 1e309, NaN, 10^5000) and a copy of a norm tensor under each `extra` name."""
    f = read_apr(src)
    meta = dict(f.metadata)
    meta_raw = {k: v.ljust(32) for k, v in (meta_raw or {}).items()}  # JSON allows the spaces; "@"*30 is unique
    for key, raw in meta_raw.items():
        meta[key] = "@" * (len(raw) - 2)  # a placeholder of the same JSON length
    norm = next(t for n, t in f.tensors.items() if n.endswith("input_layernorm.weight"))
    tensors = [*f.tensors.values(), *(QTensor(n, norm.dtype, norm.shape, norm.data) for n in extra)]
    data = write_apr(dest, meta, tensors).read_bytes()
    for raw in meta_raw.values():
        placeholder = json.dumps("@" * (len(raw) - 2)).encode()
        assert data.count(placeholder) == 1
        data = data.replace(placeholder, raw.encode())
    return data


def rewrite_gguf(src: Path, dest: Path, meta: dict | None = None, extra: list[str] = ()) -> bytes:
    f = read_gguf(src)
    norm = f.tensors["blk.0.attn_norm.weight"]
    tensors = [*f.tensors.values(), *(QTensor(n, norm.dtype, norm.shape, norm.data) for n in extra)]
    return write_gguf(dest, {**f.metadata, **(meta or {})}, tensors).read_bytes()


BIG = "1" + "0" * 309  # 10^309 as a JSON integer: float() of it overflows
HUGE = "1" + "0" * 5000  # beyond Python's 4300-digit int() limit
NUMBERS = ["1e309", "-1e309", BIG, "-" + BIG, HUGE, "NaN", "Infinity", "-Infinity", "1e308", "true", "-0.0"]
REAL_KEYS = ["rms_norm_eps", "rope_theta", "attention_scale", "rope_local_base_freq"]
INT_KEYS = ["num_layers", "hidden_size", "vocab_size", "rope_type", "tokenizer.bos_token_id"]


def json_cases(vocab: int) -> list[tuple[str, dict[str, str]]]:
    # rope_theta = -0.0 is 0, which means "unset" (§3.1): a valid file, left out
    cases = [(f"{k}={v[:8]}", {k: v}) for k in REAL_KEYS for v in NUMBERS if (k, v) != ("rope_theta", "-0.0")]
    cases += [(f"{k}={v[:8]}", {k: v}) for k in INT_KEYS for v in ("-0.0", "2.0", "true", "false", BIG, HUGE, "NaN", "1e309")]
    cases += [(f"rope_scaling.factor={v[:8]}", {"rope_scaling": f'{{"rope_type":"linear","factor":{v}}}'}) for v in NUMBERS]
    cases += [(f"tokenizer.scores[-1]={v[:8]}", {"tokenizer.scores": "[" + "0," * (vocab - 1) + v + "]"})
              for v in ("1e309", BIG, HUGE, "NaN", "-Infinity", "true")]
    return cases


def test_huge_metadata_numbers(bases, workdir):
    src = workdir / "qwen2.apr"
    vocab = read_apr(src).tensors["model.embed_tokens.weight"].shape[0]
    for i, (label, raw) in enumerate(json_cases(vocab)):
        data = rewrite_apr(src, workdir / "json.apr", raw)
        assert outcome(workdir, data, ".apr", cli=i % 5 == 0) == "error", label


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e38])
@pytest.mark.parametrize("key", ["llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"])
def test_nonfinite_gguf_reals(bases, workdir, key, value):
    data = rewrite_gguf(workdir / "llama.gguf", workdir / "reals.gguf", {key: value})
    assert outcome(workdir, data, ".gguf") == "error"


@pytest.mark.parametrize("digits", [7, 400, 4301, 5000])
@pytest.mark.parametrize("fmt", ["apr", "gguf"])
def test_huge_layer_numbers(bases, workdir, fmt, digits):
    """An extra tensor (every required one present) whose layer number has thousands of digits."""
    n = "9" * digits
    if fmt == "apr":
        names = [f"model.layers.{n}.input_layernorm.weight", f"blk.{n}.attn_norm.weight"]
        for name in names:
            data = rewrite_apr(workdir / "qwen2.apr", workdir / "names.apr", extra=[name])
            assert outcome(workdir, data, ".apr", cli=True) == "error"
    else:
        data = rewrite_gguf(workdir / "llama.gguf", workdir / "names.gguf", extra=[f"blk.{n}.attn_norm.weight"])
        assert outcome(workdir, data, ".gguf", cli=True) == "error"


def test_bases_load_and_run(bases, workdir):
    for b in bases.values():
        assert outcome(workdir, b.data, f".{b.fmt}", cli=True) == "finite"


# --------------------------------------------------------------------------------------------
# random campaigns


@st.composite
def byte_mutations(draw, size: int, prefix: int):
    anywhere, structural = st.integers(0, size - 1), st.integers(0, prefix - 1)
    ops = draw(st.lists(
        st.one_of(
            st.tuples(st.just("xor"), st.one_of(structural, anywhere), st.integers(1, 255)),
            st.tuples(st.just("put"), structural, st.binary(min_size=1, max_size=8)),
        ),
        min_size=1, max_size=6,
    ))
    cut = draw(st.one_of(st.none(), anywhere))
    fix_crc = draw(st.booleans())  # re-seal the APR header so the mutation reaches the deeper checks
    return ops, cut, fix_crc


def apply_bytes(data: bytes, ops, cut, fix_crc: bool) -> bytes:
    out = bytearray(data)
    for op, pos, arg in ops:
        if op == "xor":
            out[pos] ^= arg
        else:
            out[pos : pos + len(arg)] = arg
    if fix_crc and out[:3] == b"APR" and len(out) >= 64:
        seal(out)
    return bytes(out if cut is None else out[:cut])


@pytest.mark.parametrize("fmt", ["apr", "gguf"])
def test_mutated_bytes(tiny, workdir, fmt):
    b = tiny[fmt]

    @SETTINGS
    @given(byte_mutations(len(b.data), b.prefix))
    def prop(m):
        outcome(workdir, apply_bytes(b.data, *m), f".{fmt}")

    prop()


@st.composite
def structured_mutations(draw, b: Base) -> bytes:
    """One of issue 15's classes with random parameters."""
    names = sorted(b.entries)
    name, other = draw(st.sampled_from(names)), draw(st.sampled_from(names))
    kinds = ["offset", "code"] + (["data_offset", "size"] if b.fmt == "apr" else ["alignment"])
    kind = draw(st.sampled_from(kinds))
    if kind == "offset":
        return move_into(b, name, other, draw(st.integers(-4096, 4096)) * (1 if b.fmt == "apr" else 32))
    if kind == "code":
        sizes = sorted({c for c in TYPE_INFO}, key=int)
        return set_code(b, name, draw(st.one_of(st.sampled_from(sizes), st.integers(0, 255))))
    if kind == "data_offset":
        return shift_data_offset(b, draw(st.integers(-256, 256).filter(bool)))
    if kind == "size":
        return grow_size(b, name, draw(st.integers(-1024, 1024).filter(bool)))
    return set_alignment(b, draw(st.one_of(st.sampled_from([1 << k for k in range(12)]), st.integers(0, 2**32 - 1))))


@pytest.mark.parametrize("base", ["qwen2", "mistral", "llama"])
def test_structured_mutations(bases, workdir, base):
    b = bases[base]

    @SETTINGS
    @given(structured_mutations(b))
    def prop(data):
        outcome(workdir, data, f".{b.fmt}")

    prop()


def test_tiny_originals_load(tiny, workdir):
    for b in tiny.values():
        assert outcome(workdir, b.data, f".{b.fmt}") == "finite"
