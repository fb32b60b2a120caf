"""Teacher signals read back from a shard directory (`q4k-engine logits --out DIR`): the manifest,
top-k Parquet shards (pyarrow) and dense safetensors shards, row by row or in padded batches, as
NumPy arrays (a batch converts itself to torch tensors for a trainer).

    signals = open_signals("out/", verify=True)       # sha256 of every shard against the manifest
    for row in signals.rows(): ...                      # SignalRow, dataset order
    for batch in signals.batches(8): ...                # SignalBatch of 8 consecutive rows, padded

The layout (README, "Shard directory"): DIR/manifest.json names the format, the options (kind "topk"
or "dense", k, temperature, vocab_size, ...) and every shard with its row range [start, end), token
count, byte size and sha256.
- top-k Parquet, one row per dataset row: row_index int64, input_ids list<int32> [T],
  target_token_ids list<list<int32>> [T][K], target_logprobs list<list<float16|float32>> [T][K]
  (log-softmax of logits / temperature over the full vocabulary, descending), tail_logmass
  list<float32> [T] = log(1 - sum exp(target_logprobs)), target_mask list<bool> [T].
- dense safetensors: logits [N_tokens, V] (raw, real positions only), offsets int64 [R + 1],
  input_ids int32 [N_tokens], row_index int64 [R], target_mask uint8 [N_tokens].
Row t of a row's signals is the teacher's prediction for token t + 1; target_mask[t] says whether it
is a training target.

Everything a shard claims is checked against the manifest and against itself (row range, lengths,
K, vocabulary) before its values are handed out; a mismatch is a FormatError naming the file and
the row. Shards are read one Parquet record batch or one row's slice of the safetensors file at a
time, so memory stays bounded whatever the directory's size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..binio import sha256_file
from ..errors import FormatError, InputError

FORMAT = "q4k-engine-signals"
FORMAT_VERSION = 1
KINDS = ("topk", "dense")
TOPK_COLUMNS = ("row_index", "input_ids", "target_token_ids", "target_logprobs", "tail_logmass", "target_mask")
DENSE_TENSORS = ("logits", "offsets", "input_ids", "row_index", "target_mask")
PARQUET_BATCH_ROWS = 64  # rows per Parquet record batch read: bounds memory for long rows


@dataclass(frozen=True)
class ShardInfo:
    file: str
    start: int  # first dataset row index the shard covers
    end: int  # one past the last
    n_rows: int  # rows stored: fewer than end - start where bad rows were skipped (--skip-bad-lines)
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    directory: Path
    kind: str  # "topk" or "dense"
    k: int | None  # top-k only
    temperature: float
    vocab_size: int  # of the stored signals (after the writer's --vocab-size)
    model: dict[str, Any]
    options: dict[str, Any]
    shards: tuple[ShardInfo, ...]
    complete: bool
    raw: dict[str, Any]

    @property
    def rows(self) -> int:
        """Dataset row indices covered (bad rows a run skipped included)."""
        return self.shards[-1].end if self.shards else 0

    @property
    def stored_rows(self) -> int:
        return sum(s.n_rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


@dataclass(frozen=True)
class SignalRow:
    """One dataset row's teacher signals. Dense rows carry `logits`; top-k rows the other three."""

    row_index: int
    input_ids: np.ndarray  # int32 [T]
    target_mask: np.ndarray  # bool [T]
    logits: np.ndarray | None = None  # [T, V] float16/float32, raw (not divided by a temperature)
    token_ids: np.ndarray | None = None  # int32 [T, K]
    logprobs: np.ndarray | None = None  # [T, K] float16/float32
    tail: np.ndarray | None = None  # float32 [T]


@dataclass(frozen=True)
class SignalBatch:
    """Consecutive rows padded to the longest: input_ids with pad_id, attention_mask and target_mask
    False, logits 0.0, token ids -1, log-probs and tails -inf (the engine's own padding)."""

    row_index: np.ndarray  # int64 [B]
    lengths: np.ndarray  # int64 [B]
    input_ids: np.ndarray  # int64 [B, T]
    attention_mask: np.ndarray  # bool [B, T]
    target_mask: np.ndarray  # bool [B, T]
    logits: np.ndarray | None = None  # [B, T, V]
    token_ids: np.ndarray | None = None  # int64 [B, T, K]
    logprobs: np.ndarray | None = None  # [B, T, K]
    tail: np.ndarray | None = None  # [B, T]

    def to_torch(self, device: Any = "cpu") -> dict[str, Any]:
        """The arrays as torch tensors on `device` (float values as float32), None left out."""
        import torch

        out = {}
        for name in ("row_index", "lengths", "input_ids", "attention_mask", "target_mask", "logits", "token_ids",
                     "logprobs", "tail"):
            a = getattr(self, name)
            if a is not None:
                t = torch.from_numpy(a)
                out[name] = (t.float() if t.is_floating_point() else t).to(device)
        return out


# --- manifest ----------------------------------------------------------------------------------


def _need(obj: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in obj:
        raise FormatError(f"{where}: missing {key!r}")
    v = obj[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise FormatError(f"{where}: {key!r} has the wrong type ({type(v).__name__})")
    return v


def read_manifest(directory: str | Path) -> Manifest:
    d = Path(directory)
    path = d / "manifest.json"
    if not d.is_dir():
        raise InputError(f"{d}: no such directory")
    if not path.is_file():
        raise InputError(f"{d}: no manifest.json (not a q4k-engine signals directory)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: unreadable ({e})") from None
    where = str(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise FormatError(f"{where}: not a {FORMAT} manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{where}: format_version {raw.get('format_version')!r} (this reader knows {FORMAT_VERSION})")
    options = _need(raw, "options", dict, where)
    kind = _need(options, "kind", str, f"{where} options")
    if kind not in KINDS:
        raise FormatError(f"{where}: options.kind {kind!r} is not one of {', '.join(KINDS)}")
    k = _need(options, "k", int, f"{where} options") if kind == "topk" else None
    temperature = float(_need(options, "temperature", (int, float), f"{where} options"))
    vocab = _need(options, "vocab_size", int, f"{where} options")
    shards = []
    expect = 0
    for i, s in enumerate(_need(raw, "shards", list, where)):
        w = f"{where} shards[{i}]"
        if not isinstance(s, dict):
            raise FormatError(f"{w}: not an object")
        rows = _need(s, "rows", list, w)
        if len(rows) != 2 or not all(isinstance(r, int) for r in rows) or rows[0] != expect or rows[1] <= rows[0]:
            raise FormatError(f"{w}: rows {rows!r} do not continue the previous shard's range (next row {expect})")
        name = _need(s, "file", str, w)
        if Path(name).name != name:
            raise FormatError(f"{w}: file {name!r} must be a plain name inside the directory")
        n_rows = s.get("n_rows", rows[1] - rows[0])
        if not isinstance(n_rows, int) or isinstance(n_rows, bool) or not 0 <= n_rows <= rows[1] - rows[0]:
            raise FormatError(f"{w}: n_rows {n_rows!r} does not fit rows {rows!r}")
        shards.append(ShardInfo(name, rows[0], rows[1], n_rows, _need(s, "tokens", int, w), _need(s, "bytes", int, w),
                                _need(s, "sha256", str, w)))
        expect = rows[1]
    return Manifest(d, kind, k, temperature, vocab, dict(raw.get("model") or {}), options, tuple(shards),
                    bool(_need(raw, "complete", bool, where)), raw)



# --- shards ------------------------------------------------------------------------------------


def _list_parts(arr: Any, where: str, column: str) -> tuple[np.ndarray, Any]:
    """(offsets [n + 1] rebased to 0, child values) of a pyarrow list array without nulls."""
    if arr.null_count:
        raise FormatError(f"{where}: column {column} has null rows")
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], arr.values.slice(offsets[0], offsets[-1] - offsets[0])


def _values(arr: Any, where: str, column: str) -> np.ndarray:
    if arr.null_count:
        raise FormatError(f"{where}: column {column} has null values")
    return arr.to_numpy(zero_copy_only=False)


class Signals:
    """A signals directory opened for reading; see the module docstring."""

    def __init__(self, directory: str | Path, *, verify: bool = False, allow_incomplete: bool = False):
        self.manifest = read_manifest(directory)
        m = self.manifest
        if not m.complete and not allow_incomplete:
            raise InputError(f"{m.directory}: the run that wrote it is not complete ({len(m.shards)} shard(s), "
                             f"{m.rows} rows so far); finish it with --resume")
        for s in m.shards:
            if not (m.directory / s.file).is_file():
                raise FormatError(f"{m.directory / s.file}: shard listed in the manifest is missing")
        if verify:
            self.verify()

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def __len__(self) -> int:
        """Rows stored (and yielded by rows())."""
        return self.manifest.stored_rows

    def verify(self) -> None:
        """Every shard's size and sha256 against the manifest (FormatError naming the first that differs)."""
        for s in self.manifest.shards:
            path = self.manifest.directory / s.file
            size = path.stat().st_size
            if size != s.bytes:
                raise FormatError(f"{path}: {size} bytes, the manifest says {s.bytes}")
            digest = sha256_file(path)
            if digest != s.sha256:
                raise FormatError(f"{path}: sha256 {digest} does not match the manifest's {s.sha256}")

    def rows(self) -> Iterator[SignalRow]:
        """Every row in dataset order."""
        for s in self.manifest.shards:
            yield from (self._dense_rows if self.kind == "dense" else self._topk_rows)(s)

    def batches(self, batch_size: int, *, pad_id: int = 0) -> Iterator[SignalBatch]:
        """Rows grouped `batch_size` at a time in dataset order, padded (see SignalBatch)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        group: list[SignalRow] = []
        for row in self.rows():
            group.append(row)
            if len(group) == batch_size:
                yield pad_rows(group, pad_id)
                group = []
        if group:
            yield pad_rows(group, pad_id)

    # --- one shard -------------------------------------------------------------------------------
    def _check_rows(self, where: str, s: ShardInfo, row_index: np.ndarray, after: int) -> None:
        """row_index increasing (gaps are skipped bad rows), after `after`, inside [start, end)."""
        prev = np.concatenate([[after], row_index[:-1]])
        bad = (row_index <= prev) | (row_index < s.start) | (row_index >= s.end)
        if bad.any():
            i = int(np.argmax(bad))
            raise FormatError(f"{where}: stored row {i} has row_index {int(row_index[i])}, out of order or outside "
                              f"the rows [{s.start}, {s.end}) the manifest gives this shard")

    def _topk_rows(self, s: ShardInfo) -> Iterator[SignalRow]:
        import pyarrow.parquet as pq

        path = self.manifest.directory / s.file
        where = str(path)
        k = self.manifest.k
        try:
            f = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises its own error types for a damaged file
            raise FormatError(f"{where}: not a readable Parquet file ({e})") from None
        missing = [c for c in TOPK_COLUMNS if c not in f.schema_arrow.names]
        if missing:
            raise FormatError(f"{where}: missing column(s) {', '.join(missing)}")
        if f.metadata.num_rows != s.n_rows:
            raise FormatError(f"{where}: {f.metadata.num_rows} rows, the manifest says {s.n_rows}")
        last = s.start - 1
        for rb in f.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(TOPK_COLUMNS)):
            col = {name: rb.column(name) for name in TOPK_COLUMNS}
            row_index = _values(col["row_index"], where, "row_index").astype(np.int64)
            self._check_rows(where, s, row_index, last)
            last = int(row_index[-1]) if len(row_index) else last
            off, ids_vals = _list_parts(col["input_ids"], where, "input_ids")
            input_ids = _values(ids_vals, where, "input_ids").astype(np.int32)
            def per_position(name: str) -> Any:
                """The values of a column with one entry per position, rows aligned with input_ids."""
                o, v = _list_parts(col[name], where, name)
                if not np.array_equal(o, off):
                    raise FormatError(f"{where}: {name} and input_ids differ in length at row "
                                      f"{int(row_index[np.argmax(o != off) - 1])}")
                return v

            per_pos = {name: _values(per_position(name), where, name) for name in ("tail_logmass", "target_mask")}
            nested = {}
            for name in ("target_token_ids", "target_logprobs"):
                io, v = _list_parts(per_position(name), where, name)
                lens = np.diff(io)
                if (lens != k).any():
                    pos = int(np.argmax(lens != k))
                    r = int(np.searchsorted(off, pos, side="right")) - 1
                    raise FormatError(f"{where}: row {int(row_index[r])}, position {pos - off[r]}: {lens[pos]} {name}, the "
                                      f"manifest says k = {k}")
                nested[name] = _values(v, where, name).reshape(-1, k)
            ids = nested["target_token_ids"].astype(np.int32)
            if len(ids) and (ids.max() >= self.manifest.vocab_size or ids.min() < -1):
                raise FormatError(f"{where}: token ids outside [0, {self.manifest.vocab_size}) in rows "
                                  f"{int(row_index[0])}..{int(row_index[-1])}")
            for b in range(len(row_index)):
                a, e = off[b], off[b + 1]
                if e == a:
                    raise FormatError(f"{where}: row {int(row_index[b])} is empty")
                yield SignalRow(int(row_index[b]), input_ids[a:e], per_pos["target_mask"][a:e].astype(bool),
                                token_ids=ids[a:e], logprobs=nested["target_logprobs"][a:e],
                                tail=per_pos["tail_logmass"][a:e].astype(np.float32))

    def _dense_rows(self, s: ShardInfo) -> Iterator[SignalRow]:
        from safetensors import SafetensorError, safe_open

        path = self.manifest.directory / s.file
        where = str(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                names = set(f.keys())
                missing = [n for n in DENSE_TENSORS if n not in names]
                if missing:
                    raise FormatError(f"{where}: missing tensor(s) {', '.join(missing)}")
                offsets = f.get_tensor("offsets").astype(np.int64)
                row_index = f.get_tensor("row_index").astype(np.int64)
                input_ids = f.get_tensor("input_ids").astype(np.int32)
                target_mask = f.get_tensor("target_mask").astype(bool)
                logits = f.get_slice("logits")
                shape = logits.get_shape()
                n_rows = s.n_rows
                if len(row_index) != n_rows or offsets.shape != (n_rows + 1,):
                    raise FormatError(f"{where}: {len(row_index)} rows and {len(offsets)} offsets; the manifest "
                                      f"says {n_rows} rows")
                self._check_rows(where, s, row_index, s.start - 1)
                n = int(offsets[-1])
                if offsets[0] != 0 or (np.diff(offsets) < 1).any() or len(input_ids) != n or len(target_mask) != n:
                    raise FormatError(f"{where}: offsets do not split {len(input_ids)} tokens into non-empty rows")
                if len(shape) != 2 or shape[0] != n or shape[1] != self.manifest.vocab_size:
                    raise FormatError(f"{where}: logits {shape}, expected [{n}, {self.manifest.vocab_size}]")
                for b in range(n_rows):
                    a, e = int(offsets[b]), int(offsets[b + 1])
                    yield SignalRow(int(row_index[b]), input_ids[a:e], target_mask[a:e], logits=logits[a:e])
        except SafetensorError as e:
            raise FormatError(f"{where}: not a readable safetensors file ({e})") from None


def pad_rows(rows: list[SignalRow], pad_id: int = 0) -> SignalBatch:
    """Rows padded into one SignalBatch (see its docstring for the padding values)."""
    lengths = np.array([len(r.input_ids) for r in rows], np.int64)
    b, t = len(rows), int(lengths.max())
    ids = np.full((b, t), pad_id, np.int64)
    attn = np.zeros((b, t), bool)
    tmask = np.zeros((b, t), bool)
    first = rows[0]
    logits = None if first.logits is None else np.zeros((b, t, first.logits.shape[1]), first.logits.dtype)
    tok = None if first.token_ids is None else np.full((b, t, first.token_ids.shape[1]), -1, np.int64)
    lp = None if first.logprobs is None else np.full((b, t, first.logprobs.shape[1]), -np.inf, first.logprobs.dtype)
    tail = None if first.tail is None else np.full((b, t), -np.inf, np.float32)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n], attn[i, :n], tmask[i, :n] = r.input_ids, True, r.target_mask
        if logits is not None:
            logits[i, :n] = r.logits
        if tok is not None:
            tok[i, :n], lp[i, :n], tail[i, :n] = r.token_ids, r.logprobs, r.tail
    return SignalBatch(np.array([r.row_index for r in rows], np.int64), lengths, ids, attn, tmask, logits, tok, lp, tail)


def open_signals(directory: str | Path, *, verify: bool = False, allow_incomplete: bool = False) -> Signals:
    """A signals directory for reading; verify=True checks every shard's sha256 first."""
    return Signals(directory, verify=verify, allow_incomplete=allow_incomplete)
